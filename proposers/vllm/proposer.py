"""TR-Jacobi drafts for vLLM: the `custom_class` speculative proposer.

vLLM calls `propose(...)` once per step, after bookkeeping, with each batch row's newly
accepted tokens and token history, and schedules the returned drafts for the next step.
The TR-Jacobi runner (`runner.py`) first hands over what `propose` cannot get from vLLM:
the request ids, each request's draft mode, and the target model's top-K at the previous
step's draft positions (Jacobi feedback). Drafts come from the shared core: a template
(`proposers.templates`) compiled to a tree (`proposers.tree`) and filled from the
candidate table (`proposers.candidates`). The flattened BFS node list is what vLLM sees
as the "draft tokens"; the tree shape goes to the runner through `plan_for(req_id)`.

Without the runner (plain `CPUWorker`), the proposer still works: stateless prompt-lookup
chains, verified by vLLM's own rejection sampler.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch

from proposers.candidates import CandidateTable
from proposers.retrieval import CorpusIndex, NgramIndex, ngram_match
from proposers.templates import chain, load_template
from proposers.tree import TreeSpec, compile_tree
from proposers.vllm.config import TRJacobiConfig
from proposers.vllm.planner import (
    CORPUS,
    FEEDBACK,
    KERNEL,
    NONE,
    SAMPLED,
    TREE,
    CostPlanner,
    batch_bucket,
)
from proposers.vllm.version import check_vllm_version

logger = logging.getLogger(__name__)

# Set to a file path to append one JSON line per planned step (features, scales, the
# rungs chosen, the cost lines and estimates the planner used) and one per verified
# draft or judged shadow (what it was expected to get and got), and one per executed step
# (path, batch, tokens, prompt tokens, seconds: what the cost lines learn from).
TRACE_ENV = "MSN_TRJACOBI_TRACE"

# The planner's chain rung: the retrieval chain when the context repeats, else Jacobi.
CHAIN_RUNG = "chain"


def chain_cut(tokens: int) -> str:
    """The rung of the chain cut to `tokens` draft tokens (config `chain_cuts`). Its
    outcome is known exactly from any longer draft of the same chain: a chain's accepted
    tokens are a prefix, so the cut would have had min(accepted, tokens) accepted."""
    return f"{CHAIN_RUNG}:{tokens}"


PLANNED_MODES = ("tree", "auto")  # auto: sampled requests, planned chains


@dataclass(frozen=True)
class DraftPlan:
    """What was drafted for one request: the (pruned) tree and its node tokens."""

    rung: str  # planner rung (template name or CHAIN_RUNG); statistics key
    tree: TreeSpec
    tokens: tuple[int, ...]  # nodes 1..n, BFS order (what vLLM schedules as drafts)
    feature: int = 0  # the planner's per-request feature when it was drafted

    @property
    def is_chain(self) -> bool:
        return self.tree.is_chain


@dataclass
class BatchFeedback:
    """Handed over by the runner right before `propose`, rows in input-batch order."""

    req_ids: list[str]
    modes: list[str]  # per row: tree / auto / chain / retrieval / off
    topk: dict[str, torch.Tensor] = field(default_factory=dict)  # [m, K] for depths 1..m
    # No request waits for a slot (the batch is all the work there is): the planner then
    # lets the batch draft all together or not at all (planner.py).
    closed: bool = False
    # Per row: tokens the request may still produce (max_tokens, or the model length).
    remaining: list[int] | None = None


# A request's own acceptance record against the planner's shared estimates: each verified
# draft adds (accepted, expected) to decaying sums, and steps without drafts fade them, so
# the scale drifts back to 1 (the shared estimate) when there is no fresh evidence.
SKILL_DECAY, SKILL_FADE, SKILL_PRIOR = 0.7, 0.98, 1.0
SKILL_RANGE = (0.1, 3.0)


# A corpus match running back this many tokens is taken over the request's own match
# (a repeated or regenerated answer; `_lookup`). Its planner feature holds LONG_MATCH as
# the match value: corpus n-grams are at least 2 long (config corpus_min_ngram), so 1
# is free there.
CORPUS_LONG = 6
LONG_MATCH = 1

# Shadow drafts (see `TRJacobiProposer._shadow`): at most this many pending per request.
MAX_SHADOWS = 16

# Phases of a planned `propose` call, timed (`TRJacobiProposer.host_seconds`): retrieval
# lookups, features + judging shadow drafts, the planner, drafting the chosen rungs.
HOST_PHASES = ("lookup", "shadows", "plan", "draft")

# Planning only every IDLE_PLAN_EVERY-th step where it does not pay (`PlanValue`): at
# batch 8 on 2 cores a planned `propose` takes 0.4-0.7 ms of host time on the step's
# critical path (bench_proposer_host.py), and the planner drafts in a few percent of the
# steps of most task groups. Batches in which no request drafted ran at 0.98-0.99 of
# plain vLLM, most of the difference that host time (vllm-cpu-log.md).
IDLE_PLAN_EVERY = 4
PLAN_VALUE_ALPHA = 0.1  # weight of the newest full plan in `PlanValue`'s averages
PLAN_VALUE_MIN = 16  # full plans at a batch-size bucket before it may idle


@dataclass
class PlanValue:
    """Whether planning pays at one batch-size bucket (planner.batch_bucket): the
    seconds of plain decoding a full plan is expected to save (the planner's
    `last_gain`, 0 for no draft) against the host seconds it costs, as exponential
    averages over the bucket's full plans. Where the expected saving is below the cost,
    a skipped plan loses less than it saves, so only every IDLE_PLAN_EVERY-th step plans
    (keeping both averages current, the shadows and the probes going); the others draft
    nothing at the cost of an index update per request. The saving is the planner's
    own expectation, which is optimistic (a plan is picked for looking best), so the rule
    errs toward planning."""

    gain: float = 0.0
    host: float = 0.0
    plans: int = 0
    idle: int = 0  # steps since this bucket's last full plan, while idle

    def add(self, gain: float, host: float) -> None:
        self.plans += 1
        if self.plans == 1:
            self.gain, self.host = gain, host
        else:
            self.gain += PLAN_VALUE_ALPHA * (gain - self.gain)
            self.host += PLAN_VALUE_ALPHA * (host - self.host)

    @property
    def pays(self) -> bool:
        return self.plans < PLAN_VALUE_MIN or self.gain >= self.host

    def skip(self) -> bool:
        """Whether this step skips planning (counts the step)."""
        if self.pays:
            self.idle = 0
            return False
        self.idle += 1
        return self.idle % IDLE_PLAN_EVERY != 0


class Shadow(NamedTuple):
    """A retrieval chain a greedy request could have drafted but did not (a named
    tuple: one is made per request and step, and a frozen dataclass took 3x as long)."""

    start: int  # context length then: the chain would have continued from here
    feature: int
    tokens: tuple[int, ...]
    drafted: int = 0  # tokens of this chain the request did draft then (a shorter cut)


def shadow_accepted(tokens: tuple[int, ...], actual) -> int | None:
    """Draft tokens a chain `tokens` would have had accepted, judged against the tokens
    the request produced after it (`actual`, known so far); None while undecided.

    Under greedy decoding the output is the same whether or not a step drafted (that is
    the plugin's exactness), and a chain's accepted length is its longest prefix equal
    to that output: known as soon as a token differs or the whole chain matched."""
    accepted = 0
    for draft, token in zip(tokens, actual):
        if draft != token:
            return accepted
        accepted += 1
    return accepted if accepted == len(tokens) else None


@dataclass
class RequestState:
    feedback: torch.Tensor | None = None
    index: NgramIndex | None = None  # the retrieval lookup, kept up to date per step
    output_start: int = 0  # context length where the output began (for the corpus)
    to_corpus: bool = True  # False once the corpus was cleared while this request lived
    plan: DraftPlan | None = None
    accepted: float = 0.0  # decaying sum of accepted draft tokens
    expected: float = 0.0  # decaying sum of what the shared estimates expected
    shadows: list[Shadow] = field(default_factory=list)

    @property
    def skill(self) -> float:
        """How this request's drafts fare against the shared estimate (1: as expected)."""
        ratio = (self.accepted + SKILL_PRIOR) / (self.expected + SKILL_PRIOR)
        return min(max(ratio, SKILL_RANGE[0]), SKILL_RANGE[1])

    def observe(self, accepted: float, expected: float) -> None:
        self.accepted = self.accepted * SKILL_DECAY + accepted
        self.expected = self.expected * SKILL_DECAY + expected

    def fade(self) -> None:
        self.accepted *= SKILL_FADE
        self.expected *= SKILL_FADE


class TRJacobiProposer:
    def __init__(self, vllm_config):
        check_vllm_version()
        self.config = TRJacobiConfig.from_vllm(vllm_config)
        self.max_drafts = vllm_config.speculative_config.num_speculative_tokens
        self.trees = {n: compile_tree(load_template(n)) for n in self.config.draft_templates()}
        generator = torch.Generator().manual_seed(self.config.seed)
        self.tables = {
            n: CandidateTable(t, generator, self.config.max_ngram, self.config.fill_noise)
            for n, t in self.trees.items()
        }
        too_big = [n for n, t in self.trees.items() if t.num_nodes > self.max_drafts]
        if too_big:
            raise ValueError(
                f"num_speculative_tokens={self.max_drafts} is smaller than template(s) "
                f"{too_big}; use proposers.vllm.engine_kwargs() to size it"
            )
        self.feedback_k = max(t.template.top_k for t in self.trees.values())
        chains = [(chain_cut(k), KERNEL) for k in self.config.chain_cuts] + [
            (CHAIN_RUNG, KERNEL)]
        self.cuts = {chain_cut(k): k for k in self.config.chain_cuts}
        if self.config.mode == "tree":
            rungs = chains if self.config.chain_rung else []
            rungs += [(n, KERNEL if self.trees[n].is_chain else TREE)
                      for n in self.config.templates]
        else:  # no tree ladder (config.draft_templates): planned requests get chains
            rungs = chains
        sizes = {n: t.num_nodes for n, t in self.trees.items()}
        sizes[CHAIN_RUNG] = max(sizes.get(self.config.chain_template, 0),
                                sizes.get(self.config.retrieval_template, 0))
        sizes.update(self.cuts)
        # The most tokens each rung's draft can have accepted: a tree's deepest path, a
        # chain's length (the planner probes no rung that could not pay even so).
        depths = {n: t.max_depth for n, t in self.trees.items()}
        depths[CHAIN_RUNG] = sizes[CHAIN_RUNG]
        depths.update(self.cuts)
        self.planner = CostPlanner(rungs, cost_aware=self.config.cost_aware,
                                   min_gain=self.config.min_gain,
                                   closed_value=self.config.closed_value,
                                   probe_share=self.config.probe_share, max_nodes=sizes,
                                   max_depth=depths,
                                   prior_weight=self.config.estimate_prior,
                                   cost_buckets=self.config.cost_buckets,
                                   size_costs=self.config.size_costs)
        self.states: dict[str, RequestState] = {}
        self._chains: dict[int, TreeSpec] = {}
        self.batch: BatchFeedback | None = None
        self.num_proposals = 0
        self.num_feedback_proposals = 0
        self.num_shadow_outcomes = 0  # shadow drafts judged (`_shadow`)
        # Shadows mirror the retrieval chain exactly only when empty slots are pruned.
        self.shadows = not self.config.fill_noise
        self.retrieval_depth = self.trees[self.config.retrieval_template].max_depth
        # Earlier requests' outputs, for requests whose own context has no match
        # (`_lookup`; retrieval.CorpusIndex). Fed by `finish`.
        self.corpus = (CorpusIndex(self.config.corpus_tokens, self.config.max_ngram,
                                   self.config.corpus_min_ngram)
                       if self.config.corpus_tokens else None)
        self.num_corpus_lookups = 0  # request-steps whose retrieval chain came from it
        self.num_corpus_drafts = 0  # ... and that drafted
        # Host seconds of planned `propose` calls by phase (`HOST_PHASES`): what drafting
        # costs a step before any draft is verified (trjacobi_stats "propose_seconds").
        self.host_seconds = dict.fromkeys(HOST_PHASES, 0.0)
        # Per batch-size bucket: does planning pay (`PlanValue`)? Steps that skipped it.
        self.plan_values: dict[int, PlanValue] = {}
        self.idle_steps = 0
        trace = os.environ.get(TRACE_ENV)
        self._trace = open(trace, "a", buffering=1) if trace else None  # noqa: SIM115

    def chain_tree(self, length: int) -> TreeSpec:
        """Chain shape for drafts we did not plan (e.g. vLLM's placeholders on resume)."""
        if length not in self._chains:
            self._chains[length] = compile_tree(chain(length))
        return self._chains[length]

    def load_model(self, model) -> None:
        """The CPU runner calls this unconditionally; the target model is our drafter."""

    # runner -> proposer
    def set_target_feedback(self, batch: BatchFeedback) -> None:
        self.batch = batch
        for req_id, topk in batch.topk.items():
            self._state(req_id).feedback = topk

    def _state(self, req_id: str) -> RequestState:
        state = self.states.get(req_id)
        if state is None:  # (`setdefault` would build a state per call: twice a row a step)
            state = self.states[req_id] = RequestState()
        return state

    def release(self, req_ids) -> None:
        """Free per-request state (finished or preempted requests)."""
        for req_id in req_ids:
            self.states.pop(req_id, None)

    def finish(self, req_ids) -> None:
        """Requests that finished (or were aborted): their outputs join the shared corpus,
        led in by the last `max_ngram` tokens before them, and their state is freed. A
        request never looked up (drafting off, or no step after its prefill) adds
        nothing. Preempted requests are only `release`d: they come back."""
        if self.corpus is not None:
            for req_id in req_ids:
                state = self.states.get(req_id)
                if state is not None and state.index is not None and state.to_corpus:
                    start = max(state.output_start - self.config.max_ngram, 0)
                    self.corpus.add(state.index.tokens[start:])
        self.release(req_ids)

    def clear_corpus(self) -> None:
        """Forget every earlier output, and those of the requests alive now (benchmarks:
        each timed run starts from none; a request that finished just before joins the
        corpus only at the engine's next step, which would be after this)."""
        if self.corpus is not None:
            self.corpus.clear()
        for state in self.states.values():
            state.to_corpus = False

    def record_outcome(self, req_id: str, rung: str, feature: int, nodes: int,
                       accepted: int, shadow: bool = False, drafted: int = 0) -> None:
        """A planned draft was verified (or a shadow judged): teach the planner and the
        request's own record. A chain also teaches the cuts of it longer than the
        `drafted` tokens (`chain_cut`): those shorter than its `nodes` would have had
        min(accepted, cut) accepted; those at least as long, when the chain was not cut
        itself, would have drafted the same chain."""
        expected = self.planner.expected_accepted(rung, feature)
        if self._trace is not None:
            self._trace.write(json.dumps({
                "step": self.planner.step, "outcome": req_id, "rung": rung,
                "feature": feature, "nodes": nodes, "accepted": accepted,
                "expected": None if expected is None else round(expected, 3),
                "shadow": shadow}) + "\n")
        self.planner.record_request(rung, feature, nodes, accepted)
        if rung == CHAIN_RUNG or rung in self.cuts:
            whole = rung == CHAIN_RUNG or nodes < self.cuts[rung]
            for cut, k in self.cuts.items():
                if cut == rung or k <= drafted or (k >= nodes and not whole):
                    continue
                self.planner.record_request(cut, feature, min(k, nodes), min(accepted, k))
                self.planner.last_used(cut, feature)
        state = self.states.get(req_id)
        if state is not None and expected is not None and not drafted:
            state.observe(float(accepted), expected)

    def plan_for(self, req_id: str) -> DraftPlan | None:
        state = self.states.get(req_id)
        return state.plan if state else None

    # vLLM -> proposer
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, **_: object) -> list[list[int]]:
        batch, self.batch = self.batch, None
        rows = [row for row, sampled in enumerate(sampled_token_ids) if sampled]

        def context(row: int) -> torch.Tensor:
            # Built only for the rows that draft: at batch 8 most rows draft nothing,
            # and a copy per row and step was the largest line of the planned path.
            return torch.from_numpy(token_ids_cpu[row, : num_tokens_no_spec[row]]).long()

        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        if batch is None:
            for row in rows:
                plan = self._draft(self.config.retrieval_template, context(row), None)
                drafts[row] = list(plan.tokens) if plan else []
            return drafts
        # Planned requests (greedy trees, sampled "auto" chains): the planner picks each
        # one's rung (or none) for this step.
        clock = [time.perf_counter()]
        host = self.host_seconds

        def lap(phase: str) -> None:
            now = time.perf_counter()
            host[phase] += now - clock[0]
            clock[0] = now

        planned = [row for row in rows if batch.modes[row] in PLANNED_MODES]
        value = None
        # Only where every drafting request is planned (chain and retrieval requests
        # draft every step as asked) and plans are priced (without cost awareness every
        # plan drafts the largest rung).
        if planned and self.config.idle_planning and self.config.cost_aware and all(
                batch.modes[row] in PLANNED_MODES or batch.modes[row] == "off" for row in rows):
            bucket = batch_bucket(len(rows))
            value = self.plan_values.get(bucket)
            if value is None:
                value = self.plan_values[bucket] = PlanValue()
            if value.skip():
                self._idle_step(batch, rows, num_tokens_no_spec, token_ids_cpu)
                return drafts
        start = clock[0]
        lookups = {row: self._lookup(batch.req_ids[row],
                                     token_ids_cpu[row, : num_tokens_no_spec[row]])
                   for row in rows if batch.modes[row] != "off"}
        lap("lookup")
        features = {row: self._feature(None, batch.req_ids[row],
                                       sampled=batch.modes[row] == "auto",
                                       match=lookups[row][1], corpus=lookups[row][2])
                    for row in planned}
        if self.shadows:
            for row in planned:
                self._judge_shadows(batch.req_ids[row])
        lap("shadows")
        scales = [self.states[batch.req_ids[r]].skill if batch.req_ids[r] in self.states
                  else 1.0 for r in planned]
        remaining = (None if batch.remaining is None
                     else [batch.remaining[r] for r in planned])
        rungs = dict(zip(planned, self.planner.plan([features[r] for r in planned],
                                                   batch=len(rows), scales=scales,
                                                   closed=batch.closed
                                                   and bool(self.config.closed_batches),
                                                   remaining=remaining)))
        lap("plan")
        if self._trace is not None and planned:
            self._write_trace([features[r] for r in planned], scales,
                              [rungs[r] for r in planned], batch.closed)
        for row in rows:
            req_id, mode = batch.req_ids[row], batch.modes[row]
            state = self._state(req_id)
            found = lookups[row][0] if row in lookups else None
            if mode == "off":
                plan = None
            elif mode in PLANNED_MODES:
                plan = None if rungs[row] == NONE else self._plan_rung(
                    rungs[row], features[row], context(row), state.feedback, found)
                if plan is None:
                    state.fade()
            else:  # chain / retrieval, as the request asked
                plan = self._chain(context(row), state.feedback, jacobi=mode == "chain",
                                   found=found)
            if row in lookups and lookups[row][2]:
                self.num_corpus_lookups += 1
                self.num_corpus_drafts += plan is not None
            drafted = len(plan.tokens) if plan is not None and (
                plan.rung == CHAIN_RUNG or plan.rung in self.cuts) else 0
            if self.shadows and mode == "tree" and len(lookups[row][0]) > drafted:
                self._shadow(state, features[row], int(num_tokens_no_spec[row]),
                             lookups[row][0], drafted)
            if mode != "off" and state.feedback is not None and state.feedback.numel():
                self.num_feedback_proposals += 1
            state.plan = plan
            state.feedback = None  # feedback is per step; a stale one would mislead
            self.num_proposals += plan is not None  # request-steps that drafted
            drafts[row] = list(plan.tokens) if plan else []
        lap("draft")
        if value is not None:
            value.add(self.planner.last_gain, clock[0] - start)
        return drafts

    def _idle_step(self, batch: BatchFeedback, rows: list[int], num_tokens_no_spec,
                   token_ids_cpu) -> None:
        """A step that skips planning (`PlanValue`): no request drafts; each one's
        retrieval index still takes in its new tokens (what `finish` gives the corpus)."""
        self.idle_steps += 1
        for row in rows:
            state = self.states.get(batch.req_ids[row])
            if state is None:
                continue
            if state.index is not None:
                state.index.sync(token_ids_cpu[row, : num_tokens_no_spec[row]])
            state.plan = None
            state.feedback = None

    def trace_step(self, path: str, batch: int, tokens: int, prefill: int, seconds: float) -> None:
        """One line per executed step (with the trace on): what the cost lines learn from."""
        if self._trace is not None:
            self._trace.write(json.dumps({
                "step": self.planner.step, "path": path, "batch": batch, "tokens": tokens,
                "prefill": prefill, "seconds": round(seconds, 6)}) + "\n")

    def _write_trace(self, features, scales, rungs, closed) -> None:
        planner = self.planner
        self._trace.write(json.dumps({
            "step": planner.step, "closed": closed, "features": features,
            "scales": [round(x, 3) for x in scales], "rungs": rungs,
            "lines": planner.cost_lines(),
            "estimates": {f"{r}@{f}": [round(e.accepted.value, 3), round(e.nodes.value, 2)]
                          for (r, f), e in planner.estimates.items()
                          if f in features and e.accepted.value is not None},
        }) + "\n")

    def _feature(self, context: torch.Tensor | None, req_id: str, sampled: bool,
                 match: int | None = None, corpus: bool = False) -> int:
        """The planner's per-request feature: retrieval match length (`match`, when
        the caller has looked it up; else from `context`), whether that match is in the
        shared corpus rather than the request's own context, feedback at hand, sampled
        or not (planner.py)."""
        state = self.states.get(req_id)
        feedback = state is not None and state.feedback is not None and state.feedback.numel()
        if match is None:
            match = ngram_match(context, 1, self.config.max_ngram)[1]
        return (match + (FEEDBACK if feedback else 0) + (CORPUS if corpus else 0)
                + (SAMPLED if sampled else 0))

    # Shadow drafts: a greedy request that does not draft the chain rung this step
    # records the retrieval chain that rung would have drafted (the same lookup, made
    # for its feature anyway); once the request's next tokens show how much of it would
    # have been accepted (`shadow_accepted`), the planner and the request's own record
    # learn it, as from a drafted chain, at no compute. Retrieval hits come and go with
    # the text (translation and rag against qa and math at batch 8), and estimates that
    # only drafts and probes refreshed went stale while drafting was off: a batch of
    # translation requests after qa then drafted nothing. Jacobi chains (feedback) and
    # trees need the model's outputs at their positions, so they are still probed.
    def _shadow(self, state: RequestState, feature: int, start: int,
                found: list[int], drafted: int = 0) -> None:
        """Record the chain `found` for a context of `start` tokens."""
        if len(state.shadows) >= MAX_SHADOWS:
            state.shadows.pop(0)
        state.shadows.append(Shadow(start, feature, tuple(found), drafted))

    def _lookup(self, req_id: str, context: np.ndarray) -> tuple[list[int], int, bool]:
        """The retrieval chain for a request's context now, the planner's match value,
        and whether it came from the shared corpus: the request's own `NgramIndex`
        (brought up to date with `context`), unless that has no match at all or the
        corpus match runs back at least CORPUS_LONG tokens (a repeat). The match value
        is the n-gram length, or LONG_MATCH for a long corpus match.

        Replaying real answers offline (`benchmarks/vllm/retrieval_sources.py`): on
        distinct questions an own match of 2-3 tokens predicted far better than a corpus
        3-gram beside it (own 2-gram 1.4-2.5 accepted tokens a lookup, the corpus's
        0.3-0.8), and with no own match a corpus 3-gram gave 1.7-2.8; on a second round
        of the same questions, corpus matches running back 6+ tokens gave 5.6-9.3 where
        the own chain had 0.6-5.8. This rule was within 0.2% of the best rule replayed
        on distinct questions and within 1% on repeated ones (accepted tokens a lookup
        2.2 -> 7.2 on the base model, 3.2 -> 6.9 on the MSN model). Letting any longer
        corpus n-gram win measured slower on the base model's qa at batch 1
        (`vllm_cpu_base_interleaved_b1-corpus.json`)."""
        state = self._state(req_id)
        if state.index is None:
            state.index = NgramIndex(self.config.max_ngram)
            state.output_start = max(len(context) - 1, 0)  # prompt + the first token
        state.index.sync(context)
        found, n = state.index.match(self.retrieval_depth)
        if self.corpus is not None and len(self.corpus):
            shared, m, length = self.corpus.match(state.index.tokens, self.retrieval_depth,
                                                  extend=CORPUS_LONG)
            if length >= CORPUS_LONG:
                return shared, LONG_MATCH, True
            if m and not n:
                return shared, m, True
        return found, n, False

    def _judge_shadows(self, req_id: str) -> None:
        """Judge a request's pending shadows against its tokens so far (its index's
        context, which `_lookup` brought up to date this step)."""
        state = self.states.get(req_id)
        if state is None or not state.shadows or state.index is None:
            return
        context = state.index.tokens
        pending = []
        for shadow in state.shadows:
            actual = context[shadow.start: shadow.start + len(shadow.tokens)]
            accepted = shadow_accepted(shadow.tokens, actual)
            if accepted is None:
                pending.append(shadow)
                continue
            self.num_shadow_outcomes += 1
            self.planner.last_used(CHAIN_RUNG, shadow.feature)
            self.record_outcome(req_id, CHAIN_RUNG, shadow.feature, len(shadow.tokens),
                                accepted, shadow=True, drafted=shadow.drafted)
        state.shadows = pending

    def _plan_rung(self, rung: str, feature: int, context: torch.Tensor,
                   feedback: torch.Tensor | None, found=None) -> DraftPlan | None:
        if rung == NONE:
            return None
        if rung == CHAIN_RUNG or rung in self.cuts:
            plan = self._chain(context, feedback, jacobi=True, found=found)
            k = self.cuts.get(rung)
            if plan is not None and k is not None and len(plan.tokens) > k:
                plan = replace(plan, tree=plan.tree.subtree(torch.arange(k + 1)),
                               tokens=plan.tokens[:k])
        else:
            plan = self._draft(rung, context, feedback, found)
        if plan is None:  # nothing to draft: the planner learns that this rung is empty
            self.planner.record_request(rung, feature, 0, 0)
            return None
        return replace(plan, rung=rung, feature=feature)

    def _chain(self, context: torch.Tensor, feedback: torch.Tensor | None,
               jacobi: bool, found=None) -> DraftPlan | None:
        """The retrieval chain when the context repeats (or `found`, the chain `_lookup`
        found), else (if `jacobi`) the Jacobi chain from the target's feedback."""
        plan = self._draft(self.config.retrieval_template, context, None, found)
        if plan is None and jacobi:
            plan = self._draft(self.config.chain_template, context, feedback, found)
        return plan

    def _draft(self, name: str, context: torch.Tensor, feedback: torch.Tensor | None,
               found=None) -> DraftPlan | None:
        """Draft template `name`; its retrieval column is `found` when given (`_lookup`:
        the request's own index or the shared corpus), else looked up in `context`."""
        table = self.tables[name]
        table.reset()
        if feedback is not None and feedback.numel():
            table.set_feedback(feedback)
        table.set_retrieval(context, found)
        tokens, keep = table.node_tokens(int(context[-1]), context)
        if tokens.numel() <= 1:
            return None
        tree = self.trees[name].subtree(keep)
        return DraftPlan(name, tree, tuple(tokens[1:].tolist()))
