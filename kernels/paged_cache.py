"""Paged KV cache: a block pool per layer, a block allocator, per-sequence block tables.

Layout and vocabulary follow vLLM so the same kernels can read vLLM's cache:
each layer owns a key pool and a value pool of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``t`` of a sequence
lives in physical block ``block_table[t // block_size]`` at offset
``t % block_size``, i.e. in flat slot ``block * block_size + offset``
(``slot_mapping``). Slot ``-1`` means "write nothing" (vLLM's padding value).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than a request needs; nothing was allocated."""

    def __init__(self, requested: int, free: int) -> None:
        super().__init__(f"requested {requested} KV blocks but only {free} are free")
        self.requested = requested
        self.free = free


class BlockAllocator:
    """Free list plus reference counts over ``num_blocks`` physical blocks.

    A block is owned by whoever holds a reference; it returns to the free list
    when its count drops to zero. ``fork`` adds a reference so that two block
    tables can share a prefix (copy-on-write is the caller's business).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        # Popping from the end hands out low block ids first, which keeps small
        # workloads in a compact region of the pool (friendlier to the L2).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref_counts: list[int] = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def allocate(self, n: int = 1) -> list[int]:
        """Take ``n`` free blocks, all or none (raises ``OutOfBlocks``)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocks(n, len(self._free))
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def fork(self, blocks: Sequence[int]) -> None:
        """Add one reference to each block (already allocated)."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
        for b in blocks:
            self._ref_counts[b] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; blocks at zero become free again."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"block {b} is already free")
        for b in blocks:
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)


@dataclass(slots=True)
class SequenceBlocks:
    """The logical-to-physical map of one sequence and how many tokens it holds."""

    block_table: list[int] = field(default_factory=list)
    num_tokens: int = 0


class PagedKVCache:
    """Block pools of all layers plus the block tables of the live sequences.

    ``key_cache[layer]`` and ``value_cache[layer]`` are the vLLM-layout pools
    ``[num_blocks, block_size, num_kv_heads, head_dim]``; all layers share one
    block table per sequence (one allocation covers every layer), and are views
    of one ``[num_layers, num_blocks, ...]`` tensor so a kernel can touch all
    layers in one launch (KV compaction does).
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str = "cpu",
    ) -> None:
        if block_size <= 0 or num_layers <= 0 or num_kv_heads <= 0 or head_dim <= 0:
            raise ValueError("cache dimensions must be positive")
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.key_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.value_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.allocator = BlockAllocator(num_blocks)
        self.sequences: dict[Hashable, SequenceBlocks] = {}

    # --- sequence lifetime -------------------------------------------------

    def add_sequence(self, seq_id: Hashable) -> None:
        if seq_id in self.sequences:
            raise KeyError(f"sequence {seq_id!r} already exists")
        self.sequences[seq_id] = SequenceBlocks()

    def free_sequence(self, seq_id: Hashable) -> None:
        seq = self.sequences.pop(seq_id)
        self.allocator.free(seq.block_table)

    def fork_sequence(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Share all of the parent's blocks with a new sequence (prefix sharing)."""
        parent = self.sequences[parent_id]
        if child_id in self.sequences:
            raise KeyError(f"sequence {child_id!r} already exists")
        self.allocator.fork(parent.block_table)
        self.sequences[child_id] = SequenceBlocks(list(parent.block_table), parent.num_tokens)

    # --- growth and shrinking ------------------------------------------------

    def num_blocks_needed(self, seq_id: Hashable, num_tokens: int) -> int:
        have = len(self.sequences[seq_id].block_table)
        return max(0, -(-num_tokens // self.block_size) - have)

    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        """Make room for ``num_tokens`` tokens in total (raises ``OutOfBlocks``, atomically)."""
        need = self.num_blocks_needed(seq_id, num_tokens)
        if need:
            self.sequences[seq_id].block_table.extend(self.allocator.allocate(need))

    def append_slots(self, seq_id: Hashable, num_new_tokens: int) -> torch.Tensor:
        """Reserve ``num_new_tokens`` more tokens and return their slot mapping."""
        seq = self.sequences[seq_id]
        start = seq.num_tokens
        self.reserve(seq_id, start + num_new_tokens)
        seq.num_tokens = start + num_new_tokens
        return self.slot_mapping(seq_id, start, start + num_new_tokens)

    def truncate(self, seq_id: Hashable, num_tokens: int) -> None:
        """Keep the first ``num_tokens`` tokens (dropping rejected drafts); free spare blocks."""
        seq = self.sequences[seq_id]
        if not 0 <= num_tokens <= seq.num_tokens:
            raise ValueError(f"cannot truncate {seq.num_tokens} tokens to {num_tokens}")
        seq.num_tokens = num_tokens
        keep = -(-num_tokens // self.block_size)
        spare = seq.block_table[keep:]
        del seq.block_table[keep:]
        self.allocator.free(spare)

    # --- index tensors for the kernels ---------------------------------------

    def slot_mapping(self, seq_id: Hashable, start: int, end: int) -> torch.Tensor:
        """Flat slots of token positions ``[start, end)`` of one sequence (int64)."""
        table = self.sequences[seq_id].block_table
        if end > len(table) * self.block_size or start < 0 or start > end:
            raise IndexError(f"positions [{start}, {end}) are not reserved")
        pos = torch.arange(start, end)
        blocks = torch.tensor(table, dtype=torch.long)[pos // self.block_size]
        return (blocks * self.block_size + pos % self.block_size).to(self.device)

    def block_tables(self, seq_ids: Sequence[Hashable], max_blocks: int | None = None) -> torch.Tensor:
        """``[len(seq_ids), max_blocks]`` int32, padded with 0 (never read past a sequence's end)."""
        tables = [self.sequences[s].block_table for s in seq_ids]
        width = max_blocks if max_blocks is not None else max((len(t) for t in tables), default=0)
        out = torch.zeros((len(tables), max(width, 1)), dtype=torch.int32)
        for i, t in enumerate(tables):
            if len(t) > width:
                raise ValueError(f"block table of {len(t)} blocks exceeds max_blocks={width}")
            out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        return out.to(self.device)

    def seq_lens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        return torch.tensor(
            [self.sequences[s].num_tokens for s in seq_ids], dtype=torch.int32, device=self.device
        )
