"""The CUDA tree-verification step at realistic sizes, on a GPU (no vLLM needed).

`kernels.tree_step` (the kernel step the TR-Jacobi CUDA runner publishes, and our Triton
kernel run on vLLM 0.32's Triton-backend KV layout) against a dense float32 reference
(tests/tree_step_support.py) for mixed steps: TR-Jacobi trees of 16 and 64-68 nodes,
chain drafts, decodes and prefill chunks, prefixes up to ~3k keys ending mid-block, GQA,
head dim 64 and 128, bf16, HND and NHD cache strides, block sizes 16 and 64, padded
batches. The CPU counterpart (Triton interpreter, small shapes, plus the vLLM impl) is
tests/test_vllm_tree_triton.py.

Run on the GPU machine from the repository root: `python3 -m pytest
tests/test_tree_step_gpu.py -q`. Skips without CUDA.
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from kernels.tree_step import build_kernel_tree_step, run_kernel_tree_step, triton_layout_kv
from tests.test_kernels_tree_attention import tolerance
from tests.tree_step_support import (
    Request,
    default_scale,
    dense_reference,
    make_mixed_step,
    random_tree_ancestors,
    template_ancestors,
)

HEADS = {64: (16, 2), 128: (32, 8)}  # head dim -> (query heads, KV heads)


def tree16_step() -> list[Request]:
    tree = template_ancestors("tree-16")
    prefixes = [1000, 2047, 3001, 517, 64, 1500, 2500, 33]
    return [Request(prefix=p, ancestors=tree) for p in prefixes] + [
        Request(prefix=1200, query=6),  # chain draft
        Request(prefix=2999, query=1),  # decodes
        Request(prefix=15, query=1),
        Request(prefix=0, query=512),  # first prefill chunk
        Request(prefix=1024, query=256),  # later chunk of a long prompt
    ]


def tree64_step() -> list[Request]:
    paper = template_ancestors("paper-68")  # 68 rows: three mask words
    return [
        *(Request(prefix=p, ancestors=paper) for p in (2500, 777, 3100, 130)),
        *(Request(prefix=p, ancestors=random_tree_ancestors(64, seed=p))
          for p in (1999, 48, 2600, 1025)),
        Request(prefix=2000, query=384),  # prefill chunk
        Request(prefix=1800, query=9),  # chain draft
        Request(prefix=321, query=1),  # decode
    ]


STEPS = {"tree16": tree16_step, "tree64": tree64_step}


@pytest.mark.parametrize("layout,block_size", [("hnd", 16), ("nhd", 16), ("nhd", 64)])
@pytest.mark.parametrize("scenario", sorted(STEPS))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_kernel_step_matches_reference(head_dim, scenario, layout, block_size):
    num_heads, num_kv_heads = HEADS[head_dim]
    step = make_mixed_step(STEPS[scenario](), num_heads, num_kv_heads, head_dim,
                           torch.bfloat16, block_size, device="cuda", nhd=layout == "nhd",
                           padding_rows=5, seed=head_dim + block_size)
    ks = build_kernel_tree_step(step.query_start_loc, step.num_computed, step.trees, "cuda")
    assert ks.tree_mask.is_cuda and ks.num_tokens == step.num_tokens
    key_cache, value_cache = triton_layout_kv(step.kv_cache, head_dim)
    out = torch.full_like(step.query, 3.0)
    run_kernel_tree_step(ks, step.query, key_cache, value_cache, step.block_table,
                         default_scale(head_dim), out)
    torch.cuda.synchronize()
    want = dense_reference(step, default_scale(head_dim))
    tol = tolerance(torch.bfloat16)
    torch.testing.assert_close(out[: step.num_tokens].float(), want, atol=tol, rtol=tol)
    assert bool((out[step.num_tokens:] == 3.0).all())  # padding rows untouched


def test_fp32_mixed_step():
    """fp32 (exact IEEE dots in the kernel): a tree, a chain, a decode and a chunk."""
    requests = [Request(prefix=1537, ancestors=template_ancestors("tree-16")),
                Request(prefix=700, query=5), Request(prefix=2048, query=1),
                Request(prefix=100, query=200)]
    step = make_mixed_step(requests, 32, 8, 128, torch.float32, 16, device="cuda", nhd=True)
    ks = build_kernel_tree_step(step.query_start_loc, step.num_computed, step.trees, "cuda")
    key_cache, value_cache = triton_layout_kv(step.kv_cache, 128)
    out = run_kernel_tree_step(ks, step.query, key_cache, value_cache, step.block_table,
                               default_scale(128), torch.empty_like(step.query))
    want = dense_reference(step, default_scale(128))
    tol = tolerance(torch.float32)
    torch.testing.assert_close(out[: step.num_tokens], want, atol=tol, rtol=tol)
