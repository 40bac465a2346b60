"""KV write: scatter new key/value rows into the paged pools by ``slot_mapping``."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cs, stride_ch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token: all heads of a token go to one contiguous
    # [num_kv_heads, head_dim] row of the pool, so the store is one wide burst.
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
        k = tl.load(key_ptr + token * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(value_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
        dst = slot * stride_cs + h * stride_ch + d
        tl.store(key_cache_ptr + dst, k.to(key_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(value_cache_ptr + dst, v.to(value_cache_ptr.dtype.element_ty), mask=mask)


def kv_write(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into slots.

    ``key_cache``/``value_cache`` are one layer's pools ``[num_blocks, block_size,
    num_kv_heads, head_dim]``; ``slot_mapping`` ``[num_tokens]`` holds flat slots,
    ``-1`` to skip a token (padding).
    """
    assert key.dim() == 3 and key.shape == value.shape, (key.shape, value.shape)
    assert key_cache.dim() == 4 and key_cache.shape == value_cache.shape
    num_tokens, num_kv_heads, head_dim = key.shape
    assert key_cache.shape[2:] == (num_kv_heads, head_dim), (key_cache.shape, key.shape)
    assert slot_mapping.shape == (num_tokens,), slot_mapping.shape
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "head_dim must be contiguous"
    # Slots are flattened over (block, offset), which needs the pool dense in those dims.
    for cache in (key_cache, value_cache):
        assert cache.stride(3) == 1 and cache.stride(2) == head_dim, cache.stride()
        assert cache.stride(1) == num_kv_heads * head_dim, cache.stride()
        assert cache.stride(0) == cache.shape[1] * cache.stride(1), cache.stride()
    assert key_cache.stride() == value_cache.stride()
    if num_tokens == 0:
        return
    _kv_write_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(1), key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


def kv_write_reference(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Plain-PyTorch ``kv_write``."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    num_kv_heads, head_dim = key_cache.shape[2:]
    key_cache.view(-1, num_kv_heads, head_dim)[slots] = key[keep].to(key_cache.dtype)
    value_cache.view(-1, num_kv_heads, head_dim)[slots] = value[keep].to(value_cache.dtype)
