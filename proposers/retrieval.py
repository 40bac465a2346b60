"""The retrieval branch: continue the context the way it continued last time.

Find the most recent earlier occurrence of the context's last n tokens and propose the
tokens that followed it (prompt lookup; algorithm.md section 4, paper n = 3). Shorter
n-grams are tried when the long one never occurred, so a fresh context still gets a guess.
"""

from __future__ import annotations

import numpy as np
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
    a longer match predicts the continuation better (the vLLM planner's feature).

    One pass on the host: every earlier position holding the newest token is a candidate
    match end; the candidates are extended backwards up to `max_ngram` tokens; the
    longest match wins, the most recent among equals. (The vLLM proposer calls this for
    every request at every step: 8 tries of per-n windows cost ~0.7 ms a step at batch 8.)
    """
    n_ctx = context.numel()
    longest = min(max_ngram, n_ctx - 1)
    if longest < max(min_ngram, 1):
        return context.new_empty(0), 0
    ids = (context if context.device.type == "cpu" else context.cpu()).numpy()
    # Candidate match ends e <= n_ctx - 2 (each followed by at least one token).
    ends = np.flatnonzero(ids[: n_ctx - 1] == ids[-1])
    if not ends.size:
        return context.new_empty(0), 0
    length = np.ones(ends.size, dtype=np.int64)
    alive = np.ones(ends.size, dtype=bool)
    for k in range(1, longest):
        prev = ends - k
        alive &= prev >= 0
        alive[alive] = ids[prev[alive]] == ids[n_ctx - 1 - k]
        length += alive
    best = int(length.max())
    if best < min_ngram:
        return context.new_empty(0), 0
    start = int(ends[np.flatnonzero(length == best)[-1]]) + 1
    return context[start : start + max_tokens], best
