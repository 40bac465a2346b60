"""Fast checks of the vLLM plugin's pieces (no engine start).

The signature test is the tripwire for vLLM upgrades: the runner overrides private
methods, and if vLLM renames or reshapes one of them this test fails with the name.
"""

from __future__ import annotations

import inspect

import pytest
import torch

vllm = pytest.importorskip("vllm")

from proposers.vllm.planner import BUCKET_MIN_STEPS, NONE, CostPlanner, batch_bucket
from proposers.vllm.tree_attention import build_tree_step
from proposers.vllm.version import UnsupportedVLLMError, check_vllm_version

# What runner.py / tree_attention.py rely on, as of vLLM 0.32.0.
PRIVATE_API = {
    "_update_states": ["self", "scheduler_output"],
    "execute_model": ["self", "scheduler_output", "intermediate_tensors"],
    "_prepare_inputs": ["self", "scheduler_output", "num_scheduled_tokens"],
    "_sample": ["self", "logits", "spec_decode_metadata"],
    "propose_draft_token_ids": [
        "self", "scheduler_output", "sampled_token_ids", "sampling_metadata",
        "hidden_states", "sample_hidden_states", "aux_hidden_states",
        "spec_decode_metadata", "common_attn_metadata", "slot_mappings",
    ],
    "load_model": ["self", "load_dummy_weights"],
    "initialize_kv_cache": ["self", "kv_cache_config", "is_profiling",
                            "kv_cache_allocation_context"],
}


def test_overridden_vllm_internals_unchanged():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    for name, params in PRIVATE_API.items():
        got = list(inspect.signature(getattr(CPUModelRunner, name)).parameters)
        assert got == params, f"vLLM changed CPUModelRunner.{name}: {got}"
    fwd = list(inspect.signature(CPUAttentionBackendImpl.forward).parameters)
    assert fwd[:8] == ["self", "layer", "query", "key", "value", "kv_cache",
                       "attn_metadata", "output"], fwd
    upd = list(inspect.signature(CPUAttentionBackendImpl.do_kv_cache_update).parameters)
    assert upd == ["self", "layer", "key", "value", "kv_cache", "slot_mapping"], upd
    # The scheduler override (scheduler.py) and what it reads.
    from vllm.v1.core.sched.scheduler import Scheduler

    sched = list(inspect.signature(Scheduler.schedule).parameters)
    assert sched == ["self", "throttle_prefills"], f"vLLM changed Scheduler.schedule: {sched}"
    assert list(inspect.signature(Scheduler.get_request_counts).parameters) == ["self"]
    # Attributes the runner reads.
    src = inspect.getsource(CPUModelRunner.__mro__[1]._prepare_inputs)
    for attr in ("self.positions", "self.query_start_loc", "compute_slot_mapping"):
        assert attr in src, f"GPUModelRunner._prepare_inputs no longer uses {attr}"
    # The CPU runner replaces the sampler's greedy kernel (host_ops.fast_greedy_sample):
    # a static method of the logits alone, called through the instance.
    from vllm.v1.sample.sampler import Sampler

    assert list(inspect.signature(Sampler.greedy_sample).parameters) == ["logits"]
    assert "self.greedy_sample(logits)" in inspect.getsource(Sampler.sample)


def test_version_guard():
    assert check_vllm_version("0.32.0") == "0.32.0"
    with pytest.raises(UnsupportedVLLMError, match="tested with vLLM 0.32.x only.*0.33.1"):
        check_vllm_version("0.33.1")
    check_vllm_version()  # the installed one is tested


def test_tree_step_mask_and_slots():
    # Request 0: 3 cached tokens + a tree (root, a, b under root, c under a).
    # Request 1: 2 cached tokens + 2 causal tokens.
    anc = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
    block_rows = torch.tensor([[5, 6], [7, 8]])
    step = build_tree_step([0, 4, 6], [3, 2], block_rows, 4, {0: anc})
    assert step.key_slots[0, :7].tolist() == [20, 21, 22, 23, 24, 25, 26]
    assert step.key_slots[1, :4].tolist() == [28, 29, 30, 31]
    assert step.mask[0, 3, :7].tolist() == [True] * 3 + [True, True, False, True]
    assert step.mask[1, 1, :4].tolist() == [True, True, True, True]
    assert step.mask[1, 0, :4].tolist() == [True, True, True, False]
    assert step.query_valid.sum() == 6
    assert step.query_index[step.query_valid].tolist() == list(range(6))


def _trained_planner(rungs, kernel, tree=None, **kwargs):
    """A planner whose cost lines saw `kernel` / `tree` = [(tokens, seconds), ...].
    `recorded=True`: its estimates are the outcomes as recorded (no pooled prior for
    thin estimates), for tests of how a plan is valued from given estimates."""
    if kwargs.pop("recorded", False):
        kwargs["prior_weight"] = 0.0
    p = CostPlanner(rungs, probe_every=10**9, tree_probe_every=10**9, **kwargs)
    for _ in range(50):
        for path, points in (("kernel", kernel), ("tree", tree or [])):
            for tokens, seconds in points:
                p.record_step(path, tokens, seconds)
    return p


def _tree8_proposer(**cfg):
    """A TR-Jacobi proposer on the tree-8 ladder, `cfg` overriding TRJacobiConfig."""
    import types

    from proposers.vllm.config import TRJacobiConfig
    from proposers.vllm.proposer import TRJacobiProposer

    config = TRJacobiConfig(templates=("tree-8",), **cfg)
    return TRJacobiProposer(types.SimpleNamespace(
        speculative_config=types.SimpleNamespace(
            num_speculative_tokens=config.max_draft_tokens()),
        additional_config={"trjacobi": config.to_dict()}))


def test_planner_turns_speculation_off_when_it_does_not_pay():
    p = _trained_planner([("small", "tree"), ("big", "tree")],
                         kernel=[(8, 0.05), (300, 1.0)], tree=[(8 * 9, 0.20)])
    for f in range(4):
        p.record_request("small", f, 8, 0)  # nothing accepted, 4x the cost
        p.record_request("big", f, 30, 0)
    choices = [c for _ in range(200) for c in p.plan([1] * 8)]
    assert set(choices) == {NONE}


def test_closed_batch_drafts_together_or_not_at_all():
    """Nothing waits: a few requests drafting shorten no step of the batch, so the batch
    drafts all together (each request its best known rung) or not at all; with requests
    waiting the same features plan for throughput; one request plans the same either way."""
    # Batch 8 on 2 cores, measured: ~100 ms a step + 5 ms a token.
    p = _trained_planner([("chain", "kernel")], kernel=[(8, 0.14), (80, 0.50)], recorded=True)
    p.record_request("chain", 3, 6, 3.0)  # a retrieval hit: 3 of 6 accepted
    p.record_request("chain", 1, 6, 0.1)
    mixed = [3, 3, 3, 1, 1, 1, 1, 1]
    assert p.plan(mixed) == ["chain"] * 3 + [NONE] * 5  # throughput: +29% a step
    # All eight drafting: (8 + 9.5) / (0.10 + 0.005 * 56) = 46 tok/s < 8 / 0.14 = 57.
    assert p.plan(mixed, closed=True) == [NONE] * 8
    assert p.closed_steps == 1
    hits = [3] * 7 + [1]  # nearly everyone hits: all draft, the eighth too
    assert p.plan(hits, closed=True) == ["chain"] * 8
    assert p.plan(hits) == ["chain"] * 7 + [NONE]
    # A request with no known rung cannot join; the others still decide together.
    assert p.plan([3] * 7 + [2], closed=True) == ["chain"] * 7 + [NONE]
    for f in (1, 3):
        assert p.plan([f]) == p.plan([f], closed=True)


def test_closed_batch_least_value_needs_every_request_to_advance():
    """closed_value="least": a closed batch's plan counts as advancing the batch by its
    least-advanced request, so seven sure hits do not carry an eighth that will not
    advance; the open (throughput) plan and single requests are unchanged."""
    p = _trained_planner([("chain", "kernel")], kernel=[(8, 0.14), (80, 0.50)], recorded=True)
    p.closed_value = "least"
    p.record_request("chain", 3, 6, 3.0)
    p.record_request("chain", 1, 6, 0.1)
    hits = [3] * 7 + [1]
    assert p.plan(hits, closed=True) == [NONE] * 8  # "sum" drafts all eight here
    assert p.plan(hits) == ["chain"] * 7 + [NONE]
    # Everyone expects 3 of 6: (8 + 8 * 3) / (0.10 + 0.005 * 56) = 84 tok/s > 57.
    assert p.plan([3] * 8, closed=True) == ["chain"] * 8
    for f in (1, 3):
        assert p.plan([f]) == p.plan([f], closed=True)
    with pytest.raises(ValueError, match="closed_value"):
        type(p)([("chain", "kernel")], closed_value="max")


def test_closed_batch_laggards_value_drafts_only_the_back_of_the_batch():
    """closed_value="laggards": the batch ends with its requests that have the most
    tokens left, so only they may draft, all together, valued by the least of them;
    the requests ahead draft nothing whatever they would accept."""
    p = _trained_planner([("chain", "kernel")], kernel=[(8, 0.14), (80, 0.50)],
                         closed_value="laggards", recorded=True)
    p.record_request("chain", 3, 6, 3.0)
    p.record_request("chain", 1, 6, 0.1)
    hits = [3] * 7 + [1]
    # The two at the back (40 left) hit: (8 + 8 * 3) / (0.10 + 0.005 * 20) = 160 tok/s.
    left = [30, 40, 35, 40, 20, 30, 30, 10]
    assert p.plan(hits, closed=True, remaining=left) == (
        [NONE, "chain", NONE, "chain"] + [NONE] * 4)
    # The one at the back will not advance: no one drafts (the others would, for "sum").
    assert p.plan(hits, closed=True, remaining=[10] * 7 + [40]) == [NONE] * 8
    # All tied: the whole batch is the back, as "least".
    assert p.plan([3] * 8, closed=True, remaining=[50] * 8) == ["chain"] * 8
    # Open batches and single requests are unchanged; without counts, as "sum".
    assert p.plan(hits, remaining=left) == ["chain"] * 7 + [NONE]
    assert p.plan(hits, closed=True) == ["chain"] * 8
    with pytest.raises(ValueError, match="remaining"):
        p.plan(hits, closed=True, remaining=[1, 2])


def test_closed_batch_least_counts_the_spread_of_acceptance():
    """The least of n laggards' acceptances falls below their mean by more the wider it
    spreads: all-or-nothing chains (mean 3) are not drafted by eight tied laggards,
    steady ones (3 every time) are; a lone laggard counts the mean."""
    from proposers.vllm.planner import expected_min_shift

    assert expected_min_shift(1) == 0.0
    assert 0.5 < expected_min_shift(2) < expected_min_shift(5) < expected_min_shift(8) < 1.5
    p = _trained_planner([("chain", "kernel")], kernel=[(8, 0.14), (80, 0.50)],
                         closed_value="laggards")
    for k in range(40):
        p.record_request("chain", 3, 6, 3.0)
        p.record_request("chain", 1, 6, 6.0 * (k % 2))
    assert abs(p.estimates[("chain", 1)].accepted.value - 3.0) < 0.5
    assert p.estimates[("chain", 3)].spread() < 1e-6
    assert p.estimates[("chain", 1)].spread() > 2.5
    assert p.plan([3] * 8, closed=True, remaining=[50] * 8) == ["chain"] * 8
    assert p.plan([1] * 8, closed=True, remaining=[50] * 8) == [NONE] * 8
    assert p.plan([1] * 8, closed=True, remaining=[50] + [40] * 7) == ["chain"] + [NONE] * 7


def test_closed_batch_laggards_may_all_take_the_same_rung():
    """Valued by its least member, the back of the batch can do better on one rung than
    on the per-request picks that maximise the sum: a 2-token cut for one laggard would
    cap the least at 2 while both can draft the whole chain."""
    p = _trained_planner([("chain:2", "kernel"), ("chain", "kernel")],
                         kernel=[(8, 0.14), (80, 0.50)], closed_value="laggards")
    p.record_request("chain", 3, 10, 8.0)
    p.record_request("chain:2", 3, 2, 1.9)
    p.record_request("chain", 2, 10, 4.0)
    p.record_request("chain:2", 2, 2, 1.9)
    # Sum-wise the feature-2 laggard is better off on the cut (1.9 - 0.57 > 4 - 2.86 at
    # the no-draft rate); least-wise both on the whole chain: (8 + 8 * 4) / 0.24 s
    # against (8 + 8 * 1.9) / 0.20 s.
    left = [50, 50] + [10] * 6
    assert p.plan([3, 2] + [3] * 6, closed=True, remaining=left) == ["chain"] * 2 + [NONE] * 6


def test_plan_bounds_count_only_requests_that_must_draft():
    """The bound that skips plans (`CostPlanner._rate_bounds`) must not price a closed
    batch's kernel plans with the draft tokens of a request that has no kernel rung
    known (it goes without there): here request B knows only a 60-node tree, request A
    a chain that pays, and the plan is A's chain."""
    p = _trained_planner([("chain", "kernel"), ("big", "tree")],
                         kernel=[(2, 0.030), (20, 0.066)], closed_value="sum", recorded=True)
    p.record_request("chain", 3, 10, 9)
    p.record_request("big", 1, 60, 0)
    assert p.plan([3, 1], closed=True) == ["chain", NONE]


def test_cost_lines_are_kept_per_batch_bucket():
    """A batch-1 step costs about the same for one token or nine (weights read once),
    a batch-8 step pays ~2 ms a draft token; one line for both carried batch 8's slope
    into batch 1, where a chain accepted 0.5 tokens a step then looked not worth drafting."""
    assert [batch_bucket(b) for b in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == [1, 2, 4, 4, 8, 8, 16, 16, 32]
    p = CostPlanner([("chain", "kernel")], probe_every=10**9)
    for _ in range(20):
        for tokens in (8, 72):  # batch 8: 40 ms + 2 ms a draft token
            p.record_step("kernel", tokens, 0.040 + 0.002 * (tokens - 8), batch=8)
    p.record_request("chain", 1, 8, 0)
    p.record_request("chain", 1, 8, 1)  # 0.5 accepted tokens of 8
    assert p.line("kernel", 1) == p.line("kernel", 8)  # no batch-1 steps yet: all batches
    assert p.plan([1]) == [NONE]  # priced on batch 8's slope: 1.37x a plain step
    for _ in range(BUCKET_MIN_STEPS):
        for tokens in (1, 9):  # batch 1: 40 ms + 0.2 ms a draft token
            p.record_step("kernel", tokens, 0.040 + 0.0002 * (tokens - 1), batch=1)
    a1, b1 = p.line("kernel", 1)
    assert b1 == pytest.approx(0.0002) and a1 == pytest.approx(0.0398)
    assert p.line("kernel", 8)[1] == pytest.approx(0.002)  # batch 8's own line is kept
    assert p.plan([1]) == ["chain"]
    assert p.plan([1] * 8, closed=True) == [NONE] * 8  # 0.5 tokens never pay at batch 8
    assert set(p.cost_lines()) == {"kernel", "tree", "kernel@1", "kernel@8"}
    # Steps of unknown batch size teach only the all-batch line.
    p.record_step("kernel", 4, 1.0)
    assert p.line("kernel", 1) == (a1, b1)
    p.cost_buckets = False  # TRJacobiConfig(cost_buckets=False): the all-batch line only
    assert p.line("kernel", 1) == p.lines["kernel"].coefficients()


def test_size_costs_price_a_step_by_its_measured_size():
    """Batch 1 on 2 cores: 3- to 6-token steps no dearer than undrafted ones, 11 tokens
    dearer (benchmarks/results/vllm_cpu_msn_step_costs.json). On its line a 4-token cut
    accepting 0.05 tokens a step is not worth drafting; priced by size it is (it costs
    nothing), and the whole chain stays priced at its own measured cost."""
    def planner(size_costs: bool) -> CostPlanner:
        p = CostPlanner([("chain:4", "kernel"), ("chain", "kernel")], probe_every=10**9,
                        size_costs=size_costs)
        for _ in range(40):
            for tokens, ms in ((1, 38.6), (5, 37.2), (11, 45.3)):
                p.record_step("kernel", tokens, ms / 1000, batch=1)
        p.record_request("chain:4", 1, 4, 0)
        p.record_request("chain:4", 1, 4, 0.1)  # 0.05 tokens a step
        p.record_request("chain", 1, 10, 0)
        p.record_request("chain", 1, 10, 0.1)
        return p

    line, sized = planner(False), planner(True)
    assert line.step_cost("kernel", 1, 5) > line.step_cost("kernel", 1, 1)  # the line
    assert sized.step_cost("kernel", 1, 1) == pytest.approx(0.0386, abs=5e-4)
    assert sized.step_cost("kernel", 1, 5) == pytest.approx(0.0372, abs=5e-4)
    assert sized.step_cost("kernel", 1, 11) == pytest.approx(0.0453, abs=5e-4)
    # An unseen size: the line alone.
    assert sized.step_cost("kernel", 1, 7) == pytest.approx(sum(
        c * 7 ** i for i, c in enumerate(sized.line("kernel", 1))))
    assert line.plan([1]) == [NONE]
    assert sized.plan([1]) == ["chain:4"]


def test_thin_estimates_lean_on_the_rungs_pooled_acceptance():
    """A (rung, feature) pair seen a few times at 0 is not written off: until it has
    PRIOR_UNTIL outcomes its estimate is lifted toward the rung's pooled acceptance per
    draft token, so at batch 1 (draft tokens cost ~2% of a step) it is drafted again and
    learns; once it has enough outcomes of 0 it is not. A thin estimate above the pool
    stays as it is."""
    from proposers.vllm.config import TRJacobiConfig
    from proposers.vllm.planner import POOLED, PRIOR_UNTIL, PRIOR_WEIGHT

    def planner(**kw):
        p = _trained_planner([("chain", "kernel")], kernel=[(1, 0.040), (11, 0.048)], **kw)
        for _ in range(20):
            p.record_request("chain", 3, 4, 2.0)  # retrieval hits: 2 of 4 (0.5 a token)
        for _ in range(2):
            p.record_request("chain", 12, 5, 0.0)  # two early misses on another feature
        return p

    p, recorded = planner(), planner(recorded=True)
    assert recorded.expected_accepted("chain", 12) == 0.0
    assert recorded.plan([12]) == [NONE]
    pooled = p.estimates[("chain", POOLED)]
    prior = pooled.accepted.value / pooled.nodes.value * 5
    assert p.expected_accepted("chain", 12) == pytest.approx(PRIOR_WEIGHT * prior / (2 + PRIOR_WEIGHT))
    assert p.plan([12]) == ["chain"]
    assert p.expected_accepted("chain", 3) == pytest.approx(2.0)  # enough outcomes: as seen
    # A thin estimate above the pool is kept (lifted only).
    p.record_request("chain", 7, 4, 4.0)
    assert p.expected_accepted("chain", 7) == pytest.approx(4.0)
    for _ in range(PRIOR_UNTIL):
        p.record_request("chain", 12, 5, 0.0)
    assert p.expected_accepted("chain", 12) == 0.0 and p.plan([12]) == [NONE]
    with pytest.raises(ValueError, match="prior_weight"):
        type(p)([("chain", "kernel")], prior_weight=-1.0)
    with pytest.raises(ValueError, match="estimate_prior"):
        TRJacobiConfig(estimate_prior=-1.0)


def test_closed_batch_tree_plans_draft_together():
    """On the tree path too: once one request drafts a tree, the others draft (their
    best rung on the tree line) or the step does not draft at all."""
    p = _trained_planner([("chain", "kernel"), ("tree", "tree")],
                         kernel=[(8, 0.14), (80, 0.50)], tree=[(8, 0.15), (200, 1.10)], recorded=True)
    p.record_request("tree", 3, 30, 12.0)
    p.record_request("chain", 3, 6, 3.0)
    p.record_request("chain", 1, 6, 0.1)
    p.record_request("tree", 1, 30, 0.2)
    features = [3, 1, 1, 1, 1, 1, 1, 1]
    open_plan = p.plan(features)
    assert open_plan[0] != NONE and set(open_plan[1:]) == {NONE}
    assert p.plan(features, closed=True) == [NONE] * 8
    assert NONE not in p.plan([3] * 8, closed=True)


def test_runner_says_whether_the_batch_is_closed(caplog):
    """The runner asks TRJacobiScheduler's count; without that scheduler it says so once
    and plans every step for throughput."""
    from types import SimpleNamespace

    from proposers.vllm.runner import TRJacobiRunner
    from proposers.vllm.scheduler import WAITING_ATTR

    runner = SimpleNamespace(_warned_no_waiting=False)
    closed = TRJacobiRunner._closed_batch
    assert closed(runner, SimpleNamespace(**{WAITING_ATTR: 0})) is True
    assert closed(runner, SimpleNamespace(**{WAITING_ATTR: 2})) is False
    with caplog.at_level("WARNING"):
        assert closed(runner, SimpleNamespace()) is False
        assert closed(runner, SimpleNamespace()) is False
    assert sum("does not report waiting requests" in r.message for r in caplog.records) == 1


def test_scheduler_reports_waiting_requests(monkeypatch):
    from vllm.v1.core.sched.scheduler import Scheduler

    from proposers.vllm.config import SCHEDULER_PATH, engine_kwargs
    from proposers.vllm.scheduler import WAITING_ATTR, TRJacobiScheduler, waiting_requests

    assert SCHEDULER_PATH == f"{TRJacobiScheduler.__module__}.{TRJacobiScheduler.__name__}"
    assert engine_kwargs()["scheduler_cls"] == SCHEDULER_PATH
    out = _SchedulerOutput()
    monkeypatch.setattr(Scheduler, "schedule", lambda self, *a, **k: out)
    monkeypatch.setattr(Scheduler, "get_request_counts", lambda self: (4, 3))
    got = TRJacobiScheduler.schedule(object.__new__(TRJacobiScheduler))
    assert got is out and getattr(out, WAITING_ATTR) == 3 and waiting_requests(out) == 3
    assert waiting_requests(_SchedulerOutput()) is None


def test_closed_batches_follow_the_usage_context():
    """Offline batches (the LLM class) plan closed batches; the server plans for every
    user's own speed; an explicit setting wins."""
    from proposers.vllm.config import CONFIG_KEY, TRJacobiConfig, engine_kwargs

    def closed(**kwargs) -> bool:
        return engine_kwargs(**kwargs)["additional_config"][CONFIG_KEY]["closed_batches"]

    assert closed() is True
    assert closed(usage_context="OPENAI_API_SERVER") is False
    assert closed(config=TRJacobiConfig(closed_batches=True),
                  usage_context="OPENAI_API_SERVER") is True
    assert closed(closed_batches=False) is False


class _SchedulerOutput:
    """Stands in for vLLM's SchedulerOutput (a plain dataclass: attributes can be added)."""


def test_planner_speculates_when_acceptance_is_high():
    p = _trained_planner([("small", "tree"), ("big", "tree")],
                         kernel=[(1, 0.05), (300, 0.5)], tree=[(9, 0.06)])
    p.record_request("small", 3, 8, 3)
    p.record_request("big", 3, 30, 3)  # no more accepted for 4x the nodes
    assert all(p.plan([3]) == ["small"] for _ in range(100))


def test_planner_drafts_only_for_requests_likely_to_accept():
    # Step cost ~ 10 ms + 1 ms per token: a 10-token chain pays only if it gains ~1.3+
    # tokens at batch 8. Feature 3 (a 3-gram retrieval hit) accepts 6, feature 1 accepts 0.2.
    p = _trained_planner([("chain", "kernel"), ("tree-8", "tree")],
                         kernel=[(8, 0.018), (80, 0.090)], tree=[(80, 0.2)])
    p.record_request("chain", 3, 10, 6)
    p.record_request("chain", 1, 5, 0.2)
    p.record_request("tree-8", 3, 8, 5)
    p.record_request("tree-8", 1, 8, 0.5)
    features = [1, 3, 1, 1, 3, 1, 1, 1]
    assert p.plan(features) == ["chain" if f == 3 else NONE for f in features]
    assert p.history == {"chain": 2, NONE: 6}


def test_planner_drafts_only_past_its_margin():
    """A step drafts only if its expected rate beats not drafting by `min_gain`."""
    # 8 requests at 10 ms + 1 ms per token: one 5-token chain accepting `acc` tokens
    # makes (8 + acc) / 0.023 against 8 / 0.018 tokens per second.
    for acc, drafts in ((2.3, False), (3.0, True)):  # +0.8% and +7.6%
        p = _trained_planner([("chain", "kernel")], kernel=[(8, 0.018), (80, 0.090)])
        p.record_request("chain", 3, 5, acc)
        gain = (8 + acc) / 0.023 / (8 / 0.018) - 1
        assert (gain > p.min_gain) == drafts, gain
        assert (p.plan([3, 0, 0, 0, 0, 0, 0, 0]).count("chain") == 1) == drafts
        p.min_gain = 0.0
        assert p.plan([3, 0, 0, 0, 0, 0, 0, 0]).count("chain") == int(gain > 0)


def test_planner_optimum_matches_brute_force():
    import itertools
    import random

    rng = random.Random(0)
    rungs = [("chain", "kernel"), ("t8", "tree"), ("t16", "tree")]
    for _ in range(60):
        a, b = rng.uniform(0.005, 0.05), rng.uniform(1e-4, 2e-3)
        ta, tb = a * rng.uniform(1, 3), b * rng.uniform(1, 3)
        p = _trained_planner(rungs, kernel=[(1, a + b), (64, a + 64 * b)],
                             tree=[(1, ta + tb), (64, ta + 64 * tb)], min_gain=0.0)
        for name, _ in rungs:
            for f in range(3):
                nodes = {"chain": rng.randint(1, 10), "t8": 8, "t16": 16}[name]
                p.record_request(name, f, nodes, rng.uniform(0, min(nodes, 5)))
        features = [rng.randrange(3) for _ in range(rng.randint(1, 4))]
        got = p.rate(features, len(features), p.plan(features))
        options = [NONE] + [n for n, _ in rungs]
        best = max(p.rate(features, len(features), list(c))
                   for c in itertools.product(options, repeat=len(features)))
        assert got == pytest.approx(best, rel=1e-6)


def test_planner_scales_expected_acceptance_per_request():
    """Same feature, same shared estimate: a request whose own drafts fare worse (scale)
    stops drafting, the others keep drafting; brute force agrees with the scaled plan."""
    import itertools

    p = _trained_planner([("chain", "kernel"), ("tree-8", "tree")],
                         kernel=[(8, 0.018), (80, 0.090)], tree=[(80, 0.2)])
    p.record_request("chain", 2, 10, 3)
    p.record_request("tree-8", 2, 8, 2)
    assert p.plan([2, 2, 2]) == ["chain"] * 3
    scales = [1.0, 0.1, 1.0]
    assert p.plan([2, 2, 2], scales=scales) == ["chain", NONE, "chain"]
    options = [NONE, "chain", "tree-8"]
    best = max(p.rate([2] * 3, 3, list(c), scales)
               for c in itertools.product(options, repeat=3))
    assert p.rate([2] * 3, 3, p.plan([2] * 3, scales=scales), scales) == pytest.approx(best)
    assert p.expected_accepted("chain", 2) == pytest.approx(3)
    assert p.expected_accepted("chain", 1) is None and p.expected_accepted("x", 2) is None
    with pytest.raises(ValueError, match="scales"):
        p.plan([2, 2], scales=[1.0])


def test_request_skill_tracks_its_own_acceptance_and_fades_back():
    from proposers.vllm.proposer import SKILL_RANGE, RequestState

    s = RequestState()
    assert s.skill == 1.0
    for _ in range(6):
        s.observe(0.0, 3.0)  # expected 3 accepted tokens, got none
    low = s.skill
    assert SKILL_RANGE[0] <= low < 0.3
    for _ in range(300):
        s.fade()  # no fresh evidence: back towards the shared estimate (half-life 34)
    assert 0.9 < s.skill <= 1.0
    for _ in range(6):
        s.observe(6.0, 2.0)
    assert 2.0 < s.skill <= SKILL_RANGE[1]


def test_planner_probes_untried_rungs_then_settles():
    p = CostPlanner([("chain", "kernel"), ("tree-8", "tree")], probe_share=1.0)
    p.plan([2])  # no cost data yet: measure plain decoding first
    assert p.history == {NONE: 1}
    for _ in range(5):
        p.record_step("kernel", 1, 0.01)
    tried = set()
    for _ in range(80):  # chains are probed within a few steps, trees every 64 steps
        for rung in p.plan([2]):
            tried.add(rung)
            if rung != NONE:
                p.record_step("tree" if rung == "tree-8" else "kernel", 9, 0.02)
                p.record_request(rung, 2, 8, 0)
    assert tried == {NONE, "chain", "tree-8"}
    # Both rungs now known to accept nothing: only the slow probes draft (one per 16 steps).
    later = [r for _ in range(64) for r in p.plan([2])]
    assert 2 <= 64 - later.count(NONE) <= 4


def test_planner_untried_trees_do_not_speed_up_chain_probes():
    """Known chain pairs are re-probed at the slow cadence even while tree pairs wait
    for their (slower) probe slot."""
    p = CostPlanner([("chain", "kernel"), ("tree-8", "tree")], tree_probe_every=10**9,
                    probe_share=1.0)
    for _ in range(5):
        p.record_step("kernel", 1, 0.01)
    p.record_request("chain", 1, 5, 0)  # known, never pays
    plans = [r for _ in range(64) for r in p.plan([1])]
    assert plans.count("chain") == 4 and "tree-8" not in plans


def test_planner_probes_within_their_budget():
    """Probes cost at most `probe_share` of the expected step time: where a probe costs
    about a whole step (batch 8 on 2 cores) they thin out far below the cadence; where
    it is cheap (batch 1, weight-bound steps) the cadence decides."""
    def probes(batch: int, step: float, slope: float) -> int:
        p = CostPlanner([("chain", "kernel")], probe_share=0.01)
        for tokens in (batch, batch + 20):  # a fitted line: step seconds at `batch`
            for _ in range(3):
                p.record_step("kernel", tokens, step + slope * (tokens - batch))
        p.record_request("chain", 1, 16, 0)  # known, never pays: only probes draft
        plans = [p.plan([1] * batch, closed=True) for _ in range(640)]
        assert p.probes == sum(sum(r != NONE for r in plan) for plan in plans)
        return p.probes

    # batch 8: a 16-node probe costs 16 * 2 ms = 32 ms against 1% of a 48 ms step: one
    # per ~67 steps, plus a fresh planner's budget (PROBE_CREDIT_STEPS: ~4 probes), where
    # the cadence alone would make 40.
    assert 11 <= probes(8, 0.048, 0.002) <= 14
    # batch 1: 16 * 0.1 ms against 1% of 40 ms: the cadence (one per 16 steps) decides.
    assert probes(1, 0.040, 0.0001) == 640 // 16


def test_planner_does_not_probe_rungs_that_could_not_pay():
    """A rung whose best case (every draft accepted along its deepest path, by one
    request or by all) loses to not drafting on the measured cost lines is never probed:
    at batch 8 on 2 cores a 32-node tree of depth 6 moves the batch to a tree path of
    190 ms against 65 ms plain. At batch 1 (cheap draft tokens) the same tree is probed,
    and so is a chain at batch 8, whose full acceptance would pay."""
    def probed(batch: int, kernel: list, tree: list, depth: int | None) -> set:
        p = CostPlanner([("chain", "kernel"), ("tree-32", "tree")], probe_every=4,
                        tree_probe_every=4, probe_share=1.0,
                        max_nodes={"chain": 10, "tree-32": 32},
                        max_depth=None if depth is None else {"chain": 10, "tree-32": depth})
        for _ in range(20):
            for path, points in (("kernel", kernel), ("tree", tree)):
                for tokens, seconds in points:
                    p.record_step(path, tokens, seconds, batch=batch)
        return {r for _ in range(64) for r in p.plan([1] * batch)} - {NONE}

    b8_kernel = [(8, 0.065), (40, 0.065 + 32 * 0.003)]
    b8_tree = [(40, 0.190), (72, 0.190 + 32 * 0.003)]
    assert probed(8, b8_kernel, b8_tree, depth=6) == {"chain"}
    assert probed(8, b8_kernel, b8_tree, depth=None) == {"chain", "tree-32"}  # no depth: as before
    # The tree path not measured yet: its cost is unknown, so the tree is probed.
    assert probed(8, b8_kernel, [], depth=6) == {"chain", "tree-32"}
    b1_kernel = [(1, 0.038), (33, 0.038 + 32 * 0.0005)]
    b1_tree = [(33, 0.060), (65, 0.060 + 32 * 0.0005)]
    assert probed(1, b1_kernel, b1_tree, depth=6) == {"chain", "tree-32"}


def test_proposer_gives_the_planner_each_rungs_depth():
    """The probe filter's depths come from the templates: a tree's deepest path, a
    chain's (or cut's) length."""
    trj = _tree8_proposer()
    depths = trj.planner.max_depth
    assert depths["tree-8"] == trj.trees["tree-8"].max_depth < trj.trees["tree-8"].num_nodes
    assert depths["chain"] == trj.planner.max_nodes["chain"]
    assert all(depths[cut] == k for cut, k in trj.cuts.items())
    assert {r.name for r in trj.planner.rungs} <= set(depths)


def test_planner_without_cost_awareness_always_drafts_the_largest_rung():
    p = CostPlanner([("chain", "kernel"), ("tree-8", "tree")], cost_aware=False)
    assert p.plan([0, 3]) == ["tree-8", "tree-8"]


def test_general_plugin_entry_point(tmp_path, monkeypatch):
    """vLLM finds `register` through the entry point, and it is idempotent and gated."""
    import importlib

    from vllm.plugins import load_plugins_by_group
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from proposers.vllm.plugin import ENV_TREE_ATTN
    from proposers.vllm.tree_attention import BACKEND_PATH

    # A bare dist-info on sys.path is what an (editable) install provides.
    dist = tmp_path / "msn_trjacobi_probe-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: msn-trjacobi-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[vllm.general_plugins]\nmsn_trjacobi = proposers.vllm.plugin:register\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    plugins = load_plugins_by_group("vllm.general_plugins")
    assert "msn_trjacobi" in plugins
    cpu = AttentionBackendEnum.CPU_ATTN
    # The override is process-global: an engine built earlier in this pytest process
    # (the plugin tests) may have installed it already.
    previous = cpu.get_path()
    cpu.clear_override()
    try:
        monkeypatch.delenv(ENV_TREE_ATTN, raising=False)
        plugins["msn_trjacobi"]()
        assert cpu.get_path() != BACKEND_PATH  # off unless asked for
        monkeypatch.setenv(ENV_TREE_ATTN, "1")
        plugins["msn_trjacobi"]()
        plugins["msn_trjacobi"]()
        assert cpu.get_path() == BACKEND_PATH
    finally:
        cpu.clear_override()
        if previous == BACKEND_PATH:
            from proposers.vllm.tree_attention import register_tree_backend

            register_tree_backend()


# ---------------------------------------------------------------- oracle tree (b2)
# A toy one-layer RoPE attention model decoded through the runner's own pieces: the
# paged slot layout and tree mask of `build_tree_step`, depth positions, `accept`, and
# `compact_kv`. The oracle tree puts the true continuation in the third branch with a
# decoy sibling at depth 2, so every step's accepted path needs a KV move. Turning off
# compaction, depth positions or the tree mask must each break token identity.
from proposers.templates import TreeTemplate
from proposers.tree import compile_tree
from proposers.verify import accept
from proposers.vllm.tree_runtime import compact_kv

ORACLE = TreeTemplate("oracle", 3, 3, ((0,), (1,), (2,), (0, 0), (2, 0), (2, 1), (2, 1, 0)))
TRUE_PATH = (3, 6, 7)  # nodes of depth 1, 2, 3 holding the true continuation


class _ToyModel:
    V, D, BLOCK = 48, 32, 4

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.emb = torch.randn(self.V, self.D, generator=g)
        self.wq, self.wk, self.wv = (torch.randn(self.D, self.D, generator=g) for _ in range(3))
        self.out = torch.randn(self.D, self.V, generator=g)

    def rope(self, x, pos):
        half = self.D // 2
        freq = 1.0 / (10.0 ** (torch.arange(half, dtype=torch.float64) / half))
        ang = pos.double()[:, None] * freq[None]
        cos, sin = ang.cos().float(), ang.sin().float()
        a, b = x[:, :half], x[:, half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    def qkv(self, tokens, pos):
        h = self.emb[tokens]
        return self.rope(h @ self.wq, pos), self.rope(h @ self.wk, pos), h @ self.wv

    def logits(self, tokens, q, k, v, mask):
        att = ((q @ k.T) / self.D ** 0.5).masked_fill(~mask, float("-inf")).softmax(-1)
        return (self.emb[tokens] + att @ v) @ self.out

    def reference(self, prompt, n):
        tokens = list(prompt)
        while len(tokens) < len(prompt) + n:
            t = torch.tensor(tokens)
            q, k, v = self.qkv(t, torch.arange(len(t)))
            mask = torch.ones(len(t), len(t), dtype=torch.bool).tril()
            tokens.append(int(self.logits(t, q, k, v, mask)[-1].argmax()))
        return tokens[len(prompt):]


class _CacheWriter:
    """Stands in for the attention impl: `compact_kv` rewrites through it."""

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        kv_cache[slot_mapping.long(), 0] = key
        kv_cache[slot_mapping.long(), 1] = value


def _tree_decode(model, prompt, reference, *, compaction=True, depth_positions=True,
                 tree_mask=True):
    tree = compile_tree(ORACLE)
    n_new = len(reference)
    block_rows = torch.tensor([[5, 2, 7, 0, 3, 6, 1, 4, 8, 9]])
    cache = torch.zeros(10 * model.BLOCK, 2, model.D)
    writer = _CacheWriter()
    # Prefill (causal, sequential positions) writes the prompt's KV except the root.
    tokens = list(prompt)
    moves = 0
    while len(tokens) - len(prompt) < n_new:
        done = len(tokens) - len(prompt)
        truth = (reference + [0, 0, 0])[done: done + 3]
        nodes = [0] * (tree.num_nodes + 1)
        nodes[0] = tokens[-1]
        for node, tok in zip(TRUE_PATH, truth):
            nodes[node] = tok
        shift = 1 + len(tokens)  # decoys: never the true token at their depth
        nodes[1], nodes[2] = (truth[0] + shift) % model.V, (truth[0] + 1 + shift) % model.V
        nodes[4], nodes[5] = (truth[1] + shift) % model.V, (truth[1] + shift) % model.V
        num_computed = len(tokens) - 1
        if num_computed == len(prompt) - 1:  # first step: prompt prefill, causal
            ctx = torch.tensor(tokens[:-1])
            step = build_tree_step([0, len(ctx)], [0], block_rows, model.BLOCK, {})
            _, k, v = model.qkv(ctx, torch.arange(len(ctx)))
            slots = step.key_slots[0, : len(ctx)]
            cache[slots, 0], cache[slots, 1] = k, v
        q_tokens = torch.tensor(nodes)
        n = len(nodes)
        trees = {0: tree.ancestors} if tree_mask else {}
        step = build_tree_step([0, n], [num_computed], block_rows, model.BLOCK, trees)
        pos = num_computed + (tree.depth if depth_positions else torch.arange(n))
        q, k, v = model.qkv(q_tokens, pos)
        slots = step.key_slots[0, num_computed: num_computed + n]
        cache[slots, 0], cache[slots, 1] = k, v
        kv = cache[step.key_slots[0]]
        logits = model.logits(q_tokens, q, kv[:, 0], kv[:, 1], step.mask[0, :n])
        result = accept(tree, q_tokens, logits.argmax(-1))
        tokens += result.tokens
        src = [idx for d, idx in enumerate(result.path, start=1) if idx != d]
        dst = [num_computed + d for d, idx in enumerate(result.path, start=1) if idx != d]
        if src and compaction:
            step.stash = [(writer, None, k, v, cache)]
            compact_kv(step, torch.tensor(src), step.key_slots[0, torch.tensor(dst)])
            moves += 1
    return tokens[len(prompt): len(prompt) + n_new], moves


def test_oracle_tree_identical_and_ablations_break_it():
    model = _ToyModel()
    prompt = [3, 17, 9, 40, 22, 5, 31, 12, 7, 19, 2]
    reference = model.reference(prompt, 16)
    out, moves = _tree_decode(model, prompt, reference)
    assert out == reference
    assert moves >= 4  # every step accepted through the third branch: KV moved each time
    for ablation in ("compaction", "depth_positions", "tree_mask"):
        broken, _ = _tree_decode(model, prompt, reference, **{ablation: False})
        assert broken != reference, f"turning off {ablation} did not change the output"


def test_request_modes_and_sampled_defaults(caplog):
    """Greedy plain requests get planned trees, greedy ones with logits processing
    chains; sampled ones (temperature > 0) planned chains ("auto") by default, or what
    the engine / request asks; "off" is logged once and counted."""
    import types

    from vllm import SamplingParams

    from proposers.vllm.config import TRJacobiConfig
    from proposers.vllm.runner import TRJacobiRunner

    def runner(**cfg):
        r = types.SimpleNamespace(
            trj=types.SimpleNamespace(config=TRJacobiConfig(**cfg)), tree_mode=True,
            sampled_unspeculated=0, _unspeculated=set(), _warned_sampled=False, requests={})
        r._count_unspeculated = lambda req_id: TRJacobiRunner._count_unspeculated(r, req_id)
        r.mode = lambda req_id: TRJacobiRunner.request_mode(r, req_id)
        return r

    def add(r, req_id, **params):
        r.requests[req_id] = types.SimpleNamespace(sampling_params=SamplingParams(**params))

    r = runner()
    add(r, "g", temperature=0.0)
    add(r, "gp", temperature=0.0, repetition_penalty=1.2)
    add(r, "g-auto", temperature=0.0, extra_args={"trjacobi": "auto"})
    add(r, "s1", temperature=0.8)
    add(r, "s2", temperature=1.0, top_p=0.9)
    add(r, "s-tree", temperature=1.0, extra_args={"trjacobi": "tree"})
    add(r, "forced", temperature=1.0, extra_args={"trjacobi": "chain"})
    add(r, "s-off", temperature=1.0, extra_args={"trjacobi": "off"})
    with caplog.at_level("WARNING", logger="proposers.vllm.runner"):
        assert [r.mode(i) for i in ("g", "gp", "g-auto", "s1", "s2", "s-tree", "forced")] == [
            "tree", "chain", "tree", "auto", "auto", "auto", "chain"]
        assert r.sampled_unspeculated == 0
        assert r.mode("s-off") == "off"
        assert r.mode("s-off") == "off"  # every step asks again; counted once per request
    assert r.sampled_unspeculated == 1
    assert sum("without speculation" in m for m in caplog.messages) == 1
    r = runner(sampled="off")
    add(r, "s", temperature=1.0)
    assert r.mode("s") == "off" and r.sampled_unspeculated == 1
    r = runner(sampled="chain")
    add(r, "s", temperature=1.0)
    assert r.mode("s") == "chain" and r.sampled_unspeculated == 0
    with pytest.raises(ValueError, match="sampled"):
        TRJacobiConfig(sampled="tree")


def test_fixed_cpu_expand_kernel_feeds_the_rejection_sampler_real_temperatures():
    """vLLM 0.32-cpu's C++ `expand_kernel` stand-in leaves its output unwritten, so the
    rejection sampler divided sampled requests' draft logits by garbage temperatures
    (the cause of the biased sampled distribution with any speculation, ngram included).
    The worker registers `expand_kernel_impl` instead; this checks it through vLLM's own
    `apply_sampling_constraints`, as the rejection sampler calls it."""
    import types

    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler as rs

    from proposers.vllm.runner import fix_cpu_expand_kernel

    current_platform.register_triton_kernel_overrides()  # what every vLLM worker does
    if not fix_cpu_expand_kernel():
        pytest.skip("vLLM runs real Triton kernels here")
    num_draft = [3, 0, 2, 4]
    cu = torch.tensor(num_draft).cumsum(0).to(torch.int32)
    temps = torch.tensor([0.5, 1.0, 2.0, rs.GREEDY_TEMPERATURE], dtype=torch.float32)
    expanded = rs.expand_batch_to_tokens(temps, cu, 9, replace_from=rs.GREEDY_TEMPERATURE,
                                         replace_to=1)
    assert expanded.tolist() == [0.5] * 3 + [2.0] * 2 + [1.0] * 4
    top_k = rs.expand_batch_to_tokens(torch.tensor([5, 7, 0, 9]), cu, 9)
    assert top_k.tolist() == [5] * 3 + [0] * 2 + [9] * 4
    logits = torch.randn(9, 16)
    meta = types.SimpleNamespace(all_greedy=False, temperature=temps, top_k=None, top_p=None)
    out = rs.apply_sampling_constraints(logits.clone(), cu, meta)
    torch.testing.assert_close(out, logits / expanded[:, None])


def test_proposer_plans_per_request():
    """The proposer asks the planner per request: a repetitive context (3-gram retrieval
    hit) drafts, a fresh one does not; sampled ("auto") requests only ever draft chains."""

    import numpy as np

    from proposers.vllm.planner import FEEDBACK, SAMPLED
    from proposers.vllm.proposer import BatchFeedback

    proposer = _tree8_proposer

    repetitive = [5, 6, 7, 8, 9, 5, 6, 7]  # ends with 5 6 7: a 3-gram hit, continues 8 9
    fresh = [11, 12, 13, 14, 15, 16, 17, 18]  # no earlier match at all
    tokens = np.array([repetitive, fresh, repetitive])

    def propose(p, modes):
        p.set_target_feedback(BatchFeedback(["a", "b", "c"], modes))
        return p.propose([[1], [1], [1]], np.array([8, 8, 8]), tokens)

    p = proposer()
    for _ in range(50):
        p.planner.record_step("kernel", 3, 0.030)
        p.planner.record_step("kernel", 30, 0.057)
        p.planner.record_step("tree", 30, 0.2)
    for f in (0, 1, 2, 3):
        p.planner.record_request("chain", f, 5, 4.5 if f == 3 else 0.0)
        p.planner.record_request("tree-8", f, 8, 0.0)
        p.planner.record_request("chain", f + SAMPLED, 5, 4.0 if f == 3 else 0.0)
    p.planner.probe_every = 10**9
    drafts = propose(p, ["tree", "tree", "auto"])
    assert drafts[0][:2] == [8, 9] and drafts[1] == [] and drafts[2][:2] == [8, 9]
    assert p.plan_for("a").rung == "chain" and p.plan_for("a").feature == 3
    # Its host time is kept by phase (trjacobi_stats "propose_seconds"), each one timed.
    assert set(p.host_seconds) == {"lookup", "shadows", "plan", "draft"}
    assert all(v > 0 for v in p.host_seconds.values())
    assert p.plan_for("c").feature == 3 + SAMPLED and p.plan_for("c").is_chain

    # Jacobi feedback for "b" (the target's top-K at its last drafts) is a feature too.
    p.set_target_feedback(BatchFeedback(["a", "b", "c"], ["tree"] * 3,
                                        {"b": torch.tensor([[21, 22], [23, 24]])}))
    assert p._feature(torch.tensor(fresh), "b", sampled=False) == FEEDBACK
    assert p._feature(torch.tensor(repetitive), "b", sampled=True) == 3 + FEEDBACK + SAMPLED
    assert p._feature(torch.tensor(fresh), "a", sampled=False) == 0

    # "a" keeps missing: its own record lowers its scale until it stops drafting, while
    # a new request "d" on the same text still drafts from the shared estimate.
    for _ in range(6):
        p.record_outcome("a", "chain", 3, 5, 0)
    assert p.states["a"].skill < 0.2
    p.set_target_feedback(BatchFeedback(["a", "b", "d"], ["tree"] * 3))
    drafts = p.propose([[1], [1], [1]], np.array([8, 8, 8]), tokens)
    assert drafts[0] == [] and drafts[2][:2] == [8, 9]
    assert p.states["a"].accepted < p.states["a"].expected  # faded, not forgotten

    p = proposer(cost_aware=False)  # always the largest rung a request may use
    propose(p, ["tree", "tree", "auto"])
    assert p.plan_for("a").rung == "tree-8"
    assert p.plan_for("c").rung == "chain" and p.plan_for("c").is_chain


def test_plan_value_idles_only_where_planning_costs_more_than_it_saves():
    """A batch size plans every step until PLAN_VALUE_MIN full plans are in, then only
    every IDLE_PLAN_EVERY-th step while the saving the plans expected is below their host
    time; a plan expecting to save more wakes it at once."""
    from proposers.vllm.proposer import IDLE_PLAN_EVERY, PLAN_VALUE_MIN, PlanValue

    value = PlanValue()
    for _ in range(PLAN_VALUE_MIN - 1):
        assert not value.skip()
        value.add(0.0, 1e-3)
    assert not value.skip()  # one plan short
    value.add(0.0, 1e-3)
    skips = [value.skip() for _ in range(2 * IDLE_PLAN_EVERY)]
    assert skips == ([True] * (IDLE_PLAN_EVERY - 1) + [False]) * 2
    value.add(0.05, 1e-3)  # a plan expecting to save 50 ms (a tenth weighs in: 5 ms)
    assert value.pays and not value.skip() and value.idle == 0
    for _ in range(20):
        value.add(0.0, 1e-3)  # the saving fades below the host time again
    assert not value.pays


def test_proposer_idles_where_planning_does_not_pay():
    """A closed batch of 8 whose drafts never pay: after PLAN_VALUE_MIN full plans, 3 of
    4 steps skip lookups, shadows and the planner (counted in `idle_steps`, no host
    phase timed, the planner's step not advanced), draft nothing, and still keep each
    request's retrieval index up to date; a batch of 1 on the same proposer, where
    drafting pays, plans every step; `idle_planning=False` never idles, nor does a
    proposer without cost awareness (its plans always draft)."""

    import numpy as np

    from proposers.vllm.planner import FEEDBACK
    from proposers.vllm.proposer import IDLE_PLAN_EVERY, PLAN_VALUE_MIN, BatchFeedback

    fresh = list(range(100, 140))  # no n-gram repeats: no retrieval chain anywhere
    ids = [f"r{i}" for i in range(8)]

    def trained(**cfg):
        p = _tree8_proposer(**cfg)
        for _ in range(20):
            p.planner.record_step("kernel", 8, 0.050, batch=8)
            p.planner.record_step("kernel", 40, 0.150, batch=8)  # 3 ms a draft token
            p.planner.record_step("kernel", 1, 0.038, batch=1)
            p.planner.record_step("kernel", 9, 0.042, batch=1)  # 0.5 ms a draft token
        for f in (0, FEEDBACK):
            p.planner.record_request("chain", f, 5, 1.0)  # 1 of 5 draft tokens accepted
        p.planner.probe_share = 0.0
        return p

    def step(p, n, rows=8):
        p.set_target_feedback(BatchFeedback(ids[:rows], ["tree"] * rows, closed=True,
                                            remaining=[200] * rows))
        return p.propose([[1]] * rows, np.array([n] * rows), np.array([fresh[:n]] * rows))

    p = trained()
    for n in range(8, 8 + PLAN_VALUE_MIN):
        assert step(p, n) == [[]] * 8
    assert p.idle_steps == 0 and p.planner.step == PLAN_VALUE_MIN
    host = sum(p.host_seconds.values())
    for n in range(24, 24 + IDLE_PLAN_EVERY - 1):
        assert step(p, n) == [[]] * 8
    assert p.idle_steps == IDLE_PLAN_EVERY - 1
    assert sum(p.host_seconds.values()) == host and p.planner.step == PLAN_VALUE_MIN
    assert all(p.states[r].index.tokens == fresh[:26] for r in ids)  # synced all the same
    step(p, 27)  # the idle bucket's turn to plan
    assert p.idle_steps == IDLE_PLAN_EVERY - 1 and p.planner.step == PLAN_VALUE_MIN + 1

    # Batch 1 (its own bucket): a Jacobi chain getting 1 of 5 pays at 0.5 ms a token.
    one = trained()
    for n in range(8, 8 + 2 * PLAN_VALUE_MIN):
        one.set_target_feedback(BatchFeedback(["x"], ["tree"], closed=True, remaining=[200]))
        one.propose([[1]], np.array([n]), np.array([fresh[:n]]))
    assert one.idle_steps == 0 and one.planner.last_gain > 0

    for off in (trained(idle_planning=False), trained(cost_aware=False)):
        for n in range(8, 8 + 2 * PLAN_VALUE_MIN):
            step(off, n)
        assert off.idle_steps == 0 and off.planner.step == 2 * PLAN_VALUE_MIN


def test_shadow_accepted_is_the_chains_matching_prefix():
    from proposers.vllm.proposer import shadow_accepted

    assert shadow_accepted((4, 5, 6), [4, 9]) == 1  # differs at the second token
    assert shadow_accepted((4, 5, 6), [7]) == 0
    assert shadow_accepted((4, 5, 6), [4, 5]) is None  # matches so far: undecided
    assert shadow_accepted((4, 5, 6), []) is None
    assert shadow_accepted((4, 5, 6), [4, 5, 6]) == 3


def test_shadow_drafts_teach_the_planner_without_drafting():
    """A greedy request that drafts nothing still teaches the planner what its
    retrieval chain would have got: judged against the tokens it then produced, recorded
    for the chain rung at its feature and in its own record, and no chain probe is
    needed for that feature meanwhile. Sampled requests and fill_noise configs (whose
    chains the shadow could not mirror) make none."""

    import numpy as np

    from proposers.vllm.proposer import CHAIN_RUNG, BatchFeedback

    proposer = _tree8_proposer

    # "a" ends with 5 6 7, seen before followed by 8 9 5 6 7: a 3-gram hit (feature 3).
    text = [5, 6, 7, 8, 9, 5, 6, 7]
    p = proposer()
    for _ in range(5):
        p.planner.record_step("kernel", 1, 0.030)
        p.planner.record_step("kernel", 20, 0.090)  # drafting never pays here
    p.planner.probe_share = 0.0  # and nothing is probed

    def step(tokens, mode="tree"):
        p.set_target_feedback(BatchFeedback(["a"], [mode]))
        return p.propose([[1]], np.array([len(tokens)]), np.array([tokens]))

    outcomes = []
    record = p.record_outcome
    p.record_outcome = lambda *a, **kw: outcomes.append(a) or record(*a, **kw)
    assert step(text) == [[]]  # nothing drafted...
    assert [sh.tokens for sh in p.states["a"].shadows] == [(8, 9, 5, 6, 7)]
    assert p.planner.expected_accepted(CHAIN_RUNG, 3) is None
    # ...the request goes on with 8 9 5 (the chain's first 3 tokens), then 1, not 6.
    step(text + [8])
    step(text + [8, 9])
    assert outcomes == []  # the first shadow still matches: undecided
    step(text + [8, 9, 5])
    step(text + [8, 9, 5, 1])
    # Every step made a shadow (each context ends with a 3-gram seen before): the chains
    # 8 9 5 6 7, 9 5 6 7 8, 5 6 7 8 9 and 6 7 8 9 5 met 8 9 5 1, 9 5 1, 5 1 and 1.
    assert outcomes == [("a", CHAIN_RUNG, 3, 5, n) for n in (3, 2, 1, 0)]
    assert p.num_shadow_outcomes == len(outcomes)
    # Fresh: marked used when judged, just before this step's plan.
    assert p.planner.estimates[(CHAIN_RUNG, 3)].last_used == p.planner.step - 1
    assert p.states["a"].expected > 0  # the request's own record counts them too

    p = proposer()
    p.set_target_feedback(BatchFeedback(["s"], ["auto"]))  # sampled
    p.propose([[1]], np.array([len(text)]), np.array([text]))
    assert not p.states["s"].shadows
    p = proposer(fill_noise=True)
    p.set_target_feedback(BatchFeedback(["a"], ["tree"]))
    p.propose([[1]], np.array([len(text)]), np.array([text]))
    assert not p.states["a"].shadows


def test_chain_cuts_draft_a_prefix_and_learn_exactly_from_longer_chains():
    """`chain_cuts`: rungs that draft the chain's first k tokens. A chain's accepted
    tokens are a prefix, so any longer draft of it (or a shadow) tells exactly what a
    cut would have got: min(accepted, k) of min(k, nodes); cuts at most as long as what
    was drafted learn nothing from its shadow (the draft taught them)."""

    import numpy as np

    from proposers.vllm.proposer import CHAIN_RUNG, BatchFeedback, chain_cut

    proposer = _tree8_proposer

    p = proposer()
    assert [r.name for r in p.planner.rungs][:3] == ["chain:2", "chain:4", CHAIN_RUNG]
    def known(rung):
        est = p.planner.estimates[(rung, 3)]
        return round(est.nodes.value, 3), round(est.accepted.value, 3)

    p.record_outcome("a", CHAIN_RUNG, 3, 9, 3)  # the whole chain: 3 of 9
    assert known(chain_cut(2)) == (2, 2) and known(chain_cut(4)) == (4, 3)
    p = proposer()
    p.record_outcome("a", CHAIN_RUNG, 3, 3, 1)  # a 3-token chain: chain:4 drafts it too
    assert known(chain_cut(2)) == (2, 1) and known(chain_cut(4)) == (3, 1)
    p = proposer()
    p.record_outcome("a", chain_cut(4), 3, 4, 4)  # a cut, all accepted: the rest unknown
    assert known(chain_cut(2)) == (2, 2) and (CHAIN_RUNG, 3) not in p.planner.estimates
    p.record_outcome("a", CHAIN_RUNG, 3, 9, 6, shadow=True, drafted=4)  # its shadow
    assert known(CHAIN_RUNG) == (9, 6) and known(chain_cut(4)) == (4, 4)
    assert p.planner.estimates[(chain_cut(2), 3)].accepted.value == 2  # once, not twice

    # Drafting a cut: the chain's first k tokens, as a k-node chain.
    text = [5, 6, 7, 8, 9, 5, 6, 7]  # a 3-gram hit: the retrieval chain 8 9 5 6 7
    p = proposer()
    for _ in range(5):
        p.planner.record_step("kernel", 1, 0.030)
        p.planner.record_step("kernel", 20, 0.090)
    p.planner.probe_share = 0.0
    p.planner.plan = lambda features, **kw: [chain_cut(2)] * len(features)
    p.set_target_feedback(BatchFeedback(["a"], ["tree"]))
    assert p.propose([[1]], np.array([len(text)]), np.array([text])) == [[8, 9]]
    plan = p.plan_for("a")
    assert plan.rung == chain_cut(2) and plan.tree.is_chain and plan.tree.num_nodes == 2
    # Its shadow is the whole chain, marked as drafted to 2.
    assert [(sh.tokens, sh.drafted) for sh in p.states["a"].shadows] == [((8, 9, 5, 6, 7), 2)]


def test_chain_cuts_are_checked():
    from proposers.vllm.config import TRJacobiConfig

    assert TRJacobiConfig().chain_cuts == (2, 4)
    assert TRJacobiConfig.from_vllm(type("C", (), {"additional_config": {
        "trjacobi": TRJacobiConfig(chain_cuts=[3]).to_dict()}})()).chain_cuts == (3,)
    assert TRJacobiConfig(chain_cuts=()).chain_cuts == ()
    for bad in ((0,), (4, 2), (2, 2), (10,), ("2",)):
        with pytest.raises(ValueError, match="chain_cuts"):
            TRJacobiConfig(chain_cuts=bad)


def test_planner_trace_writes_one_line_per_planned_step(tmp_path, monkeypatch):
    """MSN_TRJACOBI_TRACE=path: each planned step appends its features, scales, rungs,
    cost lines and the estimates for those features, as one JSON line; each verified
    draft one more, with what it was expected to get and got; each executed step one
    with its size and time."""
    import json
    import types

    import numpy as np

    from proposers.vllm.config import TRJacobiConfig
    from proposers.vllm.proposer import TRACE_ENV, BatchFeedback, TRJacobiProposer

    path = tmp_path / "trace.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(path))
    config = TRJacobiConfig(templates=("tree-8",))
    p = TRJacobiProposer(types.SimpleNamespace(
        speculative_config=types.SimpleNamespace(num_speculative_tokens=config.max_draft_tokens()),
        additional_config={"trjacobi": config.to_dict()}))
    p.planner.record_request("chain", 3, 5, 2.0)
    text = [5, 6, 7, 8, 9, 5, 6, 7]
    for modes in (["tree"], ["off"], ["tree"]):  # an unplanned step writes nothing
        p.set_target_feedback(BatchFeedback(["a"], modes))
        p.propose([[1]], np.array([len(text)]), np.array([text]))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2
    assert lines[0]["features"] == [3] and lines[0]["rungs"] == ["none"]
    assert lines[0]["estimates"] == {"chain@3": [2.0, 5.0]}
    assert set(lines[0]) == {"step", "closed", "features", "scales", "rungs", "lines",
                             "estimates"}
    p.record_outcome("a", "chain", 3, 5, 1)  # a verified draft: its own line
    outcome = json.loads(path.read_text().splitlines()[-1])
    assert outcome == {"step": p.planner.step, "outcome": "a", "rung": "chain", "feature": 3, "nodes": 5,
                       "accepted": 1, "expected": 2.0, "shadow": False}
    p.trace_step("kernel", 1, 6, 0, 0.0412345678)  # an executed step (the runner's call)
    step = json.loads(path.read_text().splitlines()[-1])
    assert step == {"step": p.planner.step, "path": "kernel", "batch": 1, "tokens": 6,
                    "prefill": 0, "seconds": 0.041235}


def test_chain_modes_need_no_tree_templates():
    """In chain / retrieval / off modes no request gets a tree: `engine_kwargs` sizes
    num_speculative_tokens without the tree ladder, and the proposer neither compiles
    nor checks it (it used to refuse: "smaller than template(s) ['tree-32', ...]")."""
    import types

    from proposers.vllm.config import TRJacobiConfig, engine_kwargs
    from proposers.vllm.proposer import CHAIN_RUNG, TRJacobiProposer

    def proposer(kwargs):
        spec = kwargs["speculative_config"]
        return TRJacobiProposer(types.SimpleNamespace(
            speculative_config=types.SimpleNamespace(
                num_speculative_tokens=spec["num_speculative_tokens"]),
            additional_config=kwargs["additional_config"]))

    for mode in ("chain", "retrieval", "off"):
        kwargs = engine_kwargs(mode=mode)
        assert kwargs["speculative_config"]["num_speculative_tokens"] == 10  # retrieval-10
        p = proposer(kwargs)
        assert set(p.trees) == {"chain-5", "retrieval-10"}
        assert [r.name for r in p.planner.rungs] == ["chain:2", "chain:4", CHAIN_RUNG]
    # Tree mode still needs room for its largest template.
    config = TRJacobiConfig()
    assert config.max_draft_tokens() == 67  # paper-68: 67 nodes below the root
    small = {"speculative_config": {"num_speculative_tokens": 10},
             "additional_config": {"trjacobi": config.to_dict()}}
    with pytest.raises(ValueError, match="paper-68"):
        proposer(small)


def test_engine_kwargs_keep_vllms_batched_token_default():
    """The token budget fits every request's largest tree but never drops below vLLM's
    own default (4096 for the LLM class on CPU: at 2048 long prompts prefilled in twice
    the steps)."""
    from proposers.vllm.config import default_batched_tokens, engine_kwargs

    llm, server = default_batched_tokens(), default_batched_tokens("OPENAI_API_SERVER")
    assert llm >= server >= 256
    kwargs = engine_kwargs(max_num_seqs=8)
    need = 8 * (kwargs["speculative_config"]["num_speculative_tokens"] + 1)
    assert kwargs["max_num_batched_tokens"] == max(llm, need)
    assert engine_kwargs(max_num_seqs=8, usage_context="OPENAI_API_SERVER")[
        "max_num_batched_tokens"] == max(server, need)
    big = engine_kwargs(max_num_seqs=256)
    assert big["max_num_batched_tokens"] == 256 * (
        big["speculative_config"]["num_speculative_tokens"] + 1) > llm
    with pytest.raises(ValueError, match="unknown vLLM usage context"):
        engine_kwargs(usage_context="NOPE")


def test_engine_kwargs_turn_off_uniform_decode_padding():
    """`engine_kwargs` sets a flat draft schedule (`no_uniform_decode_padding`): it keeps
    every batch size at the full draft width, and vLLM's scheduler
    still pads admissions only without one (a tripwire on the vLLM source: if this
    moves, placeholder drafts of full width come back; the engine-level check is
    tests/test_vllm_plugin.py::test_cache_hit_admission_drafts_nothing)."""
    import inspect

    from vllm.config import SpeculativeConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    from proposers.vllm.config import engine_kwargs

    spec = engine_kwargs(max_num_seqs=8)["speculative_config"]
    width = spec["num_speculative_tokens"]
    schedule = spec["num_speculative_tokens_per_batch_size"]
    assert build_dynamic_sd_schedule_lookup(schedule, 8, width)[1:] == [width] * 8
    assert SpeculativeConfig.__dataclass_fields__["num_speculative_tokens_per_batch_size"]
    source = inspect.getsource(Scheduler.schedule)
    assert "pad_spec_decode = True" in source
    assert "self.dynamic_sd_lookup is None" in source


def test_executor_serves_carried_drafts_without_the_rpc(monkeypatch):
    """`TRJacobiExecutor` hands the engine core the drafts a step's output carried, and
    asks the workers (vLLM's RPC) only when the step's output carried none."""
    from types import SimpleNamespace

    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    from proposers.vllm.config import EXECUTOR_PATH, engine_kwargs
    from proposers.vllm.executor import DRAFTS_ATTR, TRJacobiExecutor, attach_drafts

    rpcs = []
    outputs = iter([SimpleNamespace(), attach_drafts(SimpleNamespace(), "drafts-2"),
                    attach_drafts(SimpleNamespace(), None)])
    monkeypatch.setattr(MultiprocExecutor, "execute_model", lambda self, so, non_block=False: None)
    monkeypatch.setattr(MultiprocExecutor, "sample_tokens",
                        lambda self, go, non_block=False: next(outputs))
    monkeypatch.setattr(MultiprocExecutor, "take_draft_token_ids",
                        lambda self: rpcs.append(1) or "via-rpc")
    executor = object.__new__(TRJacobiExecutor)
    executor._carried = object()
    taken = []
    for _ in range(3):  # the engine core's step + post_step
        executor.execute_model("scheduler-output")
        executor.sample_tokens(None)
        taken.append(executor.take_draft_token_ids())
    assert taken == ["via-rpc", "drafts-2", None] and len(rpcs) == 1
    # A step with no sample_tokens (the output came from execute_model) never reuses
    # the previous step's drafts.
    executor.execute_model("scheduler-output")
    assert executor.take_draft_token_ids() == "via-rpc" and len(rpcs) == 2
    # attach_drafts copies: a shared output object (vLLM's EMPTY_MODEL_RUNNER_OUTPUT)
    # is never marked.
    shared = SimpleNamespace(x=1)
    assert attach_drafts(shared, "d").x == 1 and not hasattr(shared, DRAFTS_ATTR)
    assert engine_kwargs()["distributed_executor_backend"] == EXECUTOR_PATH


def test_engine_kwargs_default_kv_cache_space(monkeypatch):
    """Tree mode on CPU: a KV cache size when the user set none (vLLM-CPU's own default
    is most of the RAM, no room for a mirror); an explicit one wins; other modes keep
    vLLM's default."""
    import os

    from vllm.platforms import current_platform

    from proposers.vllm import config as cfg

    if not current_platform.is_cpu():
        pytest.skip("the default applies to vLLM's CPU platform only")
    monkeypatch.setattr(cfg, "available_memory", lambda: (22 * cfg.GiB, 24 * cfg.GiB))
    monkeypatch.delenv(cfg.KV_CACHE_SPACE_ENV, raising=False)
    monkeypatch.delenv("MSN_TRJACOBI_TREE_ATTN", raising=False)
    cfg.engine_kwargs(mode="chain")
    assert cfg.KV_CACHE_SPACE_ENV not in os.environ
    cfg.engine_kwargs()
    assert os.environ[cfg.KV_CACHE_SPACE_ENV] == "5"  # a quarter of 22 GiB
    monkeypatch.setenv(cfg.KV_CACHE_SPACE_ENV, "2")
    cfg.engine_kwargs()
    assert os.environ[cfg.KV_CACHE_SPACE_ENV] == "2"
    monkeypatch.setattr(cfg, "available_memory", lambda: (3 * cfg.GiB, 4 * cfg.GiB))
    assert cfg.default_kv_cache_space() == 1


# ---------------------------------------------------------------- packed KV reads
# Tree steps read K/V straight from vLLM's packed CPU cache where the layout is known,
# guarded by a self-check against vLLM's own writer; elsewhere a plain mirror.
BLOCK = 32
KNOWN_LAYOUT_ISAS = ("vec", "vec16")  # vllm-integration.md section 5 (fp32 `vec`), measured


def _attention_layer(monkeypatch, dtype=torch.float32, head=64, num_kv_heads=2,
                     num_heads=6):
    """A tree-attention impl and the layer attributes vLLM's cache writer reads."""
    import types

    from vllm.v1.attention.backends import cpu_attn

    from proposers.vllm.tree_attention import TreeCPUAttentionImpl

    monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: types.SimpleNamespace(
        model_config=types.SimpleNamespace(dtype=dtype)))
    impl = TreeCPUAttentionImpl(num_heads, head, head ** -0.5, num_kv_heads, None, None,
                                "auto")
    layer = types.SimpleNamespace(isa=cpu_attn._get_attn_isa(dtype, BLOCK, head),
                                  _k_scale_float=1.0, _v_scale_float=1.0)
    return impl, layer


@pytest.mark.parametrize("dtype,head", [(torch.float32, 64), (torch.float32, 80),
                                        (torch.bfloat16, 64)])
def test_packed_kv_reader_reads_what_vllm_wrote(monkeypatch, dtype, head):
    """`read_packed_kv` returns exactly the rows vLLM's stock writer stored, for random
    slots across several blocks (starts, middles, ends of blocks), in any index shape."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    from proposers.vllm.tree_attention import packed_layout_readable, read_packed_kv

    impl, layer = _attention_layer(monkeypatch, dtype, head)
    g = torch.Generator().manual_seed(1)
    num_blocks = 7
    kv_cache = torch.zeros(num_blocks, 2, BLOCK, 2 * head, dtype=dtype)
    edges = torch.tensor([0, BLOCK - 1, BLOCK, 3 * BLOCK + BLOCK // 2])
    rest = torch.randperm(num_blocks * BLOCK, generator=g)
    slots = torch.cat([edges, rest[~torch.isin(rest, edges)][:96]])
    assert slots.unique().numel() == 100 and (slots // BLOCK).unique().numel() == num_blocks
    key = torch.randn(100, 2, head, generator=g).to(dtype)
    value = torch.randn(100, 2, head, generator=g).to(dtype)
    CPUAttentionBackendImpl.do_kv_cache_update(impl, layer, key, value, kv_cache, slots)
    readable = packed_layout_readable(impl, layer, kv_cache)
    if layer.isa in KNOWN_LAYOUT_ISAS:
        assert readable
    if readable:
        k, v = read_packed_kv(kv_cache, slots)
        assert torch.equal(k, key) and torch.equal(v, value)
        k, v = read_packed_kv(kv_cache, slots[:96].view(8, 12))  # [R, L] like key_slots
        assert torch.equal(k, key[:96].view(8, 12, 2, head))
        assert torch.equal(v, value[:96].view(8, 12, 2, head))


def _skip_unless_known_layout(layer) -> None:
    if layer.isa not in KNOWN_LAYOUT_ISAS:
        pytest.skip(f"vLLM picks ISA {layer.isa!r} here, whose packed layout we do not read")


def _row_major_writer(key, value, key_cache, value_cache, slot_mapping, isa, *args, **kw):
    """vLLM's cache writer with the wrong layout: K row-major, like V."""
    block_size = key_cache.shape[2]
    for i, slot in enumerate(slot_mapping.tolist()):
        key_cache[slot // block_size, :, slot % block_size] = key[i]
        value_cache[slot // block_size, :, slot % block_size] = value[i]


def test_layout_self_check_rejects_a_wrong_layout(monkeypatch):
    from vllm import _custom_ops

    from proposers.vllm.tree_attention import packed_layout_readable

    impl, layer = _attention_layer(monkeypatch)
    _skip_unless_known_layout(layer)
    kv_cache = torch.zeros(4, 2, BLOCK, 128)
    assert packed_layout_readable(impl, layer, kv_cache)
    monkeypatch.setattr(_custom_ops, "cpu_attn_reshape_and_cache", _row_major_writer)
    assert not packed_layout_readable(impl, layer, kv_cache)


def _tree_forward(impl, layer, kv_cache, query, step):
    from proposers.vllm.tree_runtime import RUNTIME

    output = torch.zeros_like(query)
    RUNTIME.step = step
    try:
        impl.forward(layer, query, None, None, kv_cache, object(), output)
    finally:
        RUNTIME.step = None
    return output


def test_tree_step_reads_packed_cache_or_mirror_alike(monkeypatch):
    """A tree step through the impl gives the same attention from vLLM's packed cache as
    from a mirror, and both match SDPA over the K/V rows themselves; compaction
    rewrites both. A layer whose layout was never checked refuses tree steps."""
    import torch.nn.functional as F

    from proposers.vllm.tree_attention import MIRROR, PACKED

    impl, layer = _attention_layer(monkeypatch)
    _skip_unless_known_layout(layer)
    g = torch.Generator().manual_seed(2)
    num_blocks, head, kv_heads = 8, 64, 2
    kv_cache = torch.zeros(num_blocks, kv_heads, BLOCK, 2 * head)
    impl.mirror = torch.zeros(num_blocks * BLOCK, 2, kv_heads, head)
    block_rows = torch.tensor([[3, 6, 1], [5, 0, 7]])
    num_computed, tree_len = [40, 70], [4, 2]
    anc = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]],
                       dtype=torch.bool)
    step = build_tree_step([0, 4, 6], num_computed, block_rows, BLOCK, {0: anc})
    lengths = [c + n for c, n in zip(num_computed, tree_len)]
    keys = [torch.randn(n, kv_heads, head, generator=g) for n in lengths]
    values = [torch.randn(n, kv_heads, head, generator=g) for n in lengths]
    for r, n in enumerate(lengths):  # prefix and this step's tokens, as vLLM writes them
        impl.do_kv_cache_update(layer, keys[r], values[r], kv_cache, step.key_slots[r, :n])
    query = torch.randn(6, 6, head, generator=g)

    with pytest.raises(RuntimeError, match="never checked"):
        _tree_forward(impl, layer, kv_cache, query, step)
    impl.kv_source = PACKED
    packed = _tree_forward(impl, layer, kv_cache, query, step)
    impl.kv_source = MIRROR
    mirrored = _tree_forward(impl, layer, kv_cache, query, step)
    assert torch.equal(packed, mirrored)
    for r, (start, n) in enumerate(zip([0, 4], tree_len)):
        q = query[start: start + n].transpose(0, 1)
        mask = step.mask[r, :n, : lengths[r]]
        want = F.scaled_dot_product_attention(
            q, keys[r].transpose(0, 1), values[r].transpose(0, 1), attn_mask=mask,
            scale=impl.scale, enable_gqa=True).transpose(0, 1)
        torch.testing.assert_close(packed[start: start + n], want)
    # A compaction-style rewrite lands in both.
    slots = step.key_slots[0, 41:43]
    new_k, new_v = torch.randn(2, kv_heads, head), torch.randn(2, kv_heads, head)
    impl.do_kv_cache_update(layer, new_k, new_v, kv_cache, slots)
    impl.kv_source = PACKED
    assert torch.equal(impl.gather_kv(kv_cache, slots)[0], new_k)
    impl.kv_source = MIRROR
    assert torch.equal(impl.gather_kv(kv_cache, slots)[1], new_v)


def _runner_with_layers(impl, layer, kv_cache):
    """What `TRJacobiRunner._choose_tree_kv_sources` reads of a runner."""
    import types

    layer.impl, layer.kv_cache = impl, kv_cache
    size = kv_cache.numel() * kv_cache.element_size()
    return types.SimpleNamespace(
        compilation_config=types.SimpleNamespace(static_forward_context={"l0": layer}),
        kv_cache_config=types.SimpleNamespace(
            kv_cache_tensors=[types.SimpleNamespace(size=size)]))


def test_runner_mirrors_only_unreadable_layouts_and_checks_memory(monkeypatch, caplog):
    """Readable layouts: no mirror. An unreadable one (here: a writer with the wrong
    layout) gets a mirror allocated with the cache, unless memory is short: then a clear
    error with the sizes and a VLLM_CPU_KVCACHE_SPACE that fits."""
    from vllm import _custom_ops

    from proposers.vllm import runner as runner_mod
    from proposers.vllm.config import GiB
    from proposers.vllm.tree_attention import MIRROR, PACKED

    impl, layer = _attention_layer(monkeypatch)
    _skip_unless_known_layout(layer)
    kv_cache = torch.zeros(4, 2, BLOCK, 128)
    fake = _runner_with_layers(impl, layer, kv_cache)
    choose = runner_mod.TRJacobiRunner._choose_tree_kv_sources
    monkeypatch.setattr(runner_mod, "available_memory", lambda: (8 * GiB, 24 * GiB))
    choose(fake)
    assert impl.kv_source == PACKED and impl.mirror is None

    monkeypatch.setattr(_custom_ops, "cpu_attn_reshape_and_cache", _row_major_writer)
    with caplog.at_level("INFO", logger="proposers.vllm.runner"):
        choose(fake)
    assert impl.kv_source == MIRROR and impl.mirror.shape == (4 * BLOCK, 2, 2, 64)
    assert any("mirror" in m and f"{layer.isa} float32" in m for m in caplog.messages)

    # vLLM-CPU's auto size: a 20 GiB cache, 3 GiB left; the mirror needs 20 GiB more.
    cache = 20 * GiB
    layer.kv_cache = kv_cache[:1].expand(cache // kv_cache[0].nbytes, -1, -1, -1)
    fake.kv_cache_config.kv_cache_tensors[0].size = cache
    monkeypatch.setattr(runner_mod, "packed_layout_readable", lambda *args: False)
    monkeypatch.setattr(runner_mod, "available_memory", lambda: (3 * GiB, 24 * GiB))
    with pytest.raises(RuntimeError) as err:
        choose(fake)
    msg = str(err.value)
    assert "20.00 GiB more" in msg and "3.00 GiB is free" in msg
    assert "VLLM_CPU_KVCACHE_SPACE=11 (GiB) or less" in msg  # (3 + 20 - 1) / 2


def test_prefill_tokens_counts_prompt_tokens_beyond_sample_and_drafts():
    """The planner's cost lines skip steps with prompt tokens (runner.prefill_tokens)."""
    from types import SimpleNamespace

    from proposers.vllm.runner import prefill_tokens

    def step(scheduled, spec):
        return SimpleNamespace(num_scheduled_tokens=scheduled, scheduled_spec_decode_tokens=spec)

    assert prefill_tokens(step({"a": 1, "b": 1}, {})) == 0  # plain decode
    assert prefill_tokens(step({"a": 6, "b": 1}, {"a": [5, 6, 7, 8, 9]})) == 0  # a chain
    assert prefill_tokens(step({"a": 1, "c": 300}, {})) == 299  # c's prompt (one samples)
    # A middle chunk of a longer prompt samples nothing; any count > 0 marks the step.
    assert prefill_tokens(step({"c": 512}, {})) == 511


def test_cost_line_keeps_its_slope_while_steps_have_one_size():
    """After drafting stops, every step has the batch's size: the fitted per-token cost
    stays (it does not fall back to cost proportional to tokens, 3x too steep at batch 8)."""
    from proposers.vllm.planner import _Line

    line = _Line()
    for _ in range(20):
        line.add(8, 0.080 + 8 * 0.005)
        line.add(20, 0.080 + 20 * 0.005)
    a, b = line.coefficients()
    assert abs(b - 0.005) < 1e-9 and abs(a - 0.080) < 1e-9
    for _ in range(300):  # the drafted steps decay away
        line.add(8, 0.120)
    a, b = line.coefficients()
    assert abs(b - 0.005) < 1e-6 and abs(a + 8 * b - 0.120) < 1e-6
    fresh = _Line()
    fresh.add(8, 0.120)
    a, b = fresh.coefficients()  # no slope seen yet: the prior, 2% of the step a token
    assert abs(b - 0.0024) < 1e-12 and abs(a + 8 * b - 0.120) < 1e-12


def test_planner_settings_reach_the_planner():
    """`TRJacobiConfig.min_gain` (the margin a plan must clear over not drafting),
    `closed_value` and `probe_share` travel through vLLM's config to the planner; bad
    values are refused up front."""
    import types

    from proposers.vllm.config import TRJacobiConfig, engine_kwargs
    from proposers.vllm.planner import MIN_GAIN, PROBE_SHARE
    from proposers.vllm.proposer import TRJacobiProposer

    assert TRJacobiConfig().min_gain == MIN_GAIN
    assert TRJacobiConfig().closed_value == "laggards"
    assert TRJacobiConfig().probe_share == PROBE_SHARE
    kwargs = engine_kwargs(TRJacobiConfig(mode="chain", min_gain=0.1, closed_value="least",
                                          probe_share=0.05))
    p = TRJacobiProposer(types.SimpleNamespace(
        speculative_config=types.SimpleNamespace(num_speculative_tokens=10),
        additional_config=kwargs["additional_config"]))
    assert (p.planner.min_gain, p.planner.closed_value) == (0.1, "least")
    assert p.planner.probe_share == 0.05
    assert p.planner.max_nodes["chain"] == 10  # retrieval-10, the longer chain template
    for bad in ({"min_gain": -0.01}, {"min_gain": 1.0}, {"closed_value": "max"},
                {"probe_share": -0.1}, {"probe_share": 1.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TRJacobiConfig(**bad)


def test_finished_outputs_serve_later_requests_from_the_shared_corpus():
    """Retrieval across requests (algorithm.md section 5): a finished request's output
    (led in by its prompt's last tokens) joins the corpus; a later request whose own
    context has no match drafts its continuation, under a feature of its own (CORPUS)
    so the planner learns corpus hits apart. An own match of any length wins;
    preempted requests and requests that never drafted add nothing; clearing or
    `corpus_tokens=0` leaves only the request's own context."""
    import numpy as np

    from proposers.vllm.planner import CORPUS
    from proposers.vllm.proposer import CORPUS_LONG, LONG_MATCH, BatchFeedback

    p = _tree8_proposer()
    for _ in range(50):
        p.planner.record_step("kernel", 1, 0.030)
        p.planner.record_step("kernel", 20, 0.033)
        p.planner.record_step("tree", 20, 0.2)
    for _ in range(10):
        p.planner.record_request("chain", 3 + CORPUS, 5, 5.0)
        p.planner.record_request("tree-8", 3 + CORPUS, 8, 0.0)
    p.planner.probe_share = 0.0

    def step(req, tokens, mode="tree"):
        p.set_target_feedback(BatchFeedback([req], [mode]))
        return p.propose([[tokens[-1]]], np.array([len(tokens)]), np.array([tokens]))[0]

    prompt, answer = [100, 101, 102], [7, 8, 9, 10, 11, 12]
    for k in range(1, len(answer) + 1):  # "a" answers, one token a step
        step("a", prompt + answer[:k])
    step("o", [300, 301, 302, 303], mode="off")  # never looked up: adds nothing
    p.finish(["a", "o"])
    assert "a" not in p.states and p.corpus.num_docs == 1
    assert len(p.corpus) == len(prompt + answer)

    # "b": another prompt that ends as a's did; its own context has no match.
    tokens = [200, 101, 102, 7]
    assert step("b", tokens)[:5] == [8, 9, 10, 11, 12]
    plan = p.plan_for("b")
    assert plan.rung == "chain" and plan.feature == 3 + CORPUS
    assert (p.num_corpus_lookups, p.num_corpus_drafts) == (1, 1)
    # An own match, even a 1-gram (7 seen before), wins over the corpus's 3-gram...
    assert p._lookup("c", np.array([7, 50, 101, 102, 7])) == ([50, 101, 102, 7], 1, False)
    # ...unless the corpus match runs back CORPUS_LONG tokens (a repeated answer), which
    # beats even a full-length own match, under its own feature value (LONG_MATCH).
    repeat = [100, 101, 102, 7, 8, 9, 10, 8, 9, 10]  # own "8 9 10" -> 8 9 10 too
    assert CORPUS_LONG <= 7 and p._lookup("r", np.array(repeat))[1:] == (3, False)
    answer_again = prompt + answer[:5]  # 100 101 102 7 8 9 10 11: all in a's document
    assert p._lookup("s", np.array(answer_again)) == ([12], LONG_MATCH, True)
    p.release(["b"])  # preempted: comes back later, adds nothing now
    assert "b" not in p.states and p.corpus.num_docs == 1
    step("f", prompt + answer)  # alive when the corpus is cleared: never joins it
    p.clear_corpus()
    assert len(p.corpus) == 0 and p._lookup("e", np.array(tokens)) == ([], 0, False)
    p.finish(["f"])
    assert len(p.corpus) == 0

    q = _tree8_proposer(corpus_tokens=0)
    assert q.corpus is None
    for k in range(1, len(answer) + 1):
        q.set_target_feedback(BatchFeedback(["a"], ["tree"]))
        q.propose([[1]], np.array([3 + k]), np.array([prompt + answer[:k]]))
    q.finish(["a"])
    assert q._lookup("b", np.array(tokens)) == ([], 0, False)


def test_corpus_settings_are_checked():
    from proposers.vllm.config import TRJacobiConfig

    with pytest.raises(ValueError, match="corpus_tokens"):
        TRJacobiConfig(corpus_tokens=-1)
    with pytest.raises(ValueError, match="corpus_min_ngram"):
        TRJacobiConfig(corpus_min_ngram=4)
    with pytest.raises(ValueError, match="corpus_min_ngram"):
        TRJacobiConfig(corpus_min_ngram=1)  # 1 marks a long corpus match in the feature
    assert TRJacobiConfig(corpus_tokens=0, corpus_min_ngram=1).corpus_tokens == 0
    with pytest.raises(ValueError, match="max_ngram"):
        TRJacobiConfig(max_ngram=4)  # would collide with the planner's FEEDBACK bit
