"""The reference runner on our paged cache and kernels, until the runner grows an option for it.

The only runner-side change the paged backend needs is which cache ``_cache_for``
builds (and the attention implementation of the model); this subclass makes that
change from outside so benchmarks and tests can use it today.
"""

from __future__ import annotations

import torch

from kernels.transformers_backend import use_paged_attention
from proposers.reference.runner import ReferenceRunner


class PagedReferenceRunner(ReferenceRunner):
    """``ReferenceRunner`` with ``attn_backend`` ``paged-triton`` or ``paged-torch``.

    It switches ``model``'s attention implementation; give it its own copy of a
    model that another runner keeps using with SDPA.
    """

    def __init__(self, model, tokenizer, device: torch.device, *, attn_backend: str = "paged-triton",
                 **kwargs):
        self._make_cache = use_paged_attention(model, attn_backend)
        self.attn_backend = attn_backend
        super().__init__(model, tokenizer, device, **kwargs)

    def _cache_for(self, capacity: int):
        if self.use_cuda_graphs:
            if capacity > self.graph_capacity:
                raise ValueError(f"request needs {capacity} cache slots; the CUDA-graph cache "
                                 f"holds {self.graph_capacity} (raise graph_capacity)")
            if self._graph_cache is None:
                self._graph_cache = self._make_cache(self.config, self.graph_capacity, self.dtype,
                                                     self.device)
            return self._graph_cache
        return self._make_cache(self.config, capacity, self.dtype, self.device)
