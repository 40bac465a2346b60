"""Causal prefill attention: PyTorch SDPA, by choice.

Why no Triton kernel here:

* A prompt's queries, keys and values are all fresh and contiguous (the
  projection just produced them), so nothing needs the paged layout until the
  K/V are stored with ``kv_write`` afterwards.
* Prefill is compute-bound (every query meets every earlier key), the regime
  where SDPA's FlashAttention-2 / cuDNN backends on Hopper are tuned far beyond
  what a small hand-written kernel reaches, and on CPU SDPA has a fused
  flash kernel as well. ``flex_attention`` would add a ``torch.compile`` per
  shape for a mask SDPA already expresses with ``is_causal``.
* A prompt chunk that lands on top of an existing paged prefix (chunked
  prefill, or a prompt sharing a cached prefix) is the causal special case of
  ``tree_attention`` (``tree_mask=None``), which reads the prefix in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Causal self-attention of one prompt: ``[seq, heads, dim]`` / ``[seq, kv_heads, dim]`` in and out."""
    assert query.dim() == 3 and key.shape == value.shape and key.shape[0] == query.shape[0]
    assert query.shape[1] % key.shape[1] == 0 and query.shape[2] == key.shape[2]
    out = F.scaled_dot_product_attention(
        query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
        is_causal=True, scale=scale, enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(0, 1)
