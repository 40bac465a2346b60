"""MSN input corruption (algorithm.md section 2), vectorised over a padded batch.

For every example that is selected for noise (probability `probability`), `num_spans`
span starts are drawn uniformly among the positions where a whole span of `span_length`
response tokens fits inside one contiguous response segment (one assistant turn). Each
input token of a span is replaced by a token drawn uniformly from the tokens that precede
it in the same example, replacements made earlier in that example included. Labels are
built by the caller from the clean ids, so they never see the noise.

Documented edge cases (tested in tests/test_training_noise.py):
- a response segment shorter than `span_length`: the span shrinks to the longest
  response segment of that example (noise as dense as the example allows, capped at L);
- an empty response (no response tokens) or `span_length == 0`: the example is untouched;
- padding (attention_mask == 0, left or right) is never noised nor used as a source;
- the very first real token of an example has no predecessor, so it is never noised;
- several spans may overlap; their union is noised, with the same sequential semantics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

NoiseSource = Literal["context", "vocab"]


@dataclass(frozen=True, slots=True)
class NoiseConfig:
    span_length: int = 5
    num_spans: int = 1
    probability: float = 1.0
    source: NoiseSource = "context"
    # Only for source="vocab": replacements come from [0, vocab_size).
    vocab_size: int | None = None

    def __post_init__(self) -> None:
        if self.span_length < 0:
            raise ValueError(f"span_length must be >= 0, got {self.span_length}")
        if self.num_spans < 1:
            raise ValueError(f"num_spans must be >= 1, got {self.num_spans}")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {self.probability}")
        if self.source not in ("context", "vocab"):
            raise ValueError(f"source must be 'context' or 'vocab', got {self.source!r}")
        if self.source == "vocab" and not self.vocab_size:
            raise ValueError("source='vocab' needs vocab_size")

    @property
    def enabled(self) -> bool:
        return self.span_length > 0 and self.probability > 0.0


def _run_lengths(mask: torch.Tensor) -> torch.Tensor:
    """Length of the run of True that ends at each position (0 where mask is False)."""
    idx = torch.arange(mask.shape[-1], device=mask.device).expand_as(mask)
    last_false = torch.where(~mask, idx, torch.full_like(idx, -1)).cummax(dim=-1).values
    return torch.where(mask, idx - last_false, torch.zeros_like(idx))


def span_start_candidates(response_mask: torch.Tensor, span_length: int
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid span starts (B, T) bool and the effective span length per example (B,).

    A start s is valid when positions s .. s+L_b-1 all lie in one response segment,
    with L_b = min(span_length, longest response segment of example b).
    """
    runs = _run_lengths(response_mask)
    eff_len = runs.max(dim=-1).values.clamp(max=span_length)  # (B,)
    # A span of L_b starting at s ends at e = s + L_b - 1 and fits iff the run ending at
    # e is at least L_b long; so mark ends and shift them back by L_b - 1.
    seq_len = response_mask.shape[-1]
    idx = torch.arange(seq_len, device=response_mask.device).expand_as(response_mask)
    ends = idx + (eff_len[:, None] - 1)  # eff_len 0 (no response) gives idx - 1
    ends_in = ends < seq_len
    run_at_end = runs.gather(1, ends.clamp(min=0, max=seq_len - 1))
    valid = ends_in & (run_at_end >= eff_len[:, None]) & (eff_len[:, None] > 0)
    return valid, eff_len


def apply_msn_noise(input_ids: torch.Tensor, response_mask: torch.Tensor,
                    attention_mask: torch.Tensor | None, config: NoiseConfig,
                    generator: torch.Generator | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (noisy_ids, noised) where `noised` marks the positions that were resampled.

    input_ids, response_mask, attention_mask: (B, T). Nothing is modified in place.
    A resampled token may equal the original (it is drawn from the context), so compare
    against `noised`, not against the ids, to see where noise was applied.
    """
    assert input_ids.dim() == 2 and input_ids.shape == response_mask.shape
    device = input_ids.device
    batch, seq_len = input_ids.shape
    real = (attention_mask.bool() if attention_mask is not None
            else torch.ones_like(input_ids, dtype=torch.bool))
    # real tokens strictly before each position: the pool a replacement is drawn from
    n_before = real.long().cumsum(-1) - real.long()
    noisable = response_mask.bool() & real & (n_before > 0)
    ids = input_ids.clone()
    noised = torch.zeros_like(noisable)
    if not config.enabled or seq_len == 0:
        return ids, noised

    valid, eff_len = span_start_candidates(noisable, config.span_length)
    apply = valid.any(-1)
    if config.probability < 1.0:
        coin = torch.rand(batch, generator=generator, device=device)
        apply &= coin < config.probability
    if not apply.any():
        return ids, noised

    # Uniform over valid starts; rows without any get dummy weights and are masked out.
    weights = torch.where(apply[:, None], valid, torch.ones_like(valid)).float()
    starts = torch.multinomial(weights, config.num_spans, replacement=True,
                               generator=generator)
    # Applying spans in order of their start keeps "earlier replacements included" exact
    # even where spans overlap: every position before the one being drawn is final.
    starts = starts.sort(dim=-1).values
    rows = torch.arange(batch, device=device)
    real_cum = real.long().cumsum(-1)  # k-th real token (1-based) sits at searchsorted(k)
    for span in range(config.num_spans):
        for offset in range(config.span_length):
            pos = starts[:, span] + offset
            active = apply & (offset < eff_len) & (pos < seq_len)
            pos = pos.clamp(max=seq_len - 1)
            if config.source == "vocab":
                new = torch.randint(0, config.vocab_size, (batch,), generator=generator,
                                    device=device)
            else:
                pool = n_before[rows, pos].clamp(min=1)
                k = (torch.rand(batch, generator=generator, device=device) * pool).long()
                k = torch.minimum(k, pool - 1)  # rand() < 1 but float rounding can hit pool
                src = torch.searchsorted(real_cum, (k + 1)[:, None]).squeeze(-1)
                new = ids[rows, src.clamp(max=seq_len - 1)]
            ids[rows, pos] = torch.where(active, new, ids[rows, pos])
            noised[rows, pos] |= active
    return ids, noised
