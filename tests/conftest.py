"""Shared fixtures: the real default model, loaded once per session."""

from __future__ import annotations

import pytest

# Without CUDA, kernels/ switches Triton to its interpreter. That must happen before
# anything imports Triton (vLLM does, at import), or Triton's own @jit helpers (tl.cdiv,
# ...) stay compiled-only and interpreted kernels that call them fail.
import kernels  # noqa: F401


def dev_questions(per_group: int) -> list[dict]:
    from benchmarks.specbench import load_questions

    try:
        return load_questions(per_group)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def base_model_path():
    from msn.models import resolve_model

    return resolve_model("base")


@pytest.fixture(scope="session")
def runner(base_model_path):
    from proposers.reference.runner import ReferenceRunner

    return ReferenceRunner.load(base_model_path, device="cpu", dtype="float32")
