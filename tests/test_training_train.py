"""CPU smoke tests of `msn train` on the default model (tiny set, short sequences)."""

from __future__ import annotations

import json

import pytest

from training.noise import NoiseConfig

pytestmark = pytest.mark.slow

CONVERSATIONS = [
    ("What colour is the sky?", "The sky is blue on a clear day."),
    ("Name a prime number.", "Seven is a prime number."),
    ("Say hello in French.", "Bonjour is hello in French."),
    ("What is two plus two?", "Two plus two is four."),
]


@pytest.fixture(scope="module")
def base_model():
    from msn.errors import UsageError
    from msn.models import resolve_model

    try:
        return resolve_model("base")
    except UsageError as exc:
        pytest.skip(f"default model unavailable: {exc}")


@pytest.fixture()
def tiny_data(tmp_path):
    path = tmp_path / "tiny.jsonl"
    with open(path, "w") as fh:
        for q, a in CONVERSATIONS:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            fh.write(json.dumps({"messages": msgs, "split": "train"}) + "\n")
        held = [{"role": "user", "content": "held out"}, {"role": "assistant", "content": "x"}]
        fh.write(json.dumps({"messages": held, "split": "heldout"}) + "\n")
    return path


def test_lora_msn_loss_decreases_and_saves_adapter(base_model, tiny_data, tmp_path):
    from training.train import LOSS_LOG, TRAIN_META, TrainConfig, train

    out = tmp_path / "lora"
    config = TrainConfig(data=tiny_data, output_dir=out, model_path=base_model,
                         method="lora", noise=NoiseConfig(span_length=3), max_steps=8,
                         learning_rate=3e-3, batch_size=4, max_length=48, logging_steps=1,
                         save_steps=100, warmup_ratio=0.0, lora_r=8, lora_alpha=16)
    result = train(config, log=lambda *_: None)
    assert result.examples == 4  # the heldout row is not trained on
    assert result.steps == 8
    first, last = sum(result.losses[:2]) / 2, sum(result.losses[-2:]) / 2
    assert last < 0.7 * first, result.losses
    assert (out / "adapter_config.json").is_file()
    assert (out / "adapter_model.safetensors").is_file()
    assert len((out / LOSS_LOG).read_text().splitlines()) >= 8
    meta = json.loads((out / TRAIN_META).read_text())
    assert meta["config"]["noise"]["span_length"] == 3


def test_full_finetune_checkpoint_and_resume(base_model, tiny_data, tmp_path):
    from transformers import AutoConfig

    from training.train import TrainConfig, train

    out = tmp_path / "full"
    common = {"data": tiny_data, "output_dir": out, "model_path": base_model, "method": "full",
              "noise": NoiseConfig(span_length=2, num_spans=2), "learning_rate": 1e-5,
              "batch_size": 2, "max_length": 40, "logging_steps": 1, "save_steps": 1}
    first = train(TrainConfig(max_steps=1, **common), log=lambda *_: None)
    assert first.steps == 1 and (out / "checkpoint-1").is_dir()
    resumed = train(TrainConfig(max_steps=2, resume="auto", **common), log=lambda *_: None)
    assert resumed.steps == 2  # continued from step 1, not from scratch
    assert AutoConfig.from_pretrained(out).model_type == "llama"
    assert (out / "model.safetensors").is_file()
