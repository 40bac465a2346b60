"""The committed MSN artifact (issue 3): well-formed, small, merged by `msn models prepare`,
decoded exactly, and measurably better at Jacobi decoding than the base model."""

import json

import pytest

from msn import models
from proposers.reference.runner import GenerationConfig, ReferenceRunner
from tests.conftest import dev_questions

ARTIFACT = models.MSN_ARTIFACT_DIR
NEW_TOKENS = 48


def test_artifact_is_a_small_peft_adapter_with_a_model_card():
    config = json.loads((ARTIFACT / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 32
    weights = ARTIFACT / "adapter_model.safetensors"
    assert weights.stat().st_size <= 20 * 1024 * 1024
    card = (ARTIFACT / "README.md").read_text()
    for needed in ("msn train", "msn data build", "--seed", "MAT"):
        assert needed in card
    # with the artifact committed, the default model is the MSN model
    assert models.default_model_name() == "msn"


@pytest.fixture(scope="module")
def msn_runner():
    return ReferenceRunner.load(models.resolve_model("msn"), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prompts(msn_runner):
    # four task groups' first questions (mt_bench, translation, summarization, qa)
    return [msn_runner.encode_chat(q["turns"][0]) for q in dev_questions(1)[:4]]


@pytest.mark.slow
def test_msn_model_decodes_exactly_and_beats_base_jacobi_mat(msn_runner, runner, prompts):
    steps = {"msn": 0, "base": 0}
    tokens = {"msn": 0, "base": 0}
    for prompt in prompts:
        ar = msn_runner.generate(prompt, GenerationConfig(method="ar", max_new_tokens=NEW_TOKENS))
        for method in ("jacobi", "tr-jacobi"):
            out = msn_runner.generate(prompt, GenerationConfig(method=method,
                                                                max_new_tokens=NEW_TOKENS))
            assert out.token_ids == ar.token_ids, f"{method} diverged from ar on the MSN model"
            if method == "jacobi":
                steps["msn"] += out.num_steps
                tokens["msn"] += len(out.token_ids)
        base = runner.generate(prompt, GenerationConfig(method="jacobi",
                                                        max_new_tokens=NEW_TOKENS))
        steps["base"] += base.num_steps
        tokens["base"] += len(base.token_ids)
    mat = {k: tokens[k] / steps[k] for k in steps}
    # A model property, not a timing: MSN training is what lets Jacobi accept more than
    # one token per step (H200, 60 questions: 1.30 vs 1.06).
    assert mat["msn"] > mat["base"] + 0.1, mat


def test_cached_merge_is_rebuilt_when_the_artifact_changes(tmp_path, monkeypatch):
    import shutil

    import training.artifact

    artifact = tmp_path / "artifact"
    shutil.copytree(ARTIFACT, artifact)
    monkeypatch.setattr(models, "MSN_ARTIFACT_DIR", artifact)
    monkeypatch.setattr(models, "prepare_base", lambda *a, **k: tmp_path / "base")
    merges = []

    def fake_merge(base, artifact_dir, out, dtype):
        merges.append(out)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(training.artifact, "merge_artifact", fake_merge)
    first = models.prepare_msn("float32", tmp_path / "cache", log=lambda m: None)
    assert models.prepare_msn("float32", tmp_path / "cache", log=lambda m: None) == first
    assert len(merges) == 1  # reused while the artifact is unchanged
    config = json.loads((artifact / "adapter_config.json").read_text())
    (artifact / "adapter_config.json").write_text(json.dumps({**config, "revision": "v2"}))
    logs = []
    assert models.prepare_msn("float32", tmp_path / "cache", log=logs.append) == first
    assert len(merges) == 2 and "merging again" in logs[0]
