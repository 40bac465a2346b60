"""Prometheus metrics, all prefixed `msn_`, in a registry owned by one app instance.

Speculative decoding is observed per step:
- `msn_spec_decode_accepted_tokens_per_step` (histogram): tokens a decoding step emitted,
  bonus token included; its sum/count is the mean accepted tokens per step (MAT).
- `msn_spec_decode_num_draft_tokens_total` vs `msn_spec_decode_num_accepted_tokens_total`:
  draft tokens verified vs draft tokens accepted (bonus tokens excluded).
- `msn_spec_decode_{draft,accepted}_tokens_per_depth_total{depth}`: acceptance at tree depth
  d is accepted[d] / draft[d] (a step that accepted a drafts accepted depths 1..a). Where an
  engine does not report its tree depth, use accepted[d] / msn_spec_decode_num_drafts_total,
  vLLM's per-position convention.

With the TR-Jacobi plugin on vLLM, `msn_trjacobi_*` export the worker's own counters
(`trjacobi_stats`, read when /metrics is scraped: `TRJacobiCollector`): what the planner
chose per rung, steps per attention path, the proposer's host time by phase, and the shared
corpus of earlier outputs (its size, and request-steps whose retrieval chain came from it).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# The *_created series double the exposition for no operational use (vLLM drops them too).
disable_created_metrics()

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                    1.5, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                0.3, 0.5, 1.0, 2.5)
_TOKENS_PER_STEP_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 16, 24, 32)
_TOKEN_COUNT_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()

        self.http_requests = Counter(
            "msn_http_requests", "HTTP requests by route, method and status code.",
            ["route", "method", "status"], registry=r)
        self.http_request_duration = Histogram(
            "msn_http_request_duration_seconds",
            "HTTP request latency until the last byte was sent (streams included).",
            ["route"], buckets=_LATENCY_BUCKETS, registry=r)

        self.requests_running = Gauge(
            "msn_requests_running", "Generations running in the engine.", registry=r)
        self.requests_waiting = Gauge(
            "msn_requests_waiting", "Admitted generations waiting for a running slot "
            "(queue depth).", registry=r)
        self.requests_rejected = Counter(
            "msn_requests_rejected", "Generation requests refused before running, by reason "
            "(queue_full, not_ready, draining).", ["reason"], registry=r)
        self.requests_finished = Counter(
            "msn_requests_finished", "Generation requests by how they ended (stop, length, "
            "client_disconnect, timeout, error).", ["finish_reason"], registry=r)
        self.engine_ready = Gauge(
            "msn_engine_ready", "1 when the engine can serve, else 0.", registry=r)

        self.queue_time = Histogram(
            "msn_request_queue_time_seconds", "Time from arrival to a running slot.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "msn_time_to_first_token_seconds", "Time from arrival to the first generated "
            "token (queueing and prefill included).", buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "msn_inter_token_latency_seconds", "Time between consecutive decoding steps "
            "that emitted tokens (what a streaming client sees between deltas).",
            buckets=_ITL_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "msn_time_per_output_token_seconds", "Per request: (end - first token) / "
            "(output tokens - 1).", buckets=_ITL_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "msn_request_e2e_latency_seconds", "Time from arrival to the last token of "
            "finished generations.", buckets=_LATENCY_BUCKETS, registry=r)

        self.prompt_tokens = Counter(
            "msn_prompt_tokens", "Prompt tokens of generations that ran.", registry=r)
        self.generation_tokens = Counter(
            "msn_generation_tokens", "Generated tokens.", registry=r)
        self.request_prompt_tokens = Histogram(
            "msn_request_prompt_tokens", "Prompt length per request.",
            buckets=_TOKEN_COUNT_BUCKETS, registry=r)
        self.request_generation_tokens = Histogram(
            "msn_request_generation_tokens", "Generated tokens per request.",
            buckets=_TOKEN_COUNT_BUCKETS, registry=r)

        self.spec_accepted_per_step = Histogram(
            "msn_spec_decode_accepted_tokens_per_step", "Tokens emitted per decoding step, "
            "bonus token included (sum/count = MAT), by decoding method.", ["method"],
            buckets=_TOKENS_PER_STEP_BUCKETS, registry=r)
        self.spec_num_drafts = Counter(
            "msn_spec_decode_num_drafts", "Decoding steps that verified at least one draft "
            "token.", ["method"], registry=r)
        self.spec_draft_tokens = Counter(
            "msn_spec_decode_num_draft_tokens", "Draft tokens verified (tree nodes).",
            ["method"], registry=r)
        self.spec_accepted_tokens = Counter(
            "msn_spec_decode_num_accepted_tokens", "Draft tokens accepted (bonus tokens "
            "excluded).", ["method"], registry=r)
        self.spec_draft_per_depth = Counter(
            "msn_spec_decode_draft_tokens_per_depth", "Steps that drafted at tree depth d.",
            ["method", "depth"], registry=r)
        self.spec_accepted_per_depth = Counter(
            "msn_spec_decode_accepted_tokens_per_depth", "Steps that accepted the draft at "
            "tree depth d.", ["method", "depth"], registry=r)
        # The TR-Jacobi worker's own counters (vLLM engine with the plugin; `update`d
        # by the engine when /metrics is scraped).
        self.trjacobi = TRJacobiCollector()
        r.register(self.trjacobi)

    def observe_step(self, method: str, num_tokens: int, num_drafted: int,
                     accepted_depth: int, draft_depth: int) -> None:
        """One decoding step of one request."""
        self.spec_accepted_per_step.labels(method=method).observe(num_tokens)
        if num_drafted <= 0:
            return
        self.spec_num_drafts.labels(method=method).inc()
        self.spec_draft_tokens.labels(method=method).inc(num_drafted)
        self.spec_accepted_tokens.labels(method=method).inc(accepted_depth)
        for depth in range(1, draft_depth + 1):
            self.spec_draft_per_depth.labels(method=method, depth=str(depth)).inc()
        for depth in range(1, accepted_depth + 1):
            self.spec_accepted_per_depth.labels(method=method, depth=str(depth)).inc()

    def observe_spec_aggregate(self, method: str, num_drafts: int, num_draft_tokens: int,
                               num_accepted_tokens: int, accepted_per_pos: list[int],
                               drafted_per_pos: list[int]) -> None:
        """Aggregated counts of one engine iteration (vLLM's SpecDecodingStats).

        accepted_per_pos[i] drafts accepted position i+1, so exactly a drafts accepted
        `a` tokens where a = accepted_per_pos[a-1] - accepted_per_pos[a]: the per-step
        histogram is rebuilt exactly from the per-position counts."""
        if num_drafts <= 0:
            return
        self.spec_num_drafts.labels(method=method).inc(num_drafts)
        self.spec_draft_tokens.labels(method=method).inc(num_draft_tokens)
        self.spec_accepted_tokens.labels(method=method).inc(num_accepted_tokens)
        for i, count in enumerate(drafted_per_pos):
            if count:
                self.spec_draft_per_depth.labels(method=method, depth=str(i + 1)).inc(count)
        for i, count in enumerate(accepted_per_pos):
            if count:
                self.spec_accepted_per_depth.labels(method=method, depth=str(i + 1)).inc(count)
        at_least = [num_drafts, *accepted_per_pos, 0]
        hist = self.spec_accepted_per_step.labels(method=method)
        for accepted in range(len(at_least) - 1):
            for _ in range(at_least[accepted] - at_least[accepted + 1]):
                hist.observe(accepted + 1)


class TRJacobiCollector:
    """The TR-Jacobi worker's cumulative counters (`runner.trjacobi_stats()`), as of the
    last `update`: a custom collector, because the worker keeps the totals and a scrape
    only copies them. Nothing is exported before the first update."""

    def __init__(self) -> None:
        self.stats: dict | None = None

    def update(self, stats: dict) -> None:
        self.stats = stats

    def describe(self):
        return []  # dynamic (nothing before the first update): no registration-time names

    def collect(self):
        s = self.stats
        if s is None:
            return
        counters = [
            ("proposals", "Request-steps that drafted (any rung).", s.get("proposals")),
            ("verified_drafts", "Drafted request-steps verified by the worker.",
             s.get("verified_drafts")),
            ("accepted_tokens", "Draft tokens the worker's verification accepted.",
             s.get("accepted_tokens")),
            ("tree_steps", "Steps that verified at least one tree (the tree attention path).",
             s.get("tree_steps")),
            ("undrafted_steps", "Steps in which no request drafted.", s.get("undrafted_steps")),
            ("probes", "Drafts the planner made to refresh a stale estimate.", s.get("probes")),
            ("shadow_outcomes", "Undrafted retrieval chains judged against the output.",
             s.get("shadow_outcomes")),
            ("idle_steps", ("Steps that skipped drafting's planning where it did not pay "
                            "for its host time."), s.get("idle_steps")),
            ("draft_seconds", ("Host seconds spent drafting between steps (vLLM's drafter "
                               "call included)."), s.get("draft_seconds")),
        ]
        for name, doc, value in counters:
            if value is not None:
                yield CounterMetricFamily(f"msn_trjacobi_{name}", doc, value=float(value))
        corpus = s.get("corpus") or {}
        for family, name, doc in (
                (GaugeMetricFamily, "tokens", ("Tokens held by the shared corpus of earlier "
                                              "outputs.")),
                (GaugeMetricFamily, "docs", "Finished outputs held by the shared corpus."),
                (CounterMetricFamily, "lookups", ("Request-steps whose retrieval chain came "
                                                 "from the shared corpus.")),
                (CounterMetricFamily, "drafts", "Of those, the request-steps that drafted.")):
            if name in corpus:
                yield family(f"msn_trjacobi_corpus_{name}", doc, value=float(corpus[name]))
        yield _labelled_counter("msn_trjacobi_rung_request_steps", "Request-steps the "
                                "planner gave each rung (none: no speculation).", "rung",
                                s.get("rungs"))
        yield _labelled_counter("msn_trjacobi_proposer_seconds", "The proposer's host seconds "
                                "by phase (lookup, shadows, plan, draft).", "phase",
                                s.get("propose_seconds"))
        steps = CounterMetricFamily("msn_trjacobi_steps", "Decode steps by path (plain: no "
                                    "drafts, chain, tree).", labels=["path"])
        step_s = CounterMetricFamily("msn_trjacobi_step_seconds", "Forward + sampling seconds "
                                     "of decode steps by path.", labels=["path"])
        for path, cell in sorted((s.get("paths") or {}).items()):
            steps.add_metric([path], float(cell.get("steps", 0)))
            step_s.add_metric([path], float(cell.get("seconds", 0.0)))
        yield steps
        yield step_s


def _labelled_counter(name: str, doc: str, label: str, values: dict | None) -> CounterMetricFamily:
    """A counter family with one sample per (label value, total) of `values`."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted((values or {}).items()):
        family.add_metric([key], float(value))
    return family

