"""host_ops: the numpy argmax equals torch's and vLLM's CPU greedy kernel exactly."""

from __future__ import annotations

import pytest
import torch

from proposers.vllm.host_ops import argmax_rows, fast_greedy_sample


def tied_rows(generator: torch.Generator, rows: int, n: int) -> torch.Tensor:
    """Small integers (many ties at the maximum), some NaN, some all -inf rows."""
    x = torch.randint(-3, 3, (rows, n), generator=generator).float()
    x[0, int(torch.randint(0, n, (1,), generator=generator))] = float("nan")
    x[1] = float("-inf")
    x[2, -1] = float("inf")
    return x


@pytest.mark.parametrize("n", [1, 5, 64, 300, 4099])
def test_argmax_rows_is_torch_argmax(n):
    g = torch.Generator().manual_seed(n)
    for x in (torch.randn(6, n, generator=g), tied_rows(g, 5, n),
              torch.randn(6, n, generator=g, dtype=torch.float64)):
        assert torch.equal(argmax_rows(x), x.argmax(-1))
        view = x.t().contiguous().t()  # same values, column-major strides
        assert torch.equal(argmax_rows(view), x.argmax(-1))
        got = fast_greedy_sample(x)
        assert got.dtype == torch.int64 and torch.equal(got, x.argmax(-1).view(-1))
    half = torch.randn(3, n, generator=g).bfloat16()  # not numpy's: torch's own op
    assert torch.equal(argmax_rows(half), half.argmax(-1))
    with torch.inference_mode():
        x = torch.randn(4, n, generator=g)
        assert torch.equal(argmax_rows(x), x.argmax(-1))


def test_argmax_rows_is_vllms_cpu_greedy_kernel():
    """The runner swaps vLLM's CPU greedy kernel for it: same tokens on ties and NaN."""
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    if not hasattr(torch.ops._C, "greedy_argmax"):
        pytest.skip("this vLLM build has no CPU greedy kernel")
    g = torch.Generator().manual_seed(0)
    for n in (7, 300, 49152):
        for x in (torch.randn(8, n, generator=g), tied_rows(g, 8, n)):
            assert torch.equal(argmax_rows(x), torch.ops._C.greedy_argmax(x).view(-1).long())
