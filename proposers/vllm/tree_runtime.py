"""What the runner and the tree-attention impls (CPU and GPU) share within a step.

The per-step tree description travels runner -> attention impl through `RUNTIME.step`, a
module global of the worker process, because vLLM's `CommonAttentionMetadata` has no slot
for it. The step is a `tree_attention.TreeStep` on CPU and a `kernels.tree_step.
KernelTreeStep` on CUDA; both carry a `stash` list, which the impls' `do_kv_cache_update`
fills (`stash_kv`) and `compact_kv` consumes. Also the backend-registry override and the
unsupported-feature refusal both impls use.
"""

from __future__ import annotations

import torch


class _Runtime:
    step = None  # TreeStep | KernelTreeStep | None


RUNTIME = _Runtime()


def stash_kv(impl, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
             num_tokens: int, copy: bool = False) -> None:
    """Keep a layer's K/V rows `[:num_tokens]` of the current tree step for `compact_kv`
    (nothing outside tree steps, or once compaction has started). `copy` where the
    tensors may be reused before the step ends (CUDA-graph memory pools)."""
    step = RUNTIME.step
    if step is None or step.stash is None:
        return
    key, value = key[:num_tokens], value[:num_tokens]
    if copy:
        key, value = key.clone(), value.clone()
    step.stash.append((impl, layer, key, value, kv_cache))


def compact_kv(step, src_rows: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Rewrite the KV of flat token rows `src_rows` into `dst_slots`, in every layer.

    Sources are the K/V each layer computed this step (already RoPE'd at the node's depth
    position, which equals the destination position), written through the layer's own
    `do_kv_cache_update`, i.e. the kernel's layout (plus, on CPU, the layer's mirror, if
    any).
    """
    stash, step.stash = step.stash, None  # the rewrite itself must not be stashed
    for impl, layer, key, value, kv_cache in stash or ():
        impl.do_kv_cache_update(layer, key[src_rows], value[src_rows], kv_cache, dst_slots)


def override_backend(name: str, path: str) -> None:
    """Point vLLM's attention backend `name` (e.g. "CPU_ATTN") at `path` (idempotent;
    before any model is built: layers resolve their backend class when constructed)."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    backend = AttentionBackendEnum[name]
    if backend.get_path() != path:
        register_backend(backend, path)


def backend_overridden(name: str, path: str) -> bool:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[name].get_path() == path


def refuse_unsupported(platform: str, unsupported: dict[str, bool], decoder: bool) -> None:
    """Raise for the features a decoder layer uses that tree attention lacks."""
    bad = [name for name, on in unsupported.items() if on]
    if bad and decoder:
        raise NotImplementedError(
            f"TR-Jacobi tree attention on {platform} does not support {', '.join(bad)}"
        )
