"""Chat examples -> token ids with a response mask, and the MSN data collator.

The response mask comes from the model's own chat template: the tokens each assistant
turn adds to the rendered conversation (its content and its end-of-turn marker) are
responses; the system/user turns and the assistant header that the generation prompt
would add are prompt. Only responses are trained on and only responses are noised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from training.noise import NoiseConfig, apply_msn_noise

IGNORE_INDEX = -100


@dataclass(slots=True)
class EncodedChat:
    input_ids: list[int]
    response_mask: list[bool]

    def to_dict(self) -> dict[str, list]:
        return {"input_ids": self.input_ids, "response_mask": self.response_mask}


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def response_char_spans(tokenizer, messages: list[dict], open_ended: bool = False
                        ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn in it.

    A turn's span is what rendering it adds after the generation prompt, so it covers
    the content and the end-of-turn marker but not the role header. With `open_ended`
    the text stops right after the last assistant turn's content: for an answer cut at
    the token limit, training on the end marker would teach the model to stop mid-thought.
    """
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        # Templates that rewrite earlier turns (e.g. strip reasoning) break this
        # prefix property; training on such a template would silently mislabel tokens.
        if not (text.startswith(through) and through.startswith(before)):
            raise ValueError("chat template is not prefix-stable; cannot locate assistant turns")
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    if open_ended and spans and messages[-1].get("role") == "assistant":
        start = text.find(messages[-1]["content"], spans[-1][0])
        if start < 0:
            raise ValueError("cannot find the last assistant turn's content in the template")
        end = start + len(messages[-1]["content"])
        text, spans[-1] = text[:end], (spans[-1][0], end)
    return text, spans


def encode_chat(tokenizer, messages: list[dict], max_length: int | None = None,
                open_ended: bool = False) -> EncodedChat:
    """Tokenise a conversation with the chat template; mark assistant-turn tokens."""
    text, spans = response_char_spans(tokenizer, messages, open_ended)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = []
    for start, end in enc["offset_mapping"]:
        # A token belongs to a response when it starts inside an assistant span; tokens
        # with empty offsets (some special tokens) fall back to their end position.
        anchor = min(end, start)
        mask.append(any(a <= anchor < b for a, b in spans))
    if max_length is not None:
        ids, mask = ids[:max_length], mask[:max_length]
    return EncodedChat(ids, mask)


@dataclass
class MSNCollator:
    """Right-pads a list of EncodedChat-like dicts and applies MSN noise to the inputs.

    Labels are the clean ids on response tokens and IGNORE_INDEX elsewhere; the model
    shifts them itself. With noise disabled this is the plain SFT collator.
    """

    pad_token_id: int
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    seed: int = 0
    pad_to_multiple_of: int | None = 8
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        batch = len(features)
        input_ids = torch.full((batch, longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, longest), dtype=torch.long)
        response_mask = torch.zeros((batch, longest), dtype=torch.bool)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            attention_mask[row, :n] = 1
            response_mask[row, :n] = torch.as_tensor(f["response_mask"], dtype=torch.bool)
        labels = torch.where(response_mask & attention_mask.bool(), input_ids,
                             torch.full_like(input_ids, IGNORE_INDEX))
        noisy, _ = apply_msn_noise(input_ids, response_mask, attention_mask, self.noise,
                                   generator=self._generator)
        return {"input_ids": noisy, "attention_mask": attention_mask, "labels": labels}
