"""Agreement of a speculative run with plain greedy decoding, and why it can differ.

In float32 every method must reproduce `ar` exactly. In bf16/fp16 a tree step and a
one-token step reduce in different orders, so where the model's top two logits are
nearly tied the argmax can flip. A divergence is *explained* when `ar`'s top-2 margin at
the first differing position is below a tolerance; an unexplained one is a bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Top-2 logit margins below which a low-precision flip is expected (measured order of
# the rounding noise of one bf16/fp16 forward of a small model; float32 needs none).
NEAR_TIE = {torch.float32: 1e-3, torch.bfloat16: 0.5, torch.float16: 0.1}


@dataclass(frozen=True, slots=True)
class Divergence:
    position: int  # index into the generated tokens
    ar_token: int
    other_token: int
    ar_margin: float  # ar's top-1 minus top-2 logit at that position
    explained: bool

    def to_json(self) -> dict:
        return {"position": self.position, "ar_token": self.ar_token,
                "other_token": self.other_token, "ar_margin": round(self.ar_margin, 5),
                "explained": self.explained}


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def explain(runner, prompt_ids: Sequence[int], ar_ids: Sequence[int],
            other_ids: Sequence[int], tolerance: float | None = None) -> Divergence | None:
    """None if the two outputs agree; otherwise the first divergence and its margin."""
    pos = first_difference(ar_ids, other_ids)
    if pos is None:
        return None
    logits = runner.next_token_logits(list(prompt_ids) + list(ar_ids[:pos])).float()
    top2 = torch.topk(logits, 2).values
    margin = float(top2[0] - top2[1])
    tol = NEAR_TIE[runner.dtype] if tolerance is None else tolerance
    ar_tok = ar_ids[pos] if pos < len(ar_ids) else -1
    other = other_ids[pos] if pos < len(other_ids) else -1
    # A length-only difference (one run stopped at EOS) is explained the same way.
    return Divergence(pos, ar_tok, other, margin, margin < tol)
