"""The one interface the HTTP layer needs from an engine.

An engine turns prompt token ids into an async stream of `EngineStep`s (one per decoding
step, so a speculative step that accepts k drafts yields k+1 tokens at once). Closing the
stream early (the client went away, the request timed out) must cancel the generation and
free what it holds; engines implement that in the generator's `finally`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any


class EngineError(Exception):
    """The engine failed on this request (500)."""


class EngineDeadError(EngineError):
    """The engine cannot serve any more requests (/ready turns false; 503)."""


@dataclass(slots=True)
class SamplingSpec:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    method: str = "ar"

    def __post_init__(self) -> None:
        assert self.max_tokens >= 1, self.max_tokens
        assert self.temperature >= 0.0, self.temperature
        assert 0.0 < self.top_p <= 1.0, self.top_p


@dataclass(slots=True)
class EngineStep:
    token_ids: list[int]
    text: str
    num_drafted: int = 0
    accepted_depth: int = 0
    # Depth of the draft tree verified this step, when the engine knows it (per-depth
    # acceptance is accepted_at_depth[d] / drafted_at_depth[d]).
    draft_depth: int = 0
    finish_reason: str | None = None
    # The step generated the end-of-sequence token, which is not in token_ids: it counts
    # for MAT (as `msn generate` counts it), not for completion_tokens.
    eos: bool = False
    # Decoding steps (forward passes) this chunk stands for. One for an engine that
    # streams each step; the vLLM engine's chunks may merge steps (its frontend joins the
    # outputs a slow consumer has not taken yet), so its last chunk carries the rest of
    # the request's count (and its draft totals).
    steps: int = 1


class Engine(abc.ABC):
    """Async facade over a model runner. Tokenization is synchronous and cheap."""

    name: str
    model_name: str
    max_context: int
    methods: tuple[str, ...]
    default_method: str
    # How many generations the engine runs at once (the admission queue's width).
    default_max_running: int
    # True when the steps carry per-request speculative counts (the app then feeds the
    # spec-decode metrics from them); an engine with its own aggregate stats sets False.
    reports_step_metrics: bool = True

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; returns when the engine can serve."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Free the model. Called after in-flight requests drained."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool: ...

    _dead_reason: str | None = None

    @property
    def dead_reason(self) -> str | None:
        """Why the engine cannot serve, once it has failed for good."""
        return self._dead_reason

    def attach_metrics(self, metrics: Any) -> None:
        """Engines with their own statistics (vLLM) export them through the app's
        registry; called by create_app before start()."""

    async def refresh_metrics(self) -> None:
        """Bring engine-side statistics the app exports up to date (called before
        /metrics answers). Default: nothing to fetch."""

    def mark_dead(self, reason: str) -> None:
        if self._dead_reason is None:
            self._dead_reason = reason

    @abc.abstractmethod
    def encode_prompt(self, prompt: str) -> list[int]:
        """Raw completion prompt -> token ids (no chat template)."""

    @abc.abstractmethod
    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat messages -> token ids through the model's chat template, with the
        assistant generation prompt appended."""

    @abc.abstractmethod
    def generate(self, request_id: str, prompt_ids: list[int],
                 sampling: SamplingSpec) -> AsyncIterator[EngineStep]:
        """Stream the decoding steps of one request. The last step has finish_reason set.
        Raises EngineError (or EngineDeadError) on failure."""
