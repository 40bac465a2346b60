"""Mixed vLLM steps in the Triton backend's KV layout, and an independent dense reference.

Shared by tests/test_vllm_tree_triton.py (CPU, Triton interpreter) and
tests/test_tree_step_gpu.py (CUDA). No vLLM import: the GPU machine has none.

The cache is written through vLLM 0.32's *logical* Triton-backend layout,
`[num_blocks, num_kv_heads, block_size, 2 * head_size]` with K in the first half of the
last axis (not through `kernels.tree_step.triton_layout_kv`, the code under test), with
HND or NHD physical strides. The reference attends over each request's K/V rows as
generated, with a dense mask built from the ancestors matrices, in float32.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from proposers.templates import load_template
from proposers.tree import compile_tree


@dataclass
class Request:
    """One request of a step: `prefix` tokens already cached, then either `query` causal
    rows (decode, chain drafts, prefill chunk) or a tree given by `ancestors`."""

    prefix: int
    query: int = 1
    ancestors: torch.Tensor | None = None

    @property
    def query_len(self) -> int:
        return self.ancestors.shape[0] if self.ancestors is not None else self.query


def template_ancestors(name: str) -> torch.Tensor:
    return compile_tree(load_template(name)).ancestors


def random_tree_ancestors(num_nodes: int, seed: int) -> torch.Tensor:
    """Ancestor-or-self matrix of a random tree: root + `num_nodes` nodes, parents first."""
    rng = random.Random(seed)
    n = num_nodes + 1
    ancestors = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        ancestors[i] |= ancestors[rng.randrange(i)]
    return ancestors


@dataclass
class MixedStep:
    query: torch.Tensor  # [num_tokens + padding, heads, head] (a strided view, as in vLLM)
    kv_cache: torch.Tensor  # logical [blocks, kv_heads, block_size, 2 * head]
    block_table: torch.Tensor  # [num_reqs, max_blocks] int32
    query_start_loc: list[int]
    num_computed: list[int]
    trees: dict[int, torch.Tensor]
    keys: list[torch.Tensor]  # per request [prefix + query, kv_heads, head]
    values: list[torch.Tensor]
    masks: list[torch.Tensor]  # per request [query, prefix + query] bool
    slots: list[torch.Tensor]  # per request cache slot of each position

    @property
    def num_tokens(self) -> int:
        return self.query_start_loc[-1]


def make_mixed_step(requests: list[Request], num_heads: int, num_kv_heads: int,
                    head_dim: int, dtype: torch.dtype, block_size: int,
                    device: str | torch.device = "cpu", nhd: bool = False,
                    padding_rows: int = 0, seed: int = 0) -> MixedStep:
    gen = torch.Generator().manual_seed(seed)
    lens = [r.prefix + r.query_len for r in requests]
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=gen)  # blocks scattered over the pool
    table = torch.zeros(len(requests), max(need) + 2, dtype=torch.int32)  # spare entries
    used = 0
    for r, k in enumerate(need):
        table[r, :k] = order[used: used + k].to(torch.int32)
        used += k
    if nhd:  # physical [blocks, block_size, kv_heads, 2 * head], logical view like vLLM's
        raw = torch.randn(num_blocks, block_size, num_kv_heads, 2 * head_dim, generator=gen)
        kv_cache = raw.to(dtype).transpose(1, 2)
    else:
        kv_cache = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_dim,
                               generator=gen).to(dtype)
    keys, values, masks, slots = [], [], [], []
    qsl, trees = [0], {}
    for r, req in enumerate(requests):
        n, q = lens[r], req.query_len
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(n)
        block, offset = table[r, pos // block_size].long(), pos % block_size
        kv_cache[block, :, offset, :head_dim] = k
        kv_cache[block, :, offset, head_dim:] = v
        inner = (req.ancestors if req.ancestors is not None
                 else torch.ones(q, q, dtype=torch.bool).tril())
        if req.ancestors is not None:
            trees[r] = req.ancestors
        mask = torch.ones(q, n, dtype=torch.bool)
        mask[:, req.prefix:] = inner
        keys.append(k)
        values.append(v)
        masks.append(mask)
        slots.append(block * block_size + offset)
        qsl.append(qsl[-1] + q)
    total = qsl[-1] + padding_rows
    qkv = torch.randn(total, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    query = qkv.to(dtype)[:, : num_heads * head_dim].view(total, num_heads, head_dim)
    return MixedStep(
        query=query.to(device), kv_cache=kv_cache.to(device), block_table=table.to(device),
        query_start_loc=qsl, num_computed=[r.prefix for r in requests], trees=trees,
        keys=[t.to(device) for t in keys], values=[t.to(device) for t in values],
        masks=[t.to(device) for t in masks], slots=slots,
    )


def dense_reference(step: MixedStep, scale: float) -> torch.Tensor:
    """float32 attention `[num_tokens, heads, head]` of every request over its own K/V."""
    num_heads = step.query.shape[1]
    out = torch.empty(step.num_tokens, *step.query.shape[1:], dtype=torch.float32,
                      device=step.query.device)
    for r, mask in enumerate(step.masks):
        lo, hi = step.query_start_loc[r], step.query_start_loc[r + 1]
        group = num_heads // step.keys[r].shape[1]
        k = step.keys[r].float().repeat_interleave(group, dim=1)
        v = step.values[r].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", step.query[lo:hi].float(), k) * scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[lo:hi] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
