"""CPU attention with a tree mask, as an override of vLLM's `CPU_ATTN` backend.

vLLM's CPU kernel (`ops.cpu_attention_with_kv_cache`) knows only causal masks, so tree
steps cannot use it. Every step that has no tree goes to the stock kernel unchanged
(plain decode and chain drafts cost what they cost in plain vLLM). Tree steps run
PyTorch SDPA with the mask the runner built: the prefix, plus ancestor-or-self inside a
request's tree, plus causal for non-tree rows.

SDPA needs each request's K/V as plain rows, while the kernel keeps them in an
ISA-specific packed layout (vllm-integration.md section 5). `read_packed_kv` gathers
them straight from vLLM's cache for the layout we know (per block and KV head, K
transposed `[head, block_size]`, then V row-major `[block_size, head]`: the `vec` and
`vec16` ISAs). That a layer's cache really has this layout is checked, not assumed:
`packed_layout_readable` writes random rows with vLLM's own writer into a scratch cache
of the layer's shape, dtype and ISA and reads them back. A layer that fails (e.g.
`amx`, which packs K and V otherwise, per section 5) gets a plain mirror instead
(`[slots, 2, kv_heads, head]`, same slot numbering) that each of its K/V writes also
updates: a second write per layer on every step, drafts or not (0.7 s of a 28 s run at
batch 8, MSN model, fp32, 2 cores), besides the memory. The runner runs the check and
allocates mirrors when vLLM allocates the KV cache (`TRJacobiRunner.initialize_kv_cache`).
KV compaction goes through `do_kv_cache_update`, so it rewrites the packed cache (in the
kernel's own layout) and the mirror, if any.

The per-step tree description travels runner -> backend through `TreeStep`, published
in `tree_runtime.RUNTIME` (shared with the CUDA path, `tree_attention_gpu.py`), because
`CommonAttentionMetadata` has no slot for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
)

from proposers.vllm.tree_runtime import (
    RUNTIME,
    backend_overridden,
    override_backend,
    refuse_unsupported,
    stash_kv,
)

BACKEND_PATH = "proposers.vllm.tree_attention.TreeCPUAttentionBackend"
PACKED, MIRROR = "packed", "mirror"  # where a layer's tree steps read K/V


@dataclass
class TreeStep:
    """One tree step's attention layout, shared by all layers.

    Requests are padded to `[R, Q]` queries and `[R, L]` keys. `query_index[r, q]` is the
    flat token row of query q of request r (padding repeats a valid row; its output is
    dropped). `key_slots[r, l]` is the cache slot of request r's position l. `mask[r, q,
    l]` says whether that query attends to that key.
    """

    query_index: torch.Tensor  # [R, Q] long
    query_valid: torch.Tensor  # [R, Q] bool
    key_slots: torch.Tensor  # [R, L] long
    mask: torch.Tensor  # [R, Q, L] bool
    stash: list | None = field(default_factory=list)  # (impl, layer, key, value, kv_cache)


def register_tree_backend() -> None:
    """Point `CPU_ATTN` at our subclass (idempotent; before any model is built)."""
    override_backend("CPU_ATTN", BACKEND_PATH)


def tree_backend_registered() -> bool:
    return backend_overridden("CPU_ATTN", BACKEND_PATH)


class TreeCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[TreeCPUAttentionImpl]:
        return TreeCPUAttentionImpl


class TreeCPUAttentionImpl(CPUAttentionBackendImpl):
    # PACKED (vLLM's own cache) or MIRROR (`mirror`, a plain copy), chosen by the runner
    # when it allocates the KV cache; None until then (tree steps then refuse to run).
    kv_source: str | None = None
    mirror: torch.Tensor | None = None

    def _decoder(self) -> bool:
        return self.attn_type == AttentionType.DECODER

    def check_tree_support(self) -> None:
        refuse_unsupported("CPU", {
            "sliding window": self.sliding_window != -1,
            "ALiBi": self.alibi_slopes is not None,
            "logits soft-cap": bool(self.logits_soft_cap),
            "attention sinks": self.sinks is not None,
            "quantized KV cache": self.is_fp8_kv_cache,
        }, self._decoder())

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if not self._decoder():
            return
        n = slot_mapping.shape[0]
        if self.mirror is not None:
            slots = slot_mapping[:n].long()
            self.mirror[slots, 0] = key[:n]
            self.mirror[slots, 1] = value[:n]
        stash_kv(self, layer, key, value, kv_cache, n)

    def gather_kv(self, kv_cache: torch.Tensor,
                  slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V `[*slots.shape, kv_heads, head]` of cache slots `slots`."""
        if self.kv_source == PACKED:
            return read_packed_kv(kv_cache, slots)
        if self.kv_source == MIRROR:
            kv = self.mirror[slots]
            return kv[..., 0, :, :], kv[..., 1, :, :]
        raise RuntimeError("TR-Jacobi tree step on a layer whose KV layout was never checked "
                           "(the TR-Jacobi runner chooses it when it allocates the KV cache)")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        step = RUNTIME.step
        if step is None or attn_metadata is None or not self._decoder():
            return super().forward(layer, query, key, value, kv_cache, attn_metadata,
                                   output, output_scale, output_block_scale)
        k, v = self.gather_kv(kv_cache, step.key_slots)  # [R, L, Hkv, D]
        q = query[step.query_index].transpose(1, 2)  # [R, H, Q, D]
        out = F.scaled_dot_product_attention(
            q, k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
            attn_mask=step.mask.unsqueeze(1), scale=self.scale, enable_gqa=True,
        )
        out = out.transpose(1, 2)[step.query_valid]  # [T, H, D]
        output[step.query_index[step.query_valid]] = out.to(output.dtype)
        return output


def read_packed_kv(kv_cache: torch.Tensor,
                   slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V `[*slots.shape, kv_heads, head]` of cache slots `slots`, read from vLLM's
    packed cache `[blocks, kv_heads, block_size, 2*head]` in the `vec` layout: per block
    and KV head, the block's K stored transposed (`[head, block_size]`), then its V
    row-major (`[block_size, head]`). Only where `packed_layout_readable` says so."""
    num_blocks, num_kv_heads, block_size, two_head = kv_cache.shape
    head = two_head // 2
    halves = kv_cache.view(num_blocks, num_kv_heads, 2, block_size * head)
    keys = halves[:, :, 0].view(num_blocks, num_kv_heads, head, block_size)
    values = halves[:, :, 1].view(num_blocks, num_kv_heads, block_size, head)
    block, offset = slots // block_size, slots % block_size
    return keys.permute(0, 3, 1, 2)[block, offset], values.permute(0, 2, 1, 3)[block, offset]


def packed_layout_readable(impl: CPUAttentionBackendImpl, layer,
                           kv_cache: torch.Tensor, num_blocks: int = 3) -> bool:
    """Whether `read_packed_kv` reads back exactly what vLLM's own writer stores in a
    cache like `kv_cache` (its KV heads, block size, head size and dtype; the layer's ISA
    and scales). Every slot of a small scratch cache gets a random row, in random order,
    so a reader that misplaces any position, head or element fails."""
    _, num_kv_heads, block_size, two_head = kv_cache.shape
    generator = torch.Generator().manual_seed(0)
    slots = torch.randperm(num_blocks * block_size, generator=generator)
    shape = (slots.numel(), num_kv_heads, two_head // 2)
    key = torch.randn(shape, generator=generator).to(kv_cache.dtype)
    value = torch.randn(shape, generator=generator).to(kv_cache.dtype)
    # The cache's own strides (its blocks may interleave with other layers' blocks).
    scratch = torch.empty_strided((num_blocks, num_kv_heads, block_size, two_head),
                                  kv_cache.stride(), dtype=kv_cache.dtype).zero_()
    CPUAttentionBackendImpl.do_kv_cache_update(impl, layer, key, value, scratch, slots)
    got_key, got_value = read_packed_kv(scratch, slots)
    return torch.equal(got_key, key) and torch.equal(got_value, value)


def build_tree_step(
    query_start_loc: list[int],
    num_computed: list[int],
    block_rows: torch.Tensor,
    block_size: int,
    trees: dict[int, torch.Tensor],
) -> TreeStep:
    """The padded layout of one step.

    `block_rows[r]` is request r's block table row; `trees[r]` the `[n+1, n+1]`
    ancestor-or-self matrix of request r's query (root + n nodes), for tree requests only.
    Other requests attend causally.
    """
    num_reqs = len(num_computed)
    q_lens = [query_start_loc[r + 1] - query_start_loc[r] for r in range(num_reqs)]
    seq_lens = [num_computed[r] + q_lens[r] for r in range(num_reqs)]
    q_max, l_max = max(q_lens), max(seq_lens)
    query_index = torch.zeros(num_reqs, q_max, dtype=torch.long)
    query_valid = torch.zeros(num_reqs, q_max, dtype=torch.bool)
    key_slots = torch.zeros(num_reqs, l_max, dtype=torch.long)
    mask = torch.zeros(num_reqs, q_max, l_max, dtype=torch.bool)
    pos = torch.arange(l_max)
    for r in range(num_reqs):
        ql, nc, sl = q_lens[r], num_computed[r], seq_lens[r]
        start = query_start_loc[r]
        query_index[r, :ql] = torch.arange(start, start + ql)
        query_index[r, ql:] = start
        query_valid[r, :ql] = True
        p = pos[:sl]
        key_slots[r, :sl] = block_rows[r, p // block_size].long() * block_size + p % block_size
        mask[r, :, :nc] = True
        inner = trees.get(r)
        if inner is None:
            inner = torch.ones(ql, ql, dtype=torch.bool).tril()
        mask[r, :ql, nc:sl] = inner
        mask[r, ql:, 0] = True  # padding rows: any key, so SDPA stays finite
    return TreeStep(query_index, query_valid, key_slots, mask)
