"""KV compaction: after verification, move the accepted path's K/V next to the prefix.

A verify step wrote the root and all tree nodes at positions
``prefix_len + node`` (node 0 = root). The accepted path ``root, n_1, .., n_k``
must end up at ``prefix_len + 0..k`` because node ``n_d`` was computed with
RoPE position ``prefix_len + d`` (algorithm.md section 4); the rest is dropped by
shrinking the sequence.

The copies of one sequence are done in increasing depth by one program: in
BFS order ``n_d >= d``, and every later source ``n_e`` (e > d) is strictly
greater than ``n_d >= d``, so no move overwrites a row a later move still has to
read, while running them concurrently could (path ``0, 2, 3`` moves row 2 to 1,
then row 3 to 2). Sequences, layers and pools are independent, so they are
spread over the grid; all layers are moved in one launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_compact_kernel(
    key_cache_ptr, value_cache_ptr, src_ptr, dst_ptr,
    stride_layer, stride_slot, stride_moves,
    max_moves, ROW: tl.constexpr, BLOCK: tl.constexpr,
):
    seq = tl.program_id(0)
    layer = tl.program_id(1).to(tl.int64)
    is_value = tl.program_id(2)
    if is_value == 1:
        base = value_cache_ptr + layer * stride_layer
    else:
        base = key_cache_ptr + layer * stride_layer
    e = tl.arange(0, BLOCK)
    e_ok = e < ROW
    for i in range(max_moves):
        src = tl.load(src_ptr + seq * stride_moves + i).to(tl.int64)
        dst = tl.load(dst_ptr + seq * stride_moves + i).to(tl.int64)
        if (src >= 0) & (dst >= 0) & (src != dst):
            row = tl.load(base + src * stride_slot + e, mask=e_ok)
            tl.store(base + dst * stride_slot + e, row, mask=e_ok)
        # The next move may read the row just written (by other threads of this program).
        tl.debug_barrier()


def _as_layers(cache: torch.Tensor) -> torch.Tensor:
    return cache if cache.dim() == 5 else cache.unsqueeze(0)


def kv_compact(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
) -> None:
    """Copy slot ``src_slots[b, i]`` to ``dst_slots[b, i]`` for ``i = 0, 1, ..`` in order, in place.

    Pools: one layer ``[num_blocks, block_size, num_kv_heads, head_dim]`` or all
    layers ``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]``.
    ``src_slots``/``dst_slots`` ``[num_seqs, max_moves]`` integer, ``-1`` pads.
    """
    key_cache, value_cache = _as_layers(key_cache), _as_layers(value_cache)
    assert key_cache.shape == value_cache.shape and key_cache.stride() == value_cache.stride()
    num_layers, _, block_size, num_kv_heads, head_dim = key_cache.shape
    row = num_kv_heads * head_dim
    # A slot is one dense [num_kv_heads, head_dim] row inside a layer.
    assert key_cache.stride(4) == 1 and key_cache.stride(3) == head_dim
    assert key_cache.stride(2) == row and key_cache.stride(1) == block_size * row
    assert src_slots.shape == dst_slots.shape and src_slots.dim() == 2
    assert src_slots.stride(1) == 1 and dst_slots.stride(1) == 1
    assert src_slots.stride(0) == dst_slots.stride(0)
    num_seqs, max_moves = src_slots.shape
    if num_seqs == 0 or max_moves == 0:
        return
    _kv_compact_kernel[(num_seqs, num_layers, 2)](
        key_cache, value_cache, src_slots, dst_slots,
        key_cache.stride(0), row, src_slots.stride(0),
        max_moves, ROW=row, BLOCK=triton.next_power_of_2(row),
    )


def kv_compact_reference(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
) -> None:
    """Plain-PyTorch ``kv_compact``."""
    for cache in (_as_layers(key_cache), _as_layers(value_cache)):
        flat = cache.flatten(1, 2)  # [num_layers, num_slots, num_kv_heads, head_dim], a view
        for b in range(src_slots.shape[0]):
            for src, dst in zip(src_slots[b].tolist(), dst_slots[b].tolist()):
                if src >= 0 and dst >= 0 and src != dst:
                    flat[:, dst] = flat[:, src].clone()


def compaction_slots(
    block_tables: torch.Tensor,
    prefix_lens: torch.Tensor,
    accepted_nodes: torch.Tensor,
    block_size: int,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Source and destination slots that compact each sequence's accepted path.

    ``accepted_nodes[b, d - 1]`` is the query-row index (root = 0) of the accepted
    node at depth ``d``, ``-1`` past the accepted length; ``prefix_lens[b]`` is
    the number of tokens before the root. With ``validate=False`` it is pure
    tensor ops without host syncs, so it can be captured in a CUDA graph.
    """
    depth = torch.arange(1, accepted_nodes.shape[1] + 1, device=accepted_nodes.device)
    prefix = prefix_lens.to(torch.long)[:, None]
    nodes = accepted_nodes.to(torch.long)
    valid = nodes >= 0
    if validate and bool((valid & (nodes < depth)).any()):
        raise ValueError("an accepted node's index is smaller than its depth: not in BFS order")

    def slots(pos: torch.Tensor) -> torch.Tensor:
        blocks = torch.gather(block_tables.long(), 1, (pos // block_size).clamp(min=0))
        return blocks * block_size + pos % block_size

    # Padding entries point at position 0, which every block table holds.
    src = torch.where(valid, slots(torch.where(valid, prefix + nodes, 0)), -1)
    dst = torch.where(valid, slots(torch.where(valid, prefix + depth, 0)), -1)
    return src.contiguous(), dst.contiguous()
