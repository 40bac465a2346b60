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


BULK_TOKENS = 16  # NgramIndex.sync indexes more new tokens than this in bulk


class NgramIndex:
    """`ngram_match` for one growing context, in time per new token, not per context.

    Keeps the most recent end position of every 1..`max_ngram`-gram already followed by a
    token, so a lookup tries the context's suffix n-grams, longest first: the longest
    match wins, the most recent among equals, as `ngram_match` (tests compare them). The
    vLLM proposer holds one per request and looks up every request at every step: against
    `ngram_match`, which scans the whole context each time, that is the difference between
    a host cost per step that grows with the text (and the batch) and one that does not.
    """

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
        self.max_ngram = max_ngram
        self._ids: list[int] = []
        self._last: dict[tuple[int, ...], int] = {}  # n-gram -> its latest end position

    def __len__(self) -> int:
        return len(self._ids)

    @property
    def tokens(self) -> list[int]:
        """The context seen so far (read only)."""
        return self._ids

    def sync(self, context: np.ndarray) -> None:
        """Catch up with `context` (1-D token ids), which normally extends what was seen
        (a request's tokens only grow). A context shorter than what was seen, or whose
        token at the last seen position differs, starts the index over; earlier tokens are
        not compared (that would cost a pass over the context every step)."""
        seen = len(self._ids)
        if seen > len(context) or (seen and int(context[seen - 1]) != self._ids[-1]):
            self._ids, self._last, seen = [], {}, 0
        ids, last, longest = self._ids, self._last, self.max_ngram
        new = context[seen:].tolist()
        if len(new) <= BULK_TOKENS:  # a decode step's few tokens
            for token in new:
                end = len(ids) - 1  # the newest token so far is followed now
                for n in range(1, min(longest, end + 1) + 1):
                    last[tuple(ids[end - n + 1: end + 1])] = end
                ids.append(token)
            return
        ids.extend(new)
        # Every n-gram ending at `end` in [seen - 1, len - 2] is followed by a token now;
        # each n's are added in order of `end`, so the latest end of a repeated n-gram
        # wins. In bulk (`dict.update` over zipped slices): a prompt is indexed ~3x
        # faster than by the loop per token above (bench_proposer_host.py).
        stop = len(ids) - 1
        for n in range(1, longest + 1):
            start = max(seen - 1, n - 1)
            if start < stop:
                grams = zip(*(ids[start - n + 1 + k: stop - n + 1 + k] for k in range(n)))
                last.update(zip(grams, range(start, stop)))

    def match(self, max_tokens: int) -> tuple[list[int], int]:
        """The tokens that followed the most recent longest match of the suffix (up to
        `max_tokens`), and the matched length (0 and [] when nothing matched)."""
        ids, n_ctx = self._ids, len(self._ids)
        for n in range(min(self.max_ngram, n_ctx - 1), 0, -1):
            end = self._last.get(tuple(ids[n_ctx - n:]))
            if end is not None:
                return ids[end + 1: end + 1 + max_tokens], n
        return [], 0


TOKEN_BITS = 24  # CorpusIndex keys hold token ids below 2**24 (vocabularies are far smaller)


def _key(ngram: list[int]) -> int:
    """An n-gram as one int: its tokens in TOKEN_BITS-bit fields above a leading 1 (so
    n-grams of different lengths never share a key)."""
    key = 1
    for token in ngram:
        key = key << TOKEN_BITS | token
    return key


class CorpusIndex:
    """Retrieval across requests (algorithm.md section 5): earlier requests' outputs.

    A request whose own context has no match for its suffix can still continue text
    another request produced: answers share phrasing, formulas, code and boilerplate.
    Holds whole documents (a finished request's output, led in by the last `max_ngram`
    tokens before it, so its first tokens are found after the same prompt ending), the
    oldest dropped first, with its index entries, once more than `max_tokens` are held
    (about 300 bytes a token held: 65,536 tokens take ~20 MiB). Every
    `min_ngram`..`max_ngram`-gram followed by a token maps to its most recent (document,
    end); the longest match wins, the most recent among equals, and a continuation never
    runs past its document's end. N-grams shorter than `min_ngram` are not indexed: one
    shared token between unrelated texts predicts little.

    Drafts only: greedy output is the target's whatever the drafts, so what the corpus
    holds changes speed, never text. It does make one request's speed depend on what
    others generated before (a timing side channel, like a shared prefix cache): an
    engine serving mutually untrusted users should turn it off (`corpus_tokens=0`).
    """

    def __init__(self, max_tokens: int, max_ngram: int = 3, min_ngram: int = 2):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_tokens, self.max_ngram, self.min_ngram = max_tokens, max_ngram, min_ngram
        self.clear()

    def clear(self) -> None:
        self._docs: dict[int, list[int]] = {}  # id -> tokens; ids grow with age
        self._oldest = self._next = self._size = 0
        # n-gram -> its latest (doc, end). Both packed into ints (`_key`; doc << 32 |
        # end): tuples would be objects the garbage collector tracks, and a full
        # collection over ~130k of them paused adds for 60-160 ms.
        self._last: dict[int, int] = {}

    def __len__(self) -> int:
        """Tokens held."""
        return self._size

    @property
    def num_docs(self) -> int:
        return len(self._docs)

    def add(self, tokens) -> None:
        """Hold `tokens` (one document: a lead-in plus a request's output) for lookups."""
        tokens = [int(t) for t in tokens][-self.max_tokens:]
        if len(tokens) <= self.min_ngram:  # no n-gram of it is followed by a token
            return
        if min(tokens) < 0 or max(tokens) >= 1 << TOKEN_BITS:
            raise ValueError(f"token ids must be in [0, 2**{TOKEN_BITS})")
        doc, self._next = self._next, self._next + 1
        self._docs[doc] = tokens
        self._size += len(tokens)
        self._index(doc, tokens)
        while self._size > self.max_tokens:
            dropped = self._docs.pop(self._oldest, None)
            if dropped is not None:
                self._size -= len(dropped)
                self._index(self._oldest, dropped, drop=True)
            self._oldest += 1

    def _ngrams(self, tokens: list[int]):
        """(key, end) for every indexed n-gram of `tokens` followed by a token."""
        lo, hi = self.min_ngram, self.max_ngram
        for end in range(lo - 1, len(tokens) - 1):
            for n in range(lo, min(hi, end + 1) + 1):
                yield _key(tokens[end - n + 1: end + 1]), end

    def _index(self, doc: int, tokens: list[int], drop: bool = False) -> None:
        """Point `tokens`' n-grams at `doc`, or (`drop`) remove those still pointing at
        it: a dropped document takes its entries along, so the index holds live ones
        only, at a cost per document like adding it (no rebuild pauses)."""
        last = self._last
        if drop:
            for key, _ in self._ngrams(tokens):
                if last.get(key, -1) >> 32 == doc:
                    del last[key]
        else:
            for key, end in self._ngrams(tokens):
                last[key] = doc << 32 | end

    def match(self, context, max_tokens: int, extend: int = 0) -> tuple[list[int], int, int]:
        """The tokens that followed the most recent longest match of `context`'s suffix
        in the corpus (up to `max_tokens`), the matched n-gram length, and how far the
        match runs back (context and document compared token by token, up to `extend`
        tokens; the n-gram length when `extend` is smaller). ([], 0, 0) if none.

        A match that runs far back tells a repeat (the same answer asked again) from a
        common 3-gram: replaying a second round of the same questions, corpus chains
        whose match ran back 6+ tokens had 5.6-9.3 tokens accepted a lookup, common
        3-grams 0.5-0.8 (`benchmarks/vllm/retrieval_sources.py`)."""
        tail = [int(t) for t in context[-max(self.max_ngram, extend):]]
        for n in range(min(self.max_ngram, len(tail)), self.min_ngram - 1, -1):
            hit = self._last.get(_key(tail[len(tail) - n:]))
            if hit is None:
                continue
            tokens = self._docs[hit >> 32]
            end = hit & 0xFFFFFFFF
            length = n
            while (length < min(extend, len(tail)) and length <= end
                   and tokens[end - length] == tail[len(tail) - 1 - length]):
                length += 1
            return tokens[end + 1: end + 1 + max_tokens], n, length
        return [], 0, 0
