"""vLLM general-plugin entry point (`vllm.general_plugins` group, see pyproject.toml).

vLLM calls `register()` in every process it starts (engine core, workers, API server)
before the model is built. It must be idempotent and cheap, and it must never break plain
vLLM: an untested vLLM version only logs here; using the plugin then fails loudly
(`check_vllm_version` in the proposer and worker).

The tree-attention backend replaces vLLM's process-global `CPU_ATTN` entry (on CPU) or
`TRITON_ATTN` entry (on CUDA: tree_attention_gpu.py, never run in an engine), so it is
registered only when `MSN_TRJACOBI_TREE_ATTN=1` (set by `engine_kwargs`). The TR-Jacobi
worker also registers it itself before it builds the model, so a worker never runs
trees on the stock kernel.
"""

from __future__ import annotations

import logging
import os

from proposers.vllm.version import UnsupportedVLLMError, check_vllm_version

ENV_TREE_ATTN = "MSN_TRJACOBI_TREE_ATTN"
logger = logging.getLogger(__name__)


def register() -> None:
    try:
        check_vllm_version()
    except UnsupportedVLLMError as exc:
        logger.error("%s", exc)
        return
    if os.environ.get(ENV_TREE_ATTN) != "1":
        return
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        from proposers.vllm.tree_attention_gpu import register_tree_triton_backend

        register_tree_triton_backend()
    else:
        from proposers.vllm.tree_attention import register_tree_backend

        register_tree_backend()
