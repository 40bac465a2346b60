import numpy as np
import pytest
import torch

from proposers.retrieval import NgramIndex, ngram_lookup, ngram_match


def t(*xs):
    return torch.tensor(xs)


def test_most_recent_match_wins():
    ctx = t(1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3)
    assert ngram_lookup(ctx, 3).tolist() == [7, 8, 5]


def test_continuation_is_cut_at_the_context_end_and_max_tokens():
    ctx = t(4, 5, 6, 7, 4, 5)
    assert ngram_lookup(ctx, 10, max_ngram=2).tolist() == [6, 7, 4, 5]
    assert ngram_lookup(ctx, 2, max_ngram=2).tolist() == [6, 7]


def test_falls_back_to_shorter_ngrams():
    ctx = t(1, 2, 8, 3, 5, 6, 3)  # "5 6 3" and "6 3" never occurred before; "3" did
    assert ngram_lookup(ctx, 2).tolist() == [5, 6]


def test_no_match_and_tiny_contexts():
    assert ngram_lookup(t(1, 2, 3), 4).numel() == 0
    assert ngram_lookup(t(1), 4).numel() == 0
    assert ngram_lookup(t(1, 2, 3, 4), 4, min_ngram=2).numel() == 0


def test_suffix_never_matches_itself():
    ctx = t(5, 5, 5)
    assert ngram_lookup(ctx, 3, max_ngram=2).tolist() == [5]


def test_ngram_match_reports_the_matched_length():
    from proposers.retrieval import ngram_match

    ctx = torch.tensor([1, 2, 3, 9, 1, 2, 3])
    tokens, n = ngram_match(ctx, 2)
    assert (tokens.tolist(), n) == ([9, 1], 3)
    tokens, n = ngram_match(torch.tensor([5, 7, 8, 7]), 4)
    assert (tokens.tolist(), n) == ([8, 7], 1)
    assert ngram_match(torch.tensor([1, 2, 3]), 4)[1] == 0


def _ngram_match_by_windows(context, max_tokens, max_ngram=3, min_ngram=1):
    """The definition, spelled out: for n from long to short, every window of n tokens
    before the newest one, compared with the context's last n; the most recent wins."""
    n_ctx = context.numel()
    for n in range(min(max_ngram, n_ctx - 1), min_ngram - 1, -1):
        windows = context[: n_ctx - 1].unfold(0, n, 1)
        hits = (windows == context[n_ctx - n:]).all(dim=1).nonzero().flatten()
        if hits.numel():
            start = int(hits[-1]) + n
            return context[start : start + max_tokens].tolist(), n
    return [], 0


def test_ngram_match_equals_its_definition_on_random_contexts():
    """The one-pass search finds what the window-by-window definition finds: small
    vocabularies (many repeats, long matches) and large ones (few), every n range."""
    from proposers.retrieval import ngram_match

    gen = torch.Generator().manual_seed(0)
    for trial in range(600):
        vocab = (2, 3, 5, 50)[trial % 4]
        ctx = torch.randint(0, vocab, (int(torch.randint(1, 40, (1,), generator=gen)),),
                            generator=gen)
        max_ngram = 1 + trial % 4
        min_ngram = 1 + (trial // 4) % 2
        max_tokens = 1 + trial % 6
        got, n = ngram_match(ctx, max_tokens, max_ngram, min_ngram)
        assert (got.tolist(), n) == _ngram_match_by_windows(ctx, max_tokens, max_ngram,
                                                             min_ngram), (ctx, max_ngram)


@pytest.mark.parametrize("max_ngram", [1, 2, 3, 4])
def test_ngram_index_equals_ngram_match_as_the_context_grows(max_ngram):
    """The proposer's per-request index gives `ngram_match`'s answer at every length,
    whether the context grows by one token, by several (accepted drafts) or by more than
    BULK_TOKENS at once (a prompt, indexed in bulk)."""
    from proposers.retrieval import BULK_TOKENS

    rng = np.random.default_rng(max_ngram)
    for _ in range(60):
        vocab, n = int(rng.integers(2, 10)), int(rng.integers(1, 120))
        ctx = rng.integers(0, vocab, n).astype(np.int32)  # vLLM's token_ids_cpu dtype
        index, length = NgramIndex(max_ngram), 0
        while length < n:
            jump = BULK_TOKENS + 1 + int(rng.integers(0, 30)) if rng.random() < 0.2 else 1
            length = min(n, length + jump + int(rng.integers(0, 3)))
            index.sync(ctx[:length])
            found, matched = ngram_match(torch.from_numpy(ctx[:length]).long(), 6, max_ngram)
            assert index.match(6) == (found.tolist(), matched)
            assert index.tokens == ctx[:length].tolist()


def test_ngram_index_starts_over_on_a_context_it_did_not_see_grow():
    index = NgramIndex(3)
    index.sync(np.array([1, 2, 3, 1, 2]))
    assert index.match(4) == ([3, 1, 2], 2)
    index.sync(np.array([7, 8, 7]))  # shorter: a new context
    assert index.tokens == [7, 8, 7] and index.match(4) == ([8, 7], 1)
    index.sync(np.array([7, 8, 9, 9]))  # its last seen token changed: starts over
    assert index.tokens == [7, 8, 9, 9] and index.match(4) == ([9], 1)
    with pytest.raises(ValueError, match="max_ngram"):
        NgramIndex(0)


def test_corpus_finds_the_longest_most_recent_match_within_a_document():
    from proposers.retrieval import CorpusIndex

    c = CorpusIndex(max_tokens=100, max_ngram=3, min_ngram=2)
    c.add([1, 2, 3, 4, 5, 6])
    c.add([9, 2, 3, 7, 8])  # "2 3" again, more recent; "1 2 3" only in the first
    assert c.match([0, 2, 3], 4)[:2] == ([7, 8], 2)  # most recent 2-gram; stops at its end
    assert c.match([1, 2, 3], 2)[:2] == ([4, 5], 3)  # the longer match wins
    assert c.match([5, 3], 4)[:2] == ([], 0)  # never seen
    assert c.match([7, 8], 4)[:2] == ([], 0)  # seen, but the document ends there
    assert c.match([4], 4)[:2] == ([], 0)  # shorter than min_ngram: not used
    assert (len(c), c.num_docs) == (11, 2)


def test_corpus_drops_oldest_documents_and_falls_back_to_live_ones():
    from proposers.retrieval import CorpusIndex

    c = CorpusIndex(max_tokens=10, max_ngram=3, min_ngram=2)
    c.add([1, 2, 3, 4])
    c.add([7, 2, 3, 5])
    assert c.match([1, 2, 3], 1)[:2] == ([4], 3)
    c.add([8, 8, 8, 8, 8])  # 13 tokens > 10: the first document goes
    assert c.num_docs == 2 and len(c) == 9
    assert c.match([1, 2, 3], 1)[:2] == ([5], 2)  # its 3-gram is gone; "2 3" lives on
    c.add(list(range(20, 40)))  # longer than the corpus: only its last 10 are kept
    assert c.num_docs == 1 and len(c) == 10 and c.match([30, 31], 2)[:2] == ([32, 33], 2)
    assert c.match([20, 21], 2)[:2] == ([], 0)
    c.clear()
    assert (len(c), c.num_docs, c.match([30, 31], 2)) == (0, 0, ([], 0, 0))


def test_corpus_index_memory_stays_bounded():
    """A dropped document takes its index entries along: the index never holds more
    than one entry per indexed n-gram length and live token, however much passes
    through, and what it holds still finds the newest documents."""
    from proposers.retrieval import CorpusIndex

    gen = torch.Generator().manual_seed(0)
    c = CorpusIndex(max_tokens=64, max_ngram=3, min_ngram=2)
    for _ in range(200):
        c.add(torch.randint(0, 1000, (30,), generator=gen).tolist())
        assert len(c._last) <= 2 * len(c)
        assert len(c) <= 64
    doc = torch.randint(0, 1000, (30,), generator=gen).tolist()
    c.add(doc)
    assert c.match(doc[:3], 5)[:2] == (doc[3:8], 3)


def test_corpus_match_tells_how_far_back_it_runs():
    """`extend`: the match compared further back, token by token, up to `extend` tokens
    (a repeat runs far back; a common 3-gram does not)."""
    from proposers.retrieval import CorpusIndex

    c = CorpusIndex(max_tokens=100, max_ngram=3, min_ngram=2)
    c.add([1, 2, 3, 4, 5, 6, 7, 8])
    assert c.match([0, 3, 4, 5, 6], 2, extend=6) == ([7, 8], 3, 4)  # 3 4 5 6, not 0
    assert c.match([1, 2, 3, 4, 5, 6], 2, extend=4) == ([7, 8], 3, 4)  # capped at extend
    assert c.match([1, 2, 3, 4, 5, 6], 2, extend=9) == ([7, 8], 3, 6)  # the document's start
    assert c.match([9, 5, 6], 2) == ([7, 8], 2, 2)  # no extend: the n-gram length


def test_corpus_rejects_bad_settings():
    from proposers.retrieval import CorpusIndex

    with pytest.raises(ValueError, match="max_tokens"):
        CorpusIndex(0)
    with pytest.raises(ValueError, match="min_ngram"):
        CorpusIndex(10, max_ngram=2, min_ngram=3)
    with pytest.raises(ValueError, match="token ids"):
        CorpusIndex(10).add([1, 2, -3])


def test_retrieval_alternatives_counts_the_first_and_a_second_distinct_chain():
    from benchmarks.reference.retrieval_alternatives import alternatives

    # 9 1 2 3 | 9 1 2 4 | 9 1 2 -> at the last 2: the most recent match of "9 1 2" says 4,
    # the earlier one says 3 9; the text goes on with 3 9 (and ends).
    seq = [9, 1, 2, 3, 9, 1, 2, 4, 9, 1, 2, 3, 9]
    assert alternatives(seq, 10, depth=4) == (0, 2)
    assert alternatives(seq, 10, depth=1) == (0, 1)
    assert alternatives(seq, 3, depth=4) == (0, 0)  # nothing earlier ends in 3
    assert alternatives([5, 5, 5, 5], 2, depth=4) == (1, 1)  # one chain, capped by the text
    # Its first chain is the retrieval branch's own (`ngram_match`: longest, most recent).
    rng = np.random.default_rng(0)
    for _ in range(200):
        seq = rng.integers(0, 4, 30).tolist()
        pos = int(rng.integers(1, 28))
        found = ngram_match(torch.tensor(seq[: pos + 1]), 4)[0].tolist()
        want = next((i for i, (a, b) in enumerate(zip(found, seq[pos + 1:])) if a != b),
                    min(len(found), len(seq) - pos - 1))
        assert alternatives(seq, pos, depth=4)[0] == want
