"""A static KV cache the reference runner drives directly.

transformers' attention layers call `update(key, value, layer_idx)`; we write the new
rows at the slots chosen for this forward (root + tree nodes sit in consecutive slots
after the prefix) and hand back every slot the step may see. Which of them a query
actually attends to is the runner's explicit mask, so rejected tree rows left behind in
the cache are harmless until they are overwritten.
"""

from __future__ import annotations

import copy

import torch


class StaticKVCache:
    is_compileable = True

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (num_layers, 1, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.slots = torch.zeros(0, dtype=torch.long, device=device)
        # Visible key length for this forward; None = the whole buffer (static shapes for
        # CUDA graphs, with the mask hiding what lies beyond the prefix).
        self.kv_len: int | None = None

    @classmethod
    def for_model(cls, config, capacity: int, dtype: torch.dtype, device) -> StaticKVCache:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim, capacity,
                   dtype, device)

    def prefix_view(self, n: int) -> StaticKVCache:
        """A cache over this one's first `n` slots: the same memory, capacity `n`."""
        view = copy.copy(self)
        view.keys, view.values = self.keys[:, :, :, :n], self.values[:, :, :, :n]
        view.capacity, view.kv_len = n, None
        return view

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        k, v = self.keys[layer_idx], self.values[layer_idx]
        k.index_copy_(2, self.slots, key.to(k.dtype))
        v.index_copy_(2, self.slots, value.to(v.dtype))
        if self.kv_len is None:
            return k, v
        return k[:, :, : self.kv_len], v[:, :, : self.kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.kv_len or 0

    def compact(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move accepted tree rows (slots `src`) to contiguous slots `dst`, all layers.

        The gather on the right-hand side completes before the scatter, so overlapping
        source and destination ranges are safe.
        """
        if src.numel():
            self.keys[:, :, :, dst] = self.keys[:, :, :, src]
            self.values[:, :, :, dst] = self.values[:, :, :, src]

    def compact_path(self, prefix: torch.Tensor, nodes: torch.Tensor) -> None:
        """`compact` for one step's accepted nodes, as tensor ops without host syncs (it
        runs inside the CUDA graph of the next step): row `prefix + nodes[i]` moves to
        `prefix + 1 + i`; `-1` pads. `prefix` is a one-element tensor."""
        valid = nodes >= 0
        depth = torch.arange(1, nodes.numel() + 1, device=nodes.device)
        # Pads copy the root's row onto itself (no valid move writes or reads it).
        src = torch.where(valid, prefix + nodes, prefix)
        dst = torch.where(valid, prefix + depth, prefix)
        self.keys[:, :, :, dst] = self.keys[:, :, :, src]
        self.values[:, :, :, dst] = self.values[:, :, :, src]
