"""LoRA-format artifact: extraction from a linear-only fine-tune and PEFT merge."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture()
def tiny_llama(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    base = tmp_path / "base"
    model.save_pretrained(base)
    vocab = {f"t{i}": i for i in range(64)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, "t0")),
                                  unk_token="t0", pad_token="t1", eos_token="t2")
    tok.save_pretrained(base)
    return base, model


def _tune(model, rank: int | None, targets=("q_proj", "down_proj")):
    """Add a known delta to some linear layers (low-rank when rank is given)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-2] in targets:
                out_f, in_f = p.shape
                if rank:
                    delta = torch.randn(out_f, rank, generator=g) @ torch.randn(rank, in_f, generator=g)
                else:
                    delta = torch.randn(out_f, in_f, generator=g)
                p.add_(0.01 * delta)
    return model


def test_low_rank_delta_is_recovered_exactly(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.artifact import extract_lora_artifact, merge_artifact

    base_dir, model = tiny_llama
    tuned = _tune(model, rank=3)
    tuned_dir = tmp_path / "tuned"
    tuned.save_pretrained(tuned_dir)
    report = extract_lora_artifact(base_dir, tuned_dir, tmp_path / "art", rank=4,
                                   dtype="float32", log=lambda *_: None)
    assert report["delta_energy_kept"] == pytest.approx(1.0, abs=1e-6)
    assert json.loads((tmp_path / "art" / "adapter_config.json").read_text())["r"] == 4
    merged_dir = merge_artifact(base_dir, tmp_path / "art", tmp_path / "merged", "float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    want = dict(tuned.named_parameters())
    for name, p in merged.named_parameters():
        torch.testing.assert_close(p, want[name], atol=1e-5, rtol=0)


def test_truncation_keeps_the_top_singular_directions(tiny_llama, tmp_path):
    from training.artifact import extract_lora_artifact

    base_dir, model = tiny_llama
    _tune(model, rank=None).save_pretrained(tmp_path / "tuned")
    report = extract_lora_artifact(base_dir, tmp_path / "tuned", tmp_path / "art", rank=2,
                                   dtype="float16", log=lambda *_: None)
    assert 0.0 < report["delta_energy_kept"] < 1.0


def test_changed_embeddings_are_refused(tiny_llama, tmp_path):
    from training.artifact import extract_lora_artifact

    base_dir, model = tiny_llama
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.1)
    model.save_pretrained(tmp_path / "tuned")
    with pytest.raises(ValueError, match="embed_tokens"):
        extract_lora_artifact(base_dir, tmp_path / "tuned", tmp_path / "art", rank=2)


def test_merge_refuses_a_folder_without_adapter(tiny_llama, tmp_path):
    from training.artifact import merge_artifact

    with pytest.raises(ValueError, match="adapter_config"):
        merge_artifact(tiny_llama[0], tmp_path, tmp_path / "out", "float32")
