"""Speculative-decoding counters from vLLM's own metrics, summarised for our server.

vLLM counts per step: drafts (steps that carried drafts), draft tokens (for a tree: its
nodes), accepted tokens (the accepted path's length) and accepted tokens per position.
Because vLLM counts positions along the returned path, "position d" is exactly
"accepted to depth >= d+1" for trees as for chains. MAT (mean accepted tokens per
verification step, counting the bonus token) is 1 + accepted / drafts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

PREFIX = "vllm:spec_decode_"


@dataclass
class SpecDecodeSummary:
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    @property
    def mean_accepted_tokens(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 1.0

    @property
    def acceptance_per_position(self) -> list[float]:
        return [a / self.num_drafts for a in self.accepted_per_position] if self.num_drafts else []

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean_accepted_tokens"] = self.mean_accepted_tokens
        d["acceptance_per_position"] = self.acceptance_per_position
        return d


def spec_decode_summary(metrics) -> SpecDecodeSummary:
    """From `LLM.get_metrics()` (or any list of `vllm.v1.metrics.reader` metrics)."""
    s = SpecDecodeSummary()
    for m in metrics:
        if not m.name.startswith(PREFIX):
            continue
        key = m.name[len(PREFIX):]
        if key == "num_accepted_tokens_per_pos":
            vals = list(m.values)
            if len(vals) > len(s.accepted_per_position):
                s.accepted_per_position += [0] * (len(vals) - len(s.accepted_per_position))
            for i, v in enumerate(vals):
                s.accepted_per_position[i] += int(v)
        elif key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens"):
            setattr(s, key, getattr(s, key) + int(m.value))
    return s
