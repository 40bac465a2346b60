"""Chat-template response masks and the MSN collator (training/collator.py)."""

from __future__ import annotations

import pytest
import torch

from training.collator import IGNORE_INDEX, MSNCollator, encode_chat
from training.noise import NoiseConfig

# SmolLM2-Instruct's template (ChatML with a default system turn), so the test runs
# without the packaged model.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    """A character-level fast tokenizer with ChatML special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({c: i + 3 for i, c in enumerate(chars)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                   bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    fast.chat_template = CHATML
    return fast


def detok(tokenizer, ids) -> str:
    return "".join(tokenizer.convert_ids_to_tokens(ids))


def decoded_responses(tokenizer, enc):
    """The response tokens as text, one string per contiguous run."""
    runs, current = [], []
    for tid, m in zip(enc.input_ids, enc.response_mask):
        if m:
            current.append(tid)
        elif current:
            runs.append(detok(tokenizer, current)); current = []
    if current:
        runs.append(detok(tokenizer, current))
    return runs


def test_single_turn_response_is_content_and_end_marker(tokenizer):
    enc = encode_chat(tokenizer, [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "hello"}])
    assert len(enc.input_ids) == len(enc.response_mask)
    assert decoded_responses(tokenizer, enc) == ["hello<|im_end|>\n"]


def test_multi_turn_only_assistant_turns_are_responses(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "A."},
        {"role": "user", "content": "assistant b?"},  # the word must not confuse the mask
        {"role": "assistant", "content": "B!"},
    ]
    enc = encode_chat(tokenizer, messages)
    assert decoded_responses(tokenizer, enc) == ["A.<|im_end|>\n", "B!<|im_end|>\n"]
    # the role header of each assistant turn is prompt
    text = detok(tokenizer, [t for t, m in zip(enc.input_ids, enc.response_mask) if not m])
    assert text.count("<|im_start|>assistant\n") == 2


def test_conversation_ending_with_user_turn_has_no_trailing_response(tokenizer):
    enc = encode_chat(tokenizer, [{"role": "user", "content": "x"},
                                  {"role": "assistant", "content": "y"},
                                  {"role": "user", "content": "z"}])
    assert decoded_responses(tokenizer, enc) == ["y<|im_end|>\n"]


def test_truncation_keeps_mask_aligned(tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 50}]
    full = encode_chat(tokenizer, messages)
    cut = encode_chat(tokenizer, messages, max_length=40)
    assert cut.input_ids == full.input_ids[:40] and cut.response_mask == full.response_mask[:40]


def test_collator_pads_labels_and_noises_only_responses(tokenizer):
    convs = [
        [{"role": "user", "content": "short"}, {"role": "assistant", "content": "one two"}],
        [{"role": "user", "content": "longer question"},
         {"role": "assistant", "content": "first answer here"},
         {"role": "user", "content": "and?"},
         {"role": "assistant", "content": "second answer"}],
    ]
    features = [encode_chat(tokenizer, c).to_dict() for c in convs]
    pad = tokenizer.pad_token_id
    clean = MSNCollator(pad_token_id=pad, noise=NoiseConfig(span_length=0))(features)
    noisy = MSNCollator(pad_token_id=pad, noise=NoiseConfig(span_length=4, num_spans=2),
                        seed=3)(features)
    assert clean["input_ids"].shape[1] % 8 == 0
    for row, f in enumerate(features):
        n = len(f["input_ids"])
        assert clean["attention_mask"][row, :n].all() and not clean["attention_mask"][row, n:].any()
        assert clean["input_ids"][row, :n].tolist() == f["input_ids"]
        want = [t if m else IGNORE_INDEX for t, m in zip(f["input_ids"], f["response_mask"])]
        assert clean["labels"][row, :n].tolist() == want
        assert (clean["labels"][row, n:] == IGNORE_INDEX).all()
    assert torch.equal(clean["labels"], noisy["labels"])
    changed = clean["input_ids"] != noisy["input_ids"]
    assert changed.any()
    assert not (changed & (clean["labels"] == IGNORE_INDEX)).any()


def test_collator_is_reproducible_per_seed(tokenizer):
    conv = [{"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "general kenobi, you are a bold one"}]
    features = [encode_chat(tokenizer, conv).to_dict()] * 4
    a = MSNCollator(pad_token_id=2, seed=1)(features)["input_ids"]
    b = MSNCollator(pad_token_id=2, seed=1)(features)["input_ids"]
    assert torch.equal(a, b)


def test_open_ended_last_turn_has_no_end_marker(tokenizer):
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "cut off"}]
    enc = encode_chat(tokenizer, messages, open_ended=True)
    assert decoded_responses(tokenizer, enc) == ["cut off"]
    assert enc.input_ids[-1] != tokenizer.convert_tokens_to_ids("<|im_end|>")
