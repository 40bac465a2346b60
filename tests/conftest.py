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


def tiny_llama(tokenizer_path, device, max_positions: int = 512):
    """A tiny random Llama (2 layers, GQA 3, float32) with the real tokenizer: fast
    enough for the Triton interpreter and torch.compile on CPU; random models repeat
    themselves quickly, so retrieval drafts get accepted and compaction runs."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=96, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, head_dim=32, max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).to(device).eval()
    model.set_attn_implementation("sdpa")
    return model, tok
