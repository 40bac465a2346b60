"""TR-Jacobi tree self-speculation as a vLLM plugin (vLLM 0.32, CPU build).

Enable it with `vllm.LLM(model, **engine_kwargs())`: a `custom_class` speculative
proposer (`TRJacobiProposer`), the worker/runner that verifies trees
(`runner.TRJacobiWorker`) and a tree-mask attention backend registered through the
`vllm.general_plugins` entry point (`plugin.register`). See
../shared/docs/vllm-integration.md for the extension points used.

A CUDA path exists as well (`runner.TRJacobiGPUWorker`, `tree_attention_gpu.py`: our
Triton tree kernel behind vLLM's `TRITON_ATTN` backend, docs/vllm-integration-gpu.md).
Its pieces are tested; it has never run inside a vLLM engine (no GPU build of vLLM here).
"""

from proposers.vllm.version import check_vllm_version

check_vllm_version()

from proposers.vllm.config import TRJacobiConfig, engine_kwargs
from proposers.vllm.proposer import TRJacobiProposer

__all__ = ["TRJacobiConfig", "TRJacobiProposer", "check_vllm_version", "engine_kwargs"]
