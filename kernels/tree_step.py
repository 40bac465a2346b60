"""One vLLM verification step as inputs of our Triton tree-attention kernel (no vLLM import).

The GPU half of the TR-Jacobi vLLM plugin (`proposers/vllm/tree_attention_gpu.py`) runs
`kernels.tree_attention.tree_attention` for every query row of a step that holds at least
one draft tree. A step mixes requests: tree requests (root + BFS-ordered nodes), chain
drafts, plain decodes and prefill chunks. The kernel takes one ancestor-or-self bitmask
row per query token; a chain's bitmask is exactly causal attention, so every non-tree
request gets a causal row and the whole step is one launch.

This module only describes the step and adapts vLLM 0.32's Triton-backend KV cache to the
kernel; it never imports vLLM, so it runs (and is tested) on the GPU machine, which has
torch and Triton but no vLLM. It lives in `kernels/` rather than `proposers/vllm/` because
importing anything under `proposers.vllm` runs that package's vLLM version check.

vLLM 0.32's Triton backend (`v1/attention/backends/triton_attn.py`) gives each layer a
cache whose logical shape is `[num_blocks, num_kv_heads, block_size, 2 * head_size]` (K
then V along the last axis; the physical strides may be HND or NHD). Its forward views it
as `kv_cache.transpose(1, 2).split(head_size, -1)`: K and V pools `[num_blocks,
block_size, num_kv_heads, head_size]` with a contiguous last axis, which is the pool
layout our kernel reads through strides. Block tables are vLLM's (int32), unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kernels.tree_attention import pack_visibility, tree_attention


@dataclass
class KernelTreeStep:
    """The kernel's view of one step; all tensors on the step's device.

    `tree_mask[row]` is the ancestor-or-self bitmask of query row `row` over its request's
    query rows (every request's prefix is visible anyway). `num_tokens` is the number of
    real query rows (vLLM may pad the batch past it). `stash` collects each layer's
    `(impl, layer, key, value, kv_cache)` during the step for KV compaction
    (`proposers/vllm/tree_runtime.compact_kv`); None once compaction has run.
    """

    cu_seqlens_q: torch.Tensor  # [num_reqs + 1] int32
    seq_lens: torch.Tensor  # [num_reqs] int32: computed prefix + query rows
    tree_mask: torch.Tensor  # [num_tokens, num_words] int32
    num_tokens: int
    max_query_len: int
    max_seq_len: int
    stash: list | None = field(default_factory=list)

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]


def causal_bitmask(local: torch.Tensor, num_words: int) -> torch.Tensor:
    """Bitmask rows `[len(local), num_words]` int32 of causal attention: row i sees query
    rows `0..local[i]` of its request (computed per word, no dense matrix: prefill chunks
    of thousands of rows stay cheap)."""
    first = torch.arange(num_words, dtype=torch.long) * 32
    ones = (local.to(torch.long)[:, None] + 1 - first[None, :]).clamp(0, 32)
    words = (torch.ones_like(ones) << ones) - 1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def check_ancestors(ancestors: torch.Tensor, query_len: int, req_idx: int) -> None:
    """An ancestor-or-self matrix the kernel can use: `[q, q]` bool, self included,
    ancestors before descendants (the kernel bounds each query block's keys by its last
    row, so a row must not see a later row)."""
    if ancestors.dtype != torch.bool or ancestors.shape != (query_len, query_len):
        raise ValueError(
            f"request {req_idx}: tree ancestors must be bool [{query_len}, {query_len}] (its "
            f"query length), got {ancestors.dtype} {tuple(ancestors.shape)}")
    if not bool(ancestors.diagonal().all()):
        raise ValueError(f"request {req_idx}: tree ancestors must include each node itself")
    if bool(torch.triu(ancestors, 1).any()):
        raise ValueError(f"request {req_idx}: tree rows must be in topological order "
                         "(a node sees no later row)")


def build_kernel_tree_step(
    query_start_loc: list[int],
    num_computed: list[int],
    trees: dict[int, torch.Tensor],
    device: torch.device | str,
) -> KernelTreeStep:
    """The kernel inputs of one step.

    `query_start_loc` (`num_reqs + 1` entries from 0) and `num_computed` (tokens already
    in the cache per request) are vLLM's host-side values; `trees[r]` is the `[n + 1, n +
    1]` bool ancestor-or-self matrix of request r's query (root + n nodes), for tree
    requests only. Every other request attends causally. Built on the host, then moved to
    `device` in one copy per tensor.
    """
    num_reqs = len(num_computed)
    if len(query_start_loc) < num_reqs + 1 or query_start_loc[0] != 0:
        raise ValueError("query_start_loc needs num_reqs + 1 entries starting at 0")
    starts = torch.tensor(query_start_loc[: num_reqs + 1], dtype=torch.long)
    q_lens = starts[1:] - starts[:-1]
    if bool((q_lens < 0).any()):
        raise ValueError("query_start_loc must be non-decreasing")
    seq_lens = torch.tensor(num_computed, dtype=torch.long) + q_lens
    num_tokens = int(starts[-1])
    max_query_len = int(q_lens.max()) if num_reqs else 0
    num_words = max(1, -(-max_query_len // 32))
    local = torch.arange(num_tokens) - torch.repeat_interleave(starts[:-1], q_lens)
    mask = causal_bitmask(local, num_words)
    for r, ancestors in trees.items():
        if not 0 <= r < num_reqs:
            raise ValueError(f"tree for request {r}, but the step has {num_reqs} requests")
        q = int(q_lens[r])
        check_ancestors(ancestors, q, r)
        visible = torch.zeros(q, num_words * 32, dtype=torch.bool)
        visible[:, :q] = ancestors.cpu()
        mask[int(starts[r]): int(starts[r]) + q] = pack_visibility(visible)
    return KernelTreeStep(
        cu_seqlens_q=starts.to(device=device, dtype=torch.int32),
        seq_lens=seq_lens.to(device=device, dtype=torch.int32),
        tree_mask=mask.to(device),
        num_tokens=num_tokens,
        max_query_len=max_query_len,
        max_seq_len=int(seq_lens.max()) if num_reqs else 0,
    )


def triton_layout_kv(kv_cache: torch.Tensor,
                     head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V pools `[num_blocks, block_size, num_kv_heads, head_size]` (views) of a
    vLLM 0.32 Triton-backend layer cache `[num_blocks, num_kv_heads, block_size, 2 *
    head_size]`, as `TritonAttentionImpl.forward` splits it."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(
            f"expected a Triton-backend KV cache [num_blocks, num_kv_heads, block_size, "
            f"2 * {head_size}], got {tuple(kv_cache.shape)}")
    if kv_cache.stride(-1) != 1:
        raise ValueError("the KV cache's last axis must be contiguous")
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


def run_kernel_tree_step(
    step: KernelTreeStep,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    out: torch.Tensor,
) -> torch.Tensor:
    """Attention of the step's `num_tokens` query rows (`query` `[>= num_tokens, heads,
    head]`, padding rows ignored) into `out[:num_tokens]`, over pools as
    `triton_layout_kv` returns them and vLLM's int32 `block_table` (`[>= num_reqs,
    max_blocks]`). The step's K/V must already be in the cache."""
    if query.shape[0] < step.num_tokens or out.shape[0] < step.num_tokens:
        raise ValueError(f"tree step of {step.num_tokens} query rows, but query has "
                         f"{query.shape[0]} and out {out.shape[0]}")
    if block_table.dtype != torch.int32 or block_table.shape[0] < step.num_reqs:
        raise ValueError(f"block table must be int32 with >= {step.num_reqs} rows, got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")
    tokens = step.num_tokens
    tree_attention(
        query[:tokens], key_cache, value_cache, block_table[: step.num_reqs],
        step.cu_seqlens_q, step.seq_lens, step.tree_mask, step.max_query_len,
        step.max_seq_len, scale=scale, out=out[:tokens],
    )
    return out
