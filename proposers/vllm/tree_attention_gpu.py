"""CUDA attention with a tree mask, as an override of vLLM 0.32's `TRITON_ATTN` backend.

On steps without a draft tree, `TreeTritonAttentionImpl.forward` is vLLM's own Triton
forward (`unified_attention`), unchanged. On a tree step the runner publishes a
`kernels.tree_step.KernelTreeStep` in `tree_runtime.RUNTIME`, and every decoder layer runs
our Triton kernel (`kernels.tree_attention.tree_attention`, paged, ancestor bitmask) for
all query rows of the step in one launch: tree requests with their tree's ancestors,
every other request (plain decode, chain drafts, prefill chunks) with a causal bitmask.
vLLM's `unified_attention(qq_bias=...)` was not used: its bias is one `[Q, Q]` matrix for
the whole launch, so it cannot mix per-request trees with prefill rows
(vllm-integration.md section 4).

vLLM's attention layer writes the step's K/V (`unified_kv_cache_update` ->
`do_kv_cache_update`, vLLM's own Triton writer) before it calls `forward`
(`unified_attention_with_output`), so the kernel reads the tree rows from the cache like
the prefix. During tree steps `do_kv_cache_update` also stashes each layer's K/V for the
runner's KV compaction (`tree_runtime.compact_kv`, the same code as on CPU), which then
rewrites the accepted path's rows through the same writer. The stash copies K/V: under
piecewise CUDA graphs they live in the graph memory pool, which the next layer's graph
piece reuses.

Both the attention forward and the KV write are splitting ops of vLLM's piecewise
compilation (eager, outside CUDA graphs), so `engine_kwargs` selects `TRITON_ATTN` and
caps CUDA graphs at `PIECEWISE` on CUDA; a full graph would replay the stock kernel.

What was run: the kernel-step builder and the kernel on this layout (CPU under
`TRITON_INTERPRET=1`: tests/test_vllm_tree_triton.py; GPU at realistic sizes:
tests/test_tree_step_gpu.py), and this impl's forward / stash / compaction on CPU with a
hand-built `TritonAttentionMetadata`. Never run: this backend inside a vLLM engine on a
GPU (no GPU build of vLLM exists on our machines).
"""

from __future__ import annotations

from vllm.utils.torch_utils import is_quantized_kv_cache
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.triton_attn import (
    TritonAttentionBackend,
    TritonAttentionImpl,
)

from kernels.tree_step import KernelTreeStep, run_kernel_tree_step, triton_layout_kv
from proposers.vllm.tree_runtime import (
    RUNTIME,
    backend_overridden,
    override_backend,
    refuse_unsupported,
    stash_kv,
)

BACKEND_PATH = "proposers.vllm.tree_attention_gpu.TreeTritonAttentionBackend"


def register_tree_triton_backend() -> None:
    """Point `TRITON_ATTN` at our subclass (idempotent; before any model is built)."""
    override_backend("TRITON_ATTN", BACKEND_PATH)


def tree_triton_backend_registered() -> bool:
    return backend_overridden("TRITON_ATTN", BACKEND_PATH)


class TreeTritonAttentionBackend(TritonAttentionBackend):
    @staticmethod
    def get_impl_cls() -> type[TreeTritonAttentionImpl]:
        return TreeTritonAttentionImpl


class TreeTritonAttentionImpl(TritonAttentionImpl):
    def _decoder(self) -> bool:
        return self.attn_type == AttentionType.DECODER

    def check_tree_support(self) -> None:
        """Refuse what our kernel does not implement (the runner calls this at load)."""
        refuse_unsupported("CUDA", {
            "sliding window": tuple(self.sliding_window) != (-1, -1),
            "ALiBi": self.alibi_slopes is not None,
            "logits soft-cap": bool(self.logits_soft_cap),
            "attention sinks": self.sinks is not None,
            "quantized KV cache": (is_quantized_kv_cache(self.kv_cache_dtype)
                                   or self._is_per_token_head_quant),
            "chunked attention with lookback": self.chunk_lookback > -1,
        }, self._decoder())

    def fused_output_quant_supported(self, quant_key) -> bool:
        return False  # tree steps write plain outputs

    def fused_rope_kvcache_supported(self) -> bool:
        return False  # the fused path bypasses do_kv_cache_update (no stash)

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        step = RUNTIME.step
        if self._decoder() and isinstance(step, KernelTreeStep):
            stash_kv(self, layer, key, value, kv_cache, step.num_tokens, copy=True)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        step = RUNTIME.step
        if step is None or attn_metadata is None or not self._decoder():
            return super().forward(layer, query, key, value, kv_cache, attn_metadata,
                                   output, output_scale, output_block_scale)
        if not isinstance(step, KernelTreeStep):
            raise TypeError(f"TR-Jacobi tree step of type {type(step).__name__} on the "
                            "CUDA tree backend (expected a KernelTreeStep)")
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("TR-Jacobi tree attention: fused output quantization")
        if attn_metadata.mm_prefix_range_tensor is not None:
            raise NotImplementedError("TR-Jacobi tree attention: multimodal prefix ranges")
        if attn_metadata.rswa_window is not None:
            raise NotImplementedError("TR-Jacobi tree attention: R-SWA layers")
        if attn_metadata.num_actual_tokens != step.num_tokens:
            raise RuntimeError(
                f"TR-Jacobi tree step of {step.num_tokens} tokens, but vLLM's attention "
                f"metadata has {attn_metadata.num_actual_tokens}")
        key_cache, value_cache = triton_layout_kv(kv_cache, self.head_size)
        return run_kernel_tree_step(step, query, key_cache, value_cache,
                                    attn_metadata.block_table, self.scale, output)
