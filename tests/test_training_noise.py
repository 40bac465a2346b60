"""MSN noise (training/noise.py): invariants, uniformity, and the documented edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from training.noise import NoiseConfig, apply_msn_noise, span_start_candidates


def chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper chi-square quantile (z = 3.09 is p = 0.001), Wilson-Hilferty approximation."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_stat(counts: torch.Tensor) -> float:
    expected = counts.sum().item() / counts.numel()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def random_batch(seed: int, batch: int = 64, seq_len: int = 48):
    """Unique token ids per position (so a token names its source), random prompt /
    response segments (multi-turn), and random left or right padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(seq_len).repeat(batch, 1) + 1000 * torch.arange(batch)[:, None]
    response = torch.zeros(batch, seq_len, dtype=torch.bool)
    attention = torch.ones(batch, seq_len, dtype=torch.long)
    for b in range(batch):
        length = int(torch.randint(8, seq_len + 1, (1,), generator=g))
        left = bool(torch.randint(0, 2, (1,), generator=g))
        lo, hi = (seq_len - length, seq_len) if left else (0, length)
        attention[b] = 0
        attention[b, lo:hi] = 1
        pos = lo + int(torch.randint(1, 6, (1,), generator=g))  # a prompt of 1-5 tokens
        while pos < hi:  # alternate assistant turns with short user turns
            turn = int(torch.randint(1, 12, (1,), generator=g))
            response[b, pos:min(pos + turn, hi)] = True
            pos += turn + int(torch.randint(1, 4, (1,), generator=g))
    return ids, response, attention


@pytest.mark.parametrize("source", ["context", "vocab"])
@pytest.mark.parametrize("num_spans", [1, 3])
def test_only_response_positions_change(source, num_spans):
    ids, response, attention = random_batch(seed=1)
    config = NoiseConfig(span_length=5, num_spans=num_spans, source=source, vocab_size=50)
    noisy, noised = apply_msn_noise(ids, response, attention, config,
                                    torch.Generator().manual_seed(0))
    changed = noisy != ids
    assert not (changed & ~response).any(), "a prompt or padding token changed"
    assert not (noised & ~(response & attention.bool())).any()
    assert not (changed & ~noised).any(), "a token changed outside the reported noise"
    assert noised.any(dim=-1).sum() >= ids.shape[0] * 0.9  # nearly every row has a span
    assert (noised.sum(-1) <= 5 * num_spans).all()
    # the inputs were not modified in place
    assert torch.equal(ids, random_batch(seed=1)[0])


def test_replacements_come_from_earlier_real_tokens():
    ids, response, attention = random_batch(seed=2)
    config = NoiseConfig(span_length=6, num_spans=3)
    noisy, noised = apply_msn_noise(ids, response, attention, config,
                                    torch.Generator().manual_seed(1))
    for b, t in noised.nonzero().tolist():
        earlier = noisy[b, :t][attention[b, :t].bool()]
        # drawn from the context as it stood then, earlier replacements included
        assert (earlier == noisy[b, t]).any(), (b, t)


def test_labels_built_from_clean_ids_never_change():
    from training.collator import IGNORE_INDEX, MSNCollator

    ids, response, attention = random_batch(seed=3, batch=8)
    features = []
    for b in range(8):
        keep = attention[b].bool()
        features.append({"input_ids": ids[b][keep].tolist(),
                         "response_mask": response[b][keep].tolist()})
    clean = MSNCollator(pad_token_id=0, noise=NoiseConfig(span_length=0))(features)
    noisy = MSNCollator(pad_token_id=0, noise=NoiseConfig(span_length=5, num_spans=2),
                        seed=7)(features)
    assert torch.equal(clean["labels"], noisy["labels"])
    assert torch.equal(clean["attention_mask"], noisy["attention_mask"])
    assert not torch.equal(clean["input_ids"], noisy["input_ids"])
    prompt = clean["labels"] == IGNORE_INDEX
    assert torch.equal(clean["input_ids"][prompt], noisy["input_ids"][prompt])


def test_span_starts_are_uniform_over_response_segments():
    # One example repeated: a prompt of 4 tokens, then assistant turns of 12 and 7
    # tokens separated by a user turn. L = 5 gives 8 + 3 = 11 valid starts.
    seq_len = 30
    response = torch.zeros(seq_len, dtype=torch.bool)
    response[4:16] = True
    response[20:27] = True
    rows = 22_000
    ids = torch.arange(seq_len).repeat(rows, 1)
    response = response.repeat(rows, 1)
    _, noised = apply_msn_noise(ids, response, None, NoiseConfig(span_length=5),
                                torch.Generator().manual_seed(1234))
    assert (noised.sum(-1) == 5).all()
    starts = noised.float().argmax(-1)
    expected = list(range(4, 12)) + list(range(20, 23))
    assert sorted(set(starts.tolist())) == expected  # spans never cross a user turn
    counts = torch.bincount(starts, minlength=seq_len)[expected]
    assert chi2_stat(counts) < chi2_critical(len(expected) - 1)


def test_replacement_source_is_uniform_over_earlier_tokens():
    seq_len = 24
    response = torch.zeros(seq_len, dtype=torch.bool)
    response[19:] = True  # one valid start (19..23) so position 19 is always noised
    rows = 20_000
    ids = torch.arange(seq_len).repeat(rows, 1)
    noisy, noised = apply_msn_noise(ids, response.repeat(rows, 1), None,
                                    NoiseConfig(span_length=5),
                                    torch.Generator().manual_seed(99))
    assert noised[:, 19].all()
    counts = torch.bincount(noisy[:, 19], minlength=19)
    assert counts.numel() == 19  # only ids 0..18 (the earlier positions) occur
    assert chi2_stat(counts) < chi2_critical(18)


def test_seeded_and_reproducible():
    ids, response, attention = random_batch(seed=4)
    config = NoiseConfig(span_length=5, num_spans=2, probability=0.7)

    def run(seed):
        return apply_msn_noise(ids, response, attention, config,
                               torch.Generator().manual_seed(seed))[0]

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_response_shorter_than_span_uses_whole_longest_segment():
    ids = torch.arange(20)[None]
    response = torch.zeros(1, 20, dtype=torch.bool)
    response[0, 6:9] = True  # 3 tokens
    response[0, 12:14] = True  # 2 tokens
    _, noised = apply_msn_noise(ids, response, None, NoiseConfig(span_length=5))
    assert noised[0].nonzero().flatten().tolist() == [6, 7, 8]
    valid, eff = span_start_candidates(response, 5)
    assert eff.tolist() == [3] and valid[0].nonzero().flatten().tolist() == [6]


def test_empty_response_and_disabled_noise_leave_inputs_untouched():
    ids, response, attention = random_batch(seed=5, batch=6)
    response[2] = False
    noisy, noised = apply_msn_noise(ids, response, attention, NoiseConfig(span_length=5),
                                    torch.Generator().manual_seed(0))
    assert not noised[2].any() and torch.equal(noisy[2], ids[2])
    for config in (NoiseConfig(span_length=0), NoiseConfig(probability=0.0)):
        noisy, noised = apply_msn_noise(ids, response, attention, config)
        assert torch.equal(noisy, ids) and not noised.any()


def test_padding_is_neither_noised_nor_a_source():
    seq_len, rows = 16, 4000
    ids = torch.arange(seq_len).repeat(rows, 1)
    attention = torch.zeros(rows, seq_len, dtype=torch.long)
    attention[:, 6:] = 1  # left padding of 6
    response = torch.zeros(rows, seq_len, dtype=torch.bool)
    response[:, 11:] = True
    response[:, :3] = True  # a (wrong) response mask on padding must be ignored
    noisy, noised = apply_msn_noise(ids, response, attention, NoiseConfig(span_length=5),
                                    torch.Generator().manual_seed(3))
    assert noised[:, 11:].all() and not noised[:, :11].any()
    assert (noisy[:, 11:] >= 6).all(), "a replacement was drawn from padding"


def test_first_real_token_is_never_noised():
    ids = torch.arange(8)[None]
    response = torch.ones(1, 8, dtype=torch.bool)  # a response with no prompt at all
    for seed in range(20):
        _, noised = apply_msn_noise(ids, response, None, NoiseConfig(span_length=3),
                                    torch.Generator().manual_seed(seed))
        assert not noised[0, 0]


def test_probability_selects_a_fraction_of_examples():
    rows = 4000
    ids = torch.arange(20).repeat(rows, 1)
    response = torch.zeros(rows, 20, dtype=torch.bool)
    response[:, 8:] = True
    _, noised = apply_msn_noise(ids, response, None, NoiseConfig(probability=0.3),
                                torch.Generator().manual_seed(11))
    frac = noised.any(-1).float().mean().item()
    # binomial sd = sqrt(0.3 * 0.7 / 4000) = 0.0072; 5 sd either side
    assert abs(frac - 0.3) < 0.037


def test_vocab_source_stays_in_range():
    ids, response, attention = random_batch(seed=6)
    noisy, noised = apply_msn_noise(ids, response, attention,
                                    NoiseConfig(source="vocab", vocab_size=37, num_spans=2),
                                    torch.Generator().manual_seed(0))
    assert ((noisy[noised] >= 0) & (noisy[noised] < 37)).all()


def test_config_validation():
    with pytest.raises(ValueError):
        NoiseConfig(span_length=-1)
    with pytest.raises(ValueError):
        NoiseConfig(num_spans=0)
    with pytest.raises(ValueError):
        NoiseConfig(probability=1.5)
    with pytest.raises(ValueError):
        NoiseConfig(source="vocab")
