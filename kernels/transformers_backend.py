"""Our paged cache and tree-attention kernel behind a Hugging Face ``transformers`` model.

Two pieces, used together:

* ``PagedTreeCache``: what the model gets as ``past_key_values``. It has the
  interface of the reference runner's ``StaticKVCache`` (``slots``, ``kv_len``,
  ``update``, ``compact``, ``for_model``) so the runner can swap it in, but the
  K/V live in a ``PagedKVCache`` block pool (vLLM layout) and are written by the
  ``kv_write`` kernel and moved by ``kv_compact``.
* An attention function registered with ``transformers.AttentionInterface``
  (``ATTN_IMPLEMENTATIONS``) that reads the pool through the block table with
  ``tree_attention``.

transformers hands an attention function neither the cache nor any metadata of
ours, only the layer module, Q/K/V and the mask. Every attention layer calls
``cache.update`` immediately before its attention function, so the cache makes
itself the *active* cache there (a context variable) and the attention function
reads it back, the way vLLM's forward context works.

The runner keeps passing its explicit boolean mask; the tree part of it (the
query rows' own columns, which are the write slots) is packed once per forward
into the kernel's ancestor bitmask, on the device, so it is also valid inside a
captured CUDA graph. A prompt prefill (empty prefix, causal mask, eager) runs
SDPA on the fresh K/V instead (see ``kernels/prefill.py``). The reference runner
prefills without this cache (an SDPA twin of the model into a static cache, then
``write_prompt``), so its compiled prefill is one graph; graph steps hand the cache
the tree's bitmask ready-packed (``tree_bits``).

One sequence at a time (the reference runner decodes batch 1); the kernels
underneath are batched.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch

from kernels.kv_compact import kv_compact, kv_compact_reference
from kernels.kv_write import kv_write, kv_write_reference
from kernels.paged_cache import PagedKVCache
from kernels.prefill import prefill_attention
from kernels.tree_attention import tree_attention, tree_attention_reference

# Runner option -> name registered with transformers' AttentionInterface.
ATTN_IMPLEMENTATIONS = {"paged-triton": "msn_paged_triton", "paged-torch": "msn_paged_torch"}

_active_cache: contextvars.ContextVar[PagedTreeCache | None] = contextvars.ContextVar(
    "msn_active_paged_cache", default=None
)


@dataclass(slots=True)
class _StepMeta:
    """Kernel arguments shared by all layers of one forward."""

    cu_seqlens_q: torch.Tensor
    seq_lens: torch.Tensor
    tree_mask: torch.Tensor | None
    max_query_len: int
    max_seq_len: int
    prefill: bool


class PagedTreeCache:
    """A one-sequence KV cache over a paged block pool, driven like ``StaticKVCache``.

    The runner sets ``slots`` (logical positions written by this forward; the
    root and tree nodes sit in consecutive positions right after the prefix)
    and ``kv_len`` (keys visible to this forward, or None for the static CUDA
    graph shape) before each forward. ``key_bound`` (when set) bounds the keys any
    forward of the static shape reads, for the kernel's launch shape: a CUDA graph
    captured for prefixes up to some length launches for that length, not for the
    whole capacity.
    """

    is_compileable = True

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str, *, use_triton: bool = True,
                 block_size: int = 16):
        self.capacity = capacity
        self.use_triton = use_triton
        num_blocks = -(-capacity // block_size)
        self.paged = PagedKVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim,
                                  dtype=dtype, device=device)
        self.paged.add_sequence(0)
        self.paged.reserve(0, capacity)
        self.block_table = self.paged.block_tables([0])  # [1, num_blocks] int32
        self.block_size = block_size
        # Logical position -> flat pool slot, for the whole reservation (the table never
        # changes): one gather per forward instead of the block arithmetic per layer.
        positions = torch.arange(num_blocks * block_size, device=self.block_table.device)
        table = self.block_table[0].long()
        self._slot_of = table[positions // block_size] * block_size + positions % block_size
        self.device = torch.device(device)
        self.slots = torch.zeros(0, dtype=torch.long, device=self.device)
        self.kv_len: int | None = None
        self.key_bound: int | None = None
        # The kernel's tree bitmask for the forwards to come, when the caller packed it
        # already (the runner's graph steps: per tree, on the host); else it is packed
        # from the attention mask every forward.
        self.tree_bits: torch.Tensor | None = None
        self._meta: _StepMeta | None = None
        self._write_slots: torch.Tensor | None = None  # physical slots of this forward's rows
        self._fresh: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def for_model(cls, config, capacity: int, dtype: torch.dtype, device, *,
                  use_triton: bool = True) -> PagedTreeCache:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim, capacity,
                   dtype, device, use_triton=use_triton)

    # --- what transformers calls ------------------------------------------------

    # Python state and Triton launches: a compiled model (the runner's `compile_steps`)
    # calls this and the attention function eagerly, between its compiled pieces.
    @torch.compiler.disable
    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        assert key.shape[0] == 1, "PagedTreeCache holds one sequence"
        if layer_idx == 0 or self._write_slots is None:
            # A new forward begins: what every layer shares is derived once (a small
            # model's captured step is bound by its kernel count).
            self._meta = None
            self._write_slots = self.physical_slots(self.slots)
        _active_cache.set(self)
        k = key[0].transpose(0, 1)  # [q, num_kv_heads, head_dim], head_dim contiguous
        v = value[0].transpose(0, 1)
        write = kv_write if self.use_triton else kv_write_reference
        write(k, v, self.paged.key_cache[layer_idx], self.paged.value_cache[layer_idx],
              self._write_slots)
        self._fresh = (key, value)
        return key, value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len or 0

    # --- what the runner calls ----------------------------------------------------

    def physical_slots(self, positions: torch.Tensor) -> torch.Tensor:
        return self._slot_of[positions.to(self.device).long()]

    def write_prompt(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a prompt's K/V, ``[num_layers, 1, num_kv_heads, n, head_dim]`` (a
        ``StaticKVCache``'s tensors), at positions ``0..n-1`` of every layer: one copy
        each for K and V."""
        n = keys.shape[3]
        slots = self._slot_of[:n]
        for pool, new in ((self.paged.key_cache, keys), (self.paged.value_cache, values)):
            flat = pool.view(pool.shape[0], -1, *pool.shape[-2:])  # [layers, slots, heads, dim]
            flat[:, slots] = new[:, 0].transpose(1, 2).to(pool.dtype)

    def compact(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move accepted rows from positions ``src`` to ``dst`` (increasing, BFS order), all layers."""
        if not src.numel():
            return
        src_slots = self.physical_slots(src).view(1, -1).contiguous()
        dst_slots = self.physical_slots(dst).view(1, -1).contiguous()
        move = kv_compact if self.use_triton else kv_compact_reference
        move(self.paged.key_cache, self.paged.value_cache, src_slots, dst_slots)

    def compact_path(self, prefix: torch.Tensor, nodes: torch.Tensor) -> None:
        """``compact`` for one step's accepted nodes (``-1`` pads) after the one-element
        ``prefix``, without host syncs on the Triton path (captured in the next step's graph)."""
        # `compaction_slots` for this one sequence, through the position->slot map
        # (fewer kernels in every captured step).
        nodes = nodes.view(-1).long()
        valid = nodes >= 0
        depth = torch.arange(1, nodes.numel() + 1, device=nodes.device)
        src = torch.where(valid, self._slot_of[torch.where(valid, prefix + nodes, 0)], -1)
        dst = torch.where(valid, self._slot_of[torch.where(valid, prefix + depth, 0)], -1)
        src, dst = src.view(1, -1), dst.view(1, -1)
        move = kv_compact if self.use_triton else kv_compact_reference
        move(self.paged.key_cache, self.paged.value_cache, src, dst)

    # --- what the attention function calls -----------------------------------------

    def step_meta(self, attention_mask: torch.Tensor | None) -> _StepMeta:
        if self._meta is None:
            self._meta = self._build_meta(attention_mask)
        return self._meta

    def _build_meta(self, attention_mask: torch.Tensor | None) -> _StepMeta:
        q = self.slots.numel()
        slots = self.slots.to(self.device).long()
        seq_lens = (slots[-1:] + 1).to(torch.int32)
        # Built on the device: this runs inside CUDA-graph capture, where host copies are illegal.
        cu = torch.arange(2, dtype=torch.int32, device=self.device) * q
        if self.kv_len is not None:
            max_seq_len = self.kv_len
        else:
            max_seq_len = min(self.key_bound or self.capacity, self.capacity)
        if self.tree_bits is not None:
            return _StepMeta(cu, seq_lens, self.tree_bits, q, max_seq_len, prefill=False)
        if attention_mask is None:
            return _StepMeta(cu, seq_lens, None, q, max_seq_len, prefill=False)
        mask = attention_mask.reshape(attention_mask.shape[-2:])
        assert mask.dtype == torch.bool, "the paged backend expects the runner's boolean mask"
        tree = mask[:, slots]  # [q, q]: each query row's view of the query rows
        prefill = False
        if self.kv_len is not None and self.kv_len == q and q > 1:
            # Eager only (reads a value back): a prompt with no cached prefix.
            prefill = bool(torch.equal(tree, torch.ones_like(tree).tril()))
        words = -(-q // 32)
        padded = torch.zeros((q, words * 32), dtype=torch.long, device=self.device)
        padded[:, :q] = tree.long()
        bits = (padded.view(q, words, 32) << torch.arange(32, device=self.device)).sum(-1)
        tree_mask = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
        return _StepMeta(cu, seq_lens, tree_mask, q, max_seq_len, prefill)


@torch.compiler.disable
def paged_tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query`` ``[1, heads, q, dim]`` -> ``[1, q, heads, dim]``."""
    cache = _active_cache.get()
    if cache is None:
        raise RuntimeError("the paged attention backend needs a PagedTreeCache as past_key_values")
    assert query.shape[0] == 1 and dropout == 0.0
    meta = cache.step_meta(attention_mask)
    q = query[0].transpose(0, 1)  # [q, heads, dim]
    if meta.prefill:
        fresh_k, fresh_v = cache._fresh
        out = prefill_attention(q, fresh_k[0].transpose(0, 1), fresh_v[0].transpose(0, 1), scaling)
        return out.unsqueeze(0), None
    layer = module.layer_idx
    args = (q, cache.paged.key_cache[layer], cache.paged.value_cache[layer], cache.block_table,
            meta.cu_seqlens_q, meta.seq_lens, meta.tree_mask)
    if cache.use_triton:
        # Written contiguous [q, heads, dim]: transformers then flattens the heads as a
        # view (an output shaped like the transposed query would cost a copy per layer).
        out = tree_attention(*args, max_query_len=meta.max_query_len,
                             max_seq_len=meta.max_seq_len, scale=scaling,
                             out=torch.empty(q.shape, dtype=q.dtype, device=q.device))
    else:
        out = tree_attention_reference(*args, scale=scaling)
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Register both backends with transformers (idempotent)."""
    from transformers import AttentionInterface

    for name in ATTN_IMPLEMENTATIONS.values():
        AttentionInterface.register(name, paged_tree_attention_forward)


def use_paged_attention(model, backend: str = "paged-triton"):
    """Switch ``model`` to our attention; returns a ``for_model``-style cache factory."""
    if backend not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"backend must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {backend!r}")
    register_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATIONS[backend])
    use_triton = backend == "paged-triton"

    def make_cache(config, capacity, dtype, device) -> PagedTreeCache:
        return PagedTreeCache.for_model(config, capacity, dtype, device, use_triton=use_triton)

    return make_cache
