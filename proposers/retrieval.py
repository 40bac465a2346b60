"""The retrieval branch: continue the context the way it continued last time.

Find the most recent earlier occurrence of the context's last n tokens and propose the
tokens that followed it (prompt lookup; algorithm.md section 4, paper n = 3). Shorter
n-grams are tried when the long one never occurred, so a fresh context still gets a guess.
"""

from __future__ import annotations

import torch


def ngram_lookup(
    context: torch.Tensor, max_tokens: int, max_ngram: int = 3, min_ngram: int = 1
) -> torch.Tensor:
    """Tokens that followed the most recent earlier match of the context's suffix.

    `context` is a 1-D token tensor (prompt + output so far, ending with the newest
    token). Returns up to `max_tokens` tokens (possibly empty).
    """
    return ngram_match(context, max_tokens, max_ngram, min_ngram)[0]


def ngram_match(
    context: torch.Tensor, max_tokens: int, max_ngram: int = 3, min_ngram: int = 1
) -> tuple[torch.Tensor, int]:
    """`ngram_lookup`, plus the length of the matched n-gram (0 when nothing matched):
    a longer match predicts the continuation better (the vLLM planner's feature)."""
    n_ctx = context.numel()
    for n in range(min(max_ngram, n_ctx - 1), min_ngram - 1, -1):
        suffix = context[n_ctx - n :]
        # Windows starting at 0 .. n_ctx-n-1: every earlier occurrence (the suffix itself
        # excluded), each followed by at least one token.
        windows = context[: n_ctx - 1].unfold(0, n, 1)
        hits = (windows == suffix).all(dim=1).nonzero().flatten()
        if hits.numel():
            start = int(hits[-1]) + n
            return context[start : start + max_tokens], n
    return context.new_empty(0), 0
