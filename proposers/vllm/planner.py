"""Cost-aware drafting: how much each request speculates in the next step, or not at all.

On a 2-core CPU a verify step of T tokens costs roughly a + b*T, and b is large
(architecture.md: vLLM's own n-gram speculation runs at 0.75-0.83x of plain), so
drafting pays only for requests whose drafts are likely to be accepted. Each step the
planner gives every tree-mode request a rung of a ladder (no speculation, the Jacobi /
retrieval chain cut to its first few tokens (`chain:2`, `chain:4`: config `chain_cuts`),
the whole chain, then the tree templates, smallest first) to maximise the step's
expected throughput

    rate = (B + sum_i accepted(rung_i, f_i)) / cost(path, B + sum_i nodes(rung_i, f_i))

where B is the number of decoding requests, `f_i` a cheap per-request feature (the
length of the n-gram the retrieval lookup matched now, 0-3, plus CORPUS when that match
is in other requests' outputs rather than the request's own context (there 1 marks a
match running back 6+ tokens: proposer.CORPUS_LONG), plus FEEDBACK when
the target's top-K from the request's previous drafts is at hand, which Jacobi guesses
need; offset by SAMPLED for sampled requests, which draft chains only), `accepted` /
`nodes` exponential averages per (rung, feature) of
what the runner observed, and `cost` a line fitted to measured times of decode steps per
attention path ("kernel": vLLM's own CPU kernel, used by plain and chain steps; "tree": the
PyTorch tree path, taken by the whole batch as soon as one request drafts a tree) and
batch-size bucket (BUCKET_MIN_STEPS: a draft token costs ~0.5 ms of a batch-1 step and
3-4 ms of a batch-8 one on 2 cores). Steps
with prompt tokens are left out of the fit (runner.prefill_tokens): a prompt token costs a
fraction of a draft token, and a few prefill steps would flatten the slope.
The ratio is maximised exactly per path with Dinkelbach's method: for a guess `lam` of
the rate, each request independently picks the rung maximising
`accepted - lam * slope * nodes`; the resulting rate is the next guess.

When no request waits for a slot (`plan(..., closed=True)`: the batch is all the work
there is; `scheduler.TRJacobiScheduler` tells), the batch ends with its last request:
tokens accepted by requests ahead of the back shorten no step, they only drop those
requests from the batch's last steps, worth the per-token slope b, never more than the b
each of their draft tokens costs. So by default (`closed_value="laggards"`) only the
requests with the most tokens left (`plan(..., remaining=)`, which the runner fills from
each request's max_tokens) may draft, all together (each its best known rung, Dinkelbach
as above with no speculation left out of each one's options), and the plan is valued by
the least of them, `(B + B * least accepted) / cost`: the batch advances by what its back
advances (the least of n acceptances expected below the least mean by their spread:
`rate`). That plan must beat not drafting by the margin. With one request nothing
changes. Measured at batch 8 on 2 cores, MSN model, against plain vLLM in the same run
(geometric means over 5 repeats, benchmarks/results/vllm_cpu_msn_interleaved_b8-laggards.json):
mt_bench 1.005, translation 1.23, summarization 0.995, qa 1.01, math 1.005, rag 1.20,
where the previous default ("sum": every planned request drafts together, every accepted
token counts) measured 0.94, 1.17, 0.94, 1.02, 0.98, 1.23 in the same run: its drafts were
accepted, but mostly by requests ahead of the back, so the batch took as many steps as
without drafts (benchmarks/results/vllm_cpu_step_split.json). Two later runs of the
default (`-final.json`, `-final2.json`) measured qa 0.97 and 0.95, math 0.99 and 0.97 of
plain, with the drafting-off control at 0.97 on both in the second: not yet "never
slower" there (benchmarks/results/vllm-cpu-log.md). "least" (everyone drafts together,
valued by the least of all) was no better than "sum" (`-shadow-least.json`). A rule of
2026-11-28 that let the back draft without valuing it by its least member measured worse
on translation, but on a benchmark whose engine order was biased (`-tail.json`, the log).

(rung, feature) pairs never tried, or not tried for a while, are probed on one request
now and then (tree rungs more rarely, since a tree step moves the whole batch to the
tree path), so the estimates follow the workload at a small cost. The cost is bounded:
a probe is also paid from a budget that grows by `probe_share` (PROBE_SHARE) of each
step's expected time and spends a probe's expected extra seconds (its nodes on the cost
line, plus the whole batch's switch to the tree path for a tree rung). At batch 1 a chain
probe is cheap and the cadence decides; at batch 8 on 2 cores a chain probe made its
step 1.5x a plain one, and the fixed cadence alone (8 probes in 129 steps) cost a closed
batch about 3%, for drafts that could not shorten it. A rung that could not pay even at
its best (every draft accepted along its deepest path; `_could_pay`) is not probed at
all: what a probe would learn of it, the planner would never act on.

Planning itself costs host time on the step's critical path (0.4-0.7 ms at batch 8 on 2
cores). Where the plans of a batch size expect to save less than that (`last_gain`, the
seconds of plain decoding a plan's drafts should save), the proposer plans only every
4th step (`proposer.PlanValue`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from statistics import NormalDist

NONE = "none"
KERNEL, TREE = "kernel", "tree"
FAST_PROBE_EVERY = 4
# Features of sampled requests are offset by this: their acceptance differs from greedy
# ones, and they may only draft chains (vLLM's rejection sampler verifies chains).
SAMPLED = 16
FEEDBACK = 4  # added to the feature when Jacobi feedback is available
CORPUS = 8  # added when the retrieval match is in the shared corpus (retrieval.CorpusIndex)
MAX_NGRAM = FEEDBACK - 1  # the match length takes the feature's two low bits
# A step drafts only if its expected rate beats not drafting by this much: the estimates
# are noisy averages, and at batch 8 on 2 cores drafts the planner expected to pay by a
# little (4-18% of request-steps on mt_bench, qa, summarization) made those groups
# 2-14% slower than plain vLLM (benchmarks/results/vllm_cpu_msn_interleaved_b8.json).
MIN_GAIN = 0.03
# Before a cost line has seen two step sizes: each token costs this share of the mean step
# (measured on 2 cores: 1.7% at batch 1, 2-4% of an 8-token step at batch 8; _Line).
PRIOR_SLOPE = 0.02
# How a closed batch's drafting plan is valued (module docstring): "laggards" (default)
# only the requests with the most tokens left (`plan(..., remaining=)`) may draft, all
# together, valued by the least of them, since the batch ends with them; "least" every
# request drafts together, valued by the least-advanced (B times the smallest expected
# acceptance); "sum" every request together, every accepted token counts (as an open
# batch does). Without `remaining`, "laggards" plans as "sum".
CLOSED_VALUES = ("laggards", "least", "sum")
CLOSED_VALUE = "laggards"
# Probes may cost at most this share of the expected step time (module docstring).
PROBE_SHARE = 0.01
# The budget holds at most this many steps' worth of credit (no burst after a lull).
PROBE_CREDIT_STEPS = 256
# A (rung, feature) estimate with fewer than PRIOR_UNTIL outcomes is lifted toward the
# rung's pooled acceptance per draft token (all features) with this many pseudo-outcomes
# (`CostPlanner._known`). Draft outcomes are all-or-little, so a pair seen once or twice
# at 0 kept a value of 0 and was never drafted again but by a rare probe: at batch 1 on
# math (MSN model) a planner trace showed Jacobi chains on deep feedback at 0 after 3
# misses (the always-drafting chain got 0.5 tokens of 5 there), and 55-70 of ~245 steps
# undrafted.
PRIOR_WEIGHT = 2.0
PRIOR_UNTIL = 10
POOLED = -1  # the feature key of a rung's pooled estimate
# Cost lines are also kept per batch-size bucket (`batch_bucket`): a step's cost is not
# one line in its tokens across batch sizes. On 2 cores a batch-1 step reads the weights
# for one token or nine alike (fitted 0.4-0.5 ms a token, ~1% of a ~38 ms step), while at
# batch 8 every draft token is compute (fitted 2.9-4.2 ms: vllm_cpu_msn_step_costs.json,
# vllm_cpu_base_interleaved_table-1253c13.json). One line for all batches carried batch 8's slope
# into the first batch-1 steps after it (decay 0.97: ~100 steps to fade), where it priced
# a 10-token chain at +30-40 ms and the planner cut or skipped drafts.
# A bucket's own line is used once it has this many steps; before, the all-batch line.
BUCKET_MIN_STEPS = 8
# `size_costs` (default): a step is priced at its line plus the average residual of steps of
# exactly its size (an exponential average with this weight per step, trusted in
# proportion n / (n + RESIDUAL_PRIOR) after n steps). A batch-1 step's cost is not a line
# in its tokens: on 2 cores 3- to 6-token steps ran no slower than undrafted 1-token ones
# (37.1-37.3 against 38.6 ms), then 11 tokens 45.3 ms, where the line said +0.53 ms a token
# (benchmarks/results/vllm_cpu_msn_step_costs.json).
RESIDUAL_ALPHA = 0.1
RESIDUAL_PRIOR = 4.0


@dataclass
class _Line:
    """Exponentially weighted least squares of seconds against tokens."""

    decay: float = 0.97
    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    # The slope of the last fit with spread in size: while every recent step has the same
    # size (no drafts for a while), the per-token cost is still what it was.
    slope: float | None = None
    steps: int = 0
    # Step size (tokens) -> [average residual against the line, steps seen] (`cost`).
    residuals: dict[int, list[float]] = field(default_factory=dict)

    def add(self, x: float, y: float) -> None:
        coef = self.coefficients()
        if coef is not None:
            r = y - (coef[0] + coef[1] * x)
            cell = self.residuals.setdefault(round(x), [r, 0])
            cell[0] += RESIDUAL_ALPHA * (r - cell[0])
            cell[1] += 1
        self.steps += 1
        d = self.decay
        self.w = self.w * d + 1.0
        self.sx = self.sx * d + x
        self.sy = self.sy * d + y
        self.sxx = self.sxx * d + x * x
        self.sxy = self.sxy * d + x * y
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var >= 1.0:
            self.slope = max((self.sxy / self.w - mx * my) / var, 0.0)

    def coefficients(self) -> tuple[float, float] | None:
        """(intercept, slope) in seconds and seconds per token, or None without data.

        Samples all at one size give no slope: the last fitted one is kept (intercept
        through the mean), or, before any, a prior slope of PRIOR_SLOPE of the mean step
        per token. (It was cost proportional to tokens: a fresh engine at batch 1 then
        priced a 9-token chain at 9 plain steps, drafted nothing, and priced its probes
        out of the budget too, so it never saw a second size: a planner trace showed
        mt_bench's first requests undrafted for 300+ steps while the fitted slope, once
        seen, was 1.7% of a step per token.)"""
        if self.w < 1.0:
            return None
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var < 1.0 and self.slope is None:
            slope = PRIOR_SLOPE * my
            return max(my - slope * mx, 0.0), slope
        slope = self.slope if var < 1.0 else max((self.sxy / self.w - mx * my) / var, 0.0)
        return max(my - slope * mx, 0.0), slope

    def min_cost(self, x0: float) -> float | None:
        """A lower bound of `cost(x)` over every x >= `x0` (the line rises with x; a
        residual below it lowers it at most by the lowest of sizes >= x0)."""
        coef = self.coefficients()
        if coef is None:
            return None
        low = min([0.0] + [c[0] * c[1] / (c[1] + RESIDUAL_PRIOR)
                           for x, c in self.residuals.items() if x >= round(x0)])
        return max(coef[0] + coef[1] * x0 + low, 1e-9)

    def cost(self, x: float) -> float | None:
        """Seconds of a step of `x` tokens: the line, plus the residual of steps of this
        exact size, trusted in proportion to how many there were (RESIDUAL_PRIOR)."""
        coef = self.coefficients()
        if coef is None:
            return None
        c = coef[0] + coef[1] * x
        cell = self.residuals.get(round(x))
        if cell is not None:
            c += cell[0] * cell[1] / (cell[1] + RESIDUAL_PRIOR)
        return max(c, 1e-9)


@dataclass
class _Ema:
    value: float | None = None
    alpha: float = 0.1

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


@dataclass
class _Estimate:
    accepted: _Ema = field(default_factory=_Ema)
    accepted_sq: _Ema = field(default_factory=_Ema)  # for the spread
    nodes: _Ema = field(default_factory=_Ema)
    last_used: int = -(10**9)
    count: int = 0  # outcomes recorded

    def add(self, accepted: float, nodes: float) -> None:
        """One outcome (the three averages updated inline: ~20 outcomes a step at
        batch 8, shadows and chain cuts included)."""
        self.count += 1
        for ema, x in ((self.accepted, accepted), (self.accepted_sq, accepted * accepted),
                       (self.nodes, nodes)):
            v = ema.value
            ema.value = x if v is None else v + ema.alpha * (x - v)

    def spread(self) -> float:
        """Standard deviation of the accepted tokens (0 before any observation)."""
        if self.accepted.value is None:
            return 0.0
        return math.sqrt(max(self.accepted_sq.value - self.accepted.value ** 2, 0.0))


def batch_bucket(batch: int) -> int:
    """The cost-line bucket of a step of `batch` requests: 1, 2, 4, 8, 16, ... (the
    power of two at or above it)."""
    return 1 << max(batch - 1, 0).bit_length()


@functools.lru_cache(maxsize=256)
def expected_min_shift(n: int) -> float:
    """How many standard deviations the least of `n` like draws falls below their mean
    (Blom's approximation of a normal order statistic; 0 for one draw)."""
    return 0.0 if n <= 1 else -NormalDist().inv_cdf((1 - 0.375) / (n + 0.25))


@dataclass(frozen=True)
class Rung:
    name: str
    path: str  # KERNEL or TREE


class CostPlanner:
    def __init__(self, rungs: list[tuple[str, str]], cost_aware: bool = True,
                 probe_every: int = 16, tree_probe_every: int = 64, min_gain: float = MIN_GAIN,
                 closed_value: str = CLOSED_VALUE, probe_share: float = PROBE_SHARE,
                 max_nodes: dict[str, int] | None = None, prior_weight: float = PRIOR_WEIGHT,
                 cost_buckets: bool = True, size_costs: bool = True,
                 max_depth: dict[str, int] | None = None):
        """`max_nodes`: each rung's full size in draft tokens (the probe budget's cost of
        a rung not yet measured; default 16). `max_depth`: the most tokens a rung's draft
        can have accepted (its deepest path); a rung listed there is not probed where even
        that could not pay (`_could_pay`). `prior_weight`: pseudo-outcomes of the
        rung's pooled estimate in a thin (rung, feature) estimate (PRIOR_WEIGHT; 0: the
        estimates as recorded). `cost_buckets`: price a step on its batch bucket's own
        cost line (`line`; False: the all-batch line only). `size_costs`: price a plan
        at its line plus the residual of steps of its exact size (`_Line.cost`), and try
        every kernel rung for all requests alike as a plan too."""
        self.cost_buckets = cost_buckets
        self.size_costs = size_costs
        if prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {prior_weight!r}")
        self.prior_weight = prior_weight
        if not rungs:
            raise ValueError("the planner needs at least one rung")
        if not 0.0 <= probe_share <= 1.0:
            raise ValueError(f"probe_share must be in [0, 1], got {probe_share!r}")
        self.probe_share = probe_share
        self.max_nodes = dict(max_nodes or {})
        self.max_depth = dict(max_depth or {})
        self.probe_credit = 0.0  # seconds of probing the budget allows now
        self._fresh_budget = True
        self.probes = 0  # probes made (statistics)
        if closed_value not in CLOSED_VALUES:
            raise ValueError(f"closed_value must be one of {CLOSED_VALUES}, got {closed_value!r}")
        self.closed_value = closed_value
        self.cost_aware = cost_aware
        self.min_gain = min_gain
        self.rungs = [Rung(name, path) for name, path in rungs]
        self._by_name = {r.name: r for r in self.rungs}
        self.lines = {KERNEL: _Line(), TREE: _Line()}  # all batch sizes
        self.bucket_lines: dict[tuple[str, int], _Line] = {}  # (path, batch_bucket)
        self.estimates: dict[tuple[str, int], _Estimate] = {}
        self.probe_every = probe_every
        self.tree_probe_every = tree_probe_every
        self.step = 0
        self._last_tree_probe = 0
        self.history: dict[str, int] = {}  # rung -> request-steps it was chosen for
        self.closed_steps = 0  # steps planned for a closed batch (nothing waiting)
        # What the last `plan` expected its drafts to save, in seconds of plain decoding
        # (0.0: no draft; probes, which buy estimates rather than time, not counted).
        self.last_gain = 0.0
        # `_known` by (rung, feature), valid until the next `record_request`: a plan at
        # batch 8 asks it ~85 times for a handful of pairs (bench_proposer_host.py).
        self._known_memo: dict[tuple[str, int], tuple[float, float] | None] = {}
        self._options_memo: dict[tuple, list] = {}

    # -- observations --------------------------------------------------------------
    def record_step(self, path: str, num_tokens: int, seconds: float,
                    batch: int | None = None) -> None:
        """A decode step's time: `num_tokens` in all, over `batch` requests (None: not
        known; then only the all-batch line learns it)."""
        self.lines[path].add(float(num_tokens), seconds)
        if batch:
            self.bucket_lines.setdefault((path, batch_bucket(batch)), _Line()).add(
                float(num_tokens), seconds)

    def _line(self, path: str, batch: int | None) -> _Line:
        own = (self.bucket_lines.get((path, batch_bucket(batch)))
               if batch and self.cost_buckets else None)
        return own if own is not None and own.steps >= BUCKET_MIN_STEPS else self.lines[path]

    def line(self, path: str, batch: int | None = None) -> tuple[float, float] | None:
        """(intercept, slope) of `path`'s steps at `batch` requests: the batch bucket's
        own line once it has BUCKET_MIN_STEPS steps, else the all-batch line."""
        return self._line(path, batch).coefficients()

    def step_cost(self, path: str, batch: int, tokens: float) -> float | None:
        """Expected seconds of a step of `tokens` tokens over `batch` requests on `path`:
        the line (`_coefficients`), or with `size_costs` the line plus this size's
        residual (a tree step never below a kernel step of the same size)."""
        if not self.size_costs:
            coef = self._coefficients(path, batch)
            return None if coef is None else max(coef[0] + coef[1] * tokens, 1e-12)
        kernel = self._line(KERNEL, batch).cost(tokens)
        if path == KERNEL or kernel is None:
            return kernel
        tree = self._line(TREE, batch).cost(tokens)
        return None if tree is None else max(tree, kernel)

    def cost_lines(self) -> dict[str, tuple[float, float] | None]:
        """Every fitted line, for traces and stats: "kernel", "tree" (all batches) and
        "kernel@8" etc. (batch buckets)."""
        out = {p: line.coefficients() for p, line in self.lines.items()}
        for (p, b), line in sorted(self.bucket_lines.items()):
            out[f"{p}@{b}"] = line.coefficients()
        return out

    def record_request(self, rung: str, feature: int, num_nodes: int, num_accepted: int) -> None:
        self._known_memo.clear()
        accepted, nodes = float(num_accepted), float(num_nodes)
        self._estimate(rung, feature).add(accepted, nodes)
        self._estimate(rung, POOLED).add(accepted, nodes)

    def last_used(self, rung: str, feature: int) -> None:
        """Mark (rung, feature) as fresh: an outcome arrived without a draft (the
        proposer's shadow drafts), so it needs no probe now."""
        self._estimate(rung, feature).last_used = self.step

    def _estimate(self, rung: str, feature: int) -> _Estimate:
        # Not `setdefault(key, _Estimate())`: that builds an estimate on every call, and
        # this runs ~70 times a step at batch 8 (bench_proposer_host.py).
        est = self.estimates.get((rung, feature))
        if est is None:
            est = self.estimates[(rung, feature)] = _Estimate()
        return est

    # -- decisions -----------------------------------------------------------------
    def plan(self, features: list[int], batch: int | None = None,
             scales: list[float] | None = None, closed: bool = False,
             remaining: list[int] | None = None) -> list[str]:
        """A rung (or NONE) for each request in `features`, one step.

        `batch` is the number of decoding requests in the step (default: all of these);
        requests outside `features` are counted as one token each. `scales[i]` multiplies
        the accepted tokens expected of request i (its own record against the shared
        estimates: a request whose text the drafts miss more than average drafts less).
        `closed`: no request waits for a slot, so the planned requests draft all together
        or not at all (module docstring). `remaining[i]`: tokens request i may still
        produce (closed_value "laggards": only those with the most left may draft).
        """
        self.step += 1
        self._options_memo = {}  # `_dinkelbach`'s rung options, for this call only
        self.last_gain = 0.0  # set by `_best` when it drafts
        batch = len(features) if batch is None else batch
        if not features:
            return []
        scales = [1.0] * len(features) if scales is None else list(scales)
        if len(scales) != len(features):
            raise ValueError(f"{len(scales)} scales for {len(features)} requests")
        self.closed_steps += closed
        if not self.cost_aware:
            choice = [self._largest(f) for f in features]
        elif closed and self.closed_value == "laggards" and remaining is not None:
            if len(remaining) != len(features):
                raise ValueError(f"{len(remaining)} remaining counts for {len(features)} requests")
            back = max(remaining)
            lag = [i for i, r in enumerate(remaining) if r >= back]
            sub = self._best([features[i] for i in lag], batch, [scales[i] for i in lag],
                             together=True, least=True)
            choice = [NONE] * len(features)
            for i, name in zip(lag, sub):
                choice[i] = name
            self._probe(features, choice, batch)
        else:
            choice = self._best(features, batch, scales, together=closed)
            self._probe(features, choice, batch)
        for f, name in zip(features, choice):
            self.history[name] = self.history.get(name, 0) + 1
            if name != NONE:
                self._estimate(name, f).last_used = self.step
        return choice

    def _largest(self, feature: int) -> str:
        eligible = [r.name for r in self.rungs if _eligible(r, feature)]
        return eligible[-1] if eligible else NONE

    def _known(self, rung: Rung, feature: int) -> tuple[float, float] | None:
        """(expected accepted tokens, draft tokens) of `rung` at `feature`; None untried.

        A thin estimate (fewer than PRIOR_UNTIL outcomes) below the rung's pooled
        acceptance per draft token at this feature's draft size is lifted toward it, with
        `prior_weight` pseudo-outcomes; one above it is kept. Only upward: pulling thin
        estimates of good pairs down to the pool cost a closed batch of translation
        requests at batch 8 its drafts (1.04 of plain against 1.16 without the prior,
        benchmarks/results/vllm_cpu_msn_interleaved_b8-prior.json)."""
        key = (rung.name, feature)
        memo = self._known_memo
        if key in memo:
            return memo[key]
        memo[key] = known = self._known_now(key)
        return known

    def _known_now(self, key: tuple[str, int]) -> tuple[float, float] | None:
        est = self.estimates.get(key)
        if est is None or est.accepted.value is None:
            return None
        accepted, nodes = est.accepted.value, est.nodes.value
        pool = self.estimates.get((key[0], POOLED))
        if (self.prior_weight and est.count < PRIOR_UNTIL and pool is not None
                and pool.nodes.value):
            prior = pool.accepted.value / pool.nodes.value * nodes
            w = self.prior_weight
            accepted = max(accepted, (est.count * accepted + w * prior) / (est.count + w))
        return accepted, nodes

    def expected_accepted(self, rung: str, feature: int) -> float | None:
        """The shared estimate of accepted tokens for `rung` at `feature` (None: untried)."""
        rung_ = self._by_name.get(rung)
        known = self._known(rung_, feature) if rung_ is not None else None
        return None if known is None else known[0]

    def _best(self, features: list[int], batch: int, scales: list[float],
              together: bool = False, least: bool | None = None) -> list[str]:
        """The plan of best expected rate, or no drafts unless it clears the margin.
        `together`: every request drafts (its best known rung) or none does. `least`:
        value a plan by its least-advanced request (default: a closed batch under
        closed_value "least")."""
        kernel = self.line(KERNEL, batch)
        if kernel is None:
            return [NONE] * len(features)  # first steps: measure plain decoding first
        none = [NONE] * len(features)
        none_rate = self.rate(features, batch, none, scales)
        if least is None:
            least = together and self.closed_value == "least"
        # Only a plan past the margin is returned: plans that cannot reach it are not
        # built (most steps where drafting does not pay; 1/1.0001**2: the ties rule
        # below cannot make a plan under the bound matter).
        margin = none_rate * (1.0 + self.min_gain) / 1.0001 ** 2
        any_bound, tree_bound = self._rate_bounds(features, batch, scales, least, together)
        if any_bound <= margin:
            return none
        kernel_rungs = [r for r in self.rungs if r.path == KERNEL]
        candidates = [self._dinkelbach(features, scales, batch, kernel_rungs, kernel,
                                       force=together)]
        tree = self._coefficients(TREE, batch)
        if tree is not None and tree_bound > margin:
            # A tree step has at least one tree request: fix which (feature, rung) that
            # is (per feature, the request expected to accept most), and optimise the
            # others freely on the tree path's cost line.
            firsts: dict[int, int] = {}
            for i, f in enumerate(features):
                if f not in firsts or scales[i] > scales[firsts[f]]:
                    firsts[f] = i
            for f, i in firsts.items():
                rest, rest_scales = features[:i] + features[i + 1:], scales[:i] + scales[i + 1:]
                for r in self.rungs:
                    known = self._known(r, f) if r.path == TREE and _eligible(r, f) else None
                    if known is None:
                        continue
                    fixed = (known[0] * scales[i], known[1])
                    others = self._dinkelbach(rest, rest_scales, batch, self.rungs, tree,
                                              fixed=fixed, force=together)
                    candidates.append(others[:i] + [r.name] + others[i:])
        best, best_rate = none, none_rate
        if least or self.size_costs:
            # Dinkelbach maximises the sum; valued by the least request, a plan may be
            # better with every request on the same rung (e.g. all on the whole chain,
            # not one on a 2-token cut that caps the least at 2). Dinkelbach also prices
            # along the line: priced by size, a rung for everyone may be the best plan.
            candidates += [[r.name] * len(features) for r in kernel_rungs
                           if all(_eligible(r, f) and self._known(r, f) is not None
                                  for f in features)]
        for choice in candidates:
            rate = self.rate(features, batch, choice, scales, least=least)
            if rate is not None and rate > best_rate * 1.0001:
                best, best_rate = choice, rate
        # Draft only when the best plan clears the margin over not drafting at all.
        if best_rate > none_rate * (1.0 + self.min_gain):
            # Seconds of plain decoding the plan is expected to save (batch / none_rate
            # is a plain step's time).
            self.last_gain = batch / none_rate * (best_rate / none_rate - 1.0)
            return best
        return none

    def _rate_bounds(self, features: list[int], batch: int, scales: list[float],
                     least: bool, together: bool = False) -> tuple[float, float]:
        """Upper bounds of `rate` over every drafting plan, and over every plan with a
        tree rung (0.0: there is none): each request at its best known rung, on the
        cheapest a step could cost with the fewest draft tokens such a plan has (the
        smallest known rung, or tree; `together`: every request with a known rung
        drafts, each at least its smallest, except that one with no known kernel rung
        may go without in the kernel plans, so it counts for nothing)."""
        # feature -> (best accepted, fewest nodes, fewest tree nodes, a kernel rung known)
        per_feature = {}
        for f in set(features):
            known = [(k, r.path) for r in self.rungs
                     if _eligible(r, f) and (k := self._known(r, f)) is not None]
            trees = [k[1] for k, path in known if path == TREE]
            per_feature[f] = (max((k[0] for k, _ in known), default=0.0),
                              min((k[1] for k, _ in known), default=None),
                              min(trees) if trees else None,
                              any(path == KERNEL for _, path in known))
        smallest = [n for _, n, _, _ in per_feature.values() if n is not None]
        if not smallest:
            return 0.0, 0.0
        best = [per_feature[f][0] * sc for f, sc in zip(features, scales)]
        acc = batch * min(best) if least else sum(best)
        together_nodes = sum(per_feature[f][1] for f in features
                             if per_feature[f][3]) if together else 0.0

        def bound(nodes: float) -> float:
            x0 = batch + max(nodes, together_nodes)
            if self.size_costs:  # a tree step costs at least a kernel step of its size
                low = self._line(KERNEL, batch).min_cost(x0)
            else:
                coef = self._coefficients(KERNEL, batch)
                low = None if coef is None else max(coef[0] + coef[1] * x0, 1e-12)
            return 0.0 if low is None else (batch + acc) / low

        trees = [t for _, _, t, _ in per_feature.values() if t is not None]
        return bound(min(smallest)), bound(min(trees)) if trees else 0.0

    def _dinkelbach(self, features: list[int], scales: list[float], batch: int,
                    allowed: list[Rung], coef: tuple[float, float],
                    fixed: tuple[float, float] = (0.0, 0.0), force: bool = False) -> list[str]:
        """Rungs for `features` maximising (batch + accepted) / (a + b * (batch + nodes))
        on one cost line, with `fixed` (accepted, nodes) already in the step. `force`:
        no speculation only for requests with no known rung."""
        a, b = coef
        keys = list(zip(features, scales))
        options = {}
        for f, sc in set(keys):
            # One list per (allowed, request kind) and `plan` call: `_best` runs this
            # once per tree candidate, on the same requests (memo cleared by `plan`).
            memo_key = (id(allowed), f, sc, force)
            opts = self._options_memo.get(memo_key)
            if opts is None:
                known_rungs = [(r.name, known[0] * sc, known[1]) for r in allowed
                               if _eligible(r, f) and (known := self._known(r, f)) is not None]
                opts = self._options_memo[memo_key] = (
                    known_rungs if force and known_rungs else [(NONE, 0.0, 0.0)] + known_rungs)
            options[(f, sc)] = opts

        def ratio(acc: float, nodes: float) -> float:
            return (batch + fixed[0] + acc) / max(a + b * (batch + fixed[1] + nodes), 1e-12)

        lam = ratio(0.0, 0.0)
        pick = {k: opts[0] for k, opts in options.items()}
        for _ in range(16):
            new_pick = {k: max(opts, key=lambda o: o[1] - lam * b * o[2])
                        for k, opts in options.items()}
            new = ratio(sum(new_pick[k][1] for k in keys), sum(new_pick[k][2] for k in keys))
            if new <= lam * (1 + 1e-12):
                break
            pick, lam = new_pick, new
        return [pick[k][0] for k in keys]

    def rate(self, features: list[int], batch: int, choice: list[str],
             scales: list[float] | None = None, least: bool = False) -> float | None:
        """Expected tokens per second of a step that drafts `choice`. `least`: the batch
        advances by its least-advanced request in `features` (CLOSED_VALUES), expected
        at the least of their means less `expected_min_shift(n)` times their mean spread:
        acceptance is all-or-little (a retrieval chain continues the text or misses), and
        five laggards whose chains were expected to get 5.7 tokens each got 1, 10, 1, 10, 1
        (a planner trace, qa at batch 8), so the batch's back moved by one token."""
        by_name = self._by_name
        accs: list[float] = []
        spreads: list[float] = []
        nodes = 0.0
        path = KERNEL
        scales = [1.0] * len(features) if scales is None else scales
        for f, sc, name in zip(features, scales, choice):
            if name == NONE:
                accs.append(0.0)
                continue
            known = self._known(by_name[name], f)
            if known is None:
                return None
            accs.append(known[0] * sc)
            if least:
                spreads.append(self.estimates[(name, f)].spread() * sc)
            nodes += known[1]
            if by_name[name].path == TREE:
                path = TREE
        cost = self.step_cost(path, batch, batch + nodes)
        if cost is None:
            return None
        if least and accs:
            shift = expected_min_shift(len(accs)) * (sum(spreads) / len(spreads)
                                                     if spreads else 0.0)
            acc = batch * max(min(accs) - shift, 0.0)
        else:
            acc = sum(accs)
        return (batch + acc) / cost

    def _coefficients(self, path: str, batch: int | None = None) -> tuple[float, float] | None:
        """The path's cost line at `batch` requests (`line`). A tree step is never assumed
        cheaper than a kernel step of the same size (a tree line fitted at few sizes can
        extrapolate below it)."""
        kernel = self.line(KERNEL, batch)
        if path == KERNEL or kernel is None:
            return kernel
        tree = self.line(TREE, batch)
        return None if tree is None else (max(tree[0], kernel[0]), max(tree[1], kernel[1]))

    def _probe_cost(self, rung: Rung, feature: int, batch: int, uses_tree: bool) -> float:
        """Expected extra seconds of drafting `rung` on one request of this step."""
        known = self._known(rung, feature)
        nodes = known[1] if known is not None else self.max_nodes.get(rung.name, 16)
        kernel = self.line(KERNEL, batch) or (0.0, 0.0)
        if rung.path == KERNEL or uses_tree:
            line = kernel if rung.path == KERNEL else self._coefficients(TREE, batch) or kernel
            return line[1] * nodes
        tree = self._coefficients(TREE, batch)
        if tree is None:  # the tree path never measured: priced as a kernel draft
            return kernel[1] * nodes
        # The whole batch moves to the tree path.
        return (tree[0] - kernel[0]) + (tree[1] - kernel[1]) * batch + tree[1] * nodes

    def _could_pay(self, rung: Rung, feature: int, batch: int, memo: dict) -> bool:
        """Whether `rung` could beat not drafting at `batch` requests even at its best:
        every draft accepted along its deepest path (`max_depth`), drafted by one request
        or by all of them (on the cost line the rate is a ratio of two linear functions
        of that count, so one of the two ends is its maximum; the residuals of
        `size_costs` are priced at those two sizes only), at its usual size (the
        estimate's draft tokens, else its full size), priced on the measured cost lines
        with the planner's margin.
        A probe of a rung that could not pay teaches nothing the planner would act on,
        and costs a step: at batch 8 on 2 cores a tree step, which moves the whole batch
        to the tree path, took 190 ms against 65 ms for a plain one
        (vllm_cpu_msn_interleaved_b8-host1201.json). True where that is not known yet
        (no cost line, or no depth for the rung)."""
        depth = self.max_depth.get(rung.name)
        if depth is None:
            return True
        known = self._known(rung, feature)
        nodes = known[1] if known is not None else float(self.max_nodes.get(rung.name, 16))
        key = (rung.name, round(nodes, 3))
        if key in memo:
            return memo[key]
        none = self.step_cost(KERNEL, batch, batch)
        accepted = min(float(depth), nodes)
        ok = none is None
        for k in () if ok else (1, batch):
            cost = self.step_cost(rung.path, batch, batch + k * nodes)
            if cost is None or (batch + k * accepted) / cost > batch / none * (1 + self.min_gain):
                ok = True
                break
        memo[key] = ok
        return ok

    def _probe(self, features: list[int], choice: list[str], batch: int | None = None) -> None:
        """Now and then, try the stalest (rung, feature) of this batch on one request.

        Chain pairs never tried are probed every few steps, so a fresh planner learns
        fast. Every probe is also paid from the budget (module docstring)."""
        batch = len(features) if batch is None else batch
        kernel = self.line(KERNEL, batch)
        if kernel is not None:
            step = kernel[0] + kernel[1] * batch
            cap = self.probe_share * step * PROBE_CREDIT_STEPS
            # A fresh planner starts with a full budget: it has the most to learn.
            self.probe_credit = cap if self._fresh_budget else min(
                self.probe_credit + self.probe_share * step, cap)
            self._fresh_budget = False
        if self.step % FAST_PROBE_EVERY and self.step % self.probe_every:
            return  # no cadence is due (skips the scan for untried pairs below)
        # A tree probe moves the whole batch to the (slower) tree path: even untried
        # tree rungs wait for the slow cadence.
        tree_ok = self.step - self._last_tree_probe >= self.tree_probe_every
        uses_tree = any(r.path == TREE and r.name in choice for r in self.rungs)
        memo: dict = {}  # `_could_pay` by (rung, size), for this call
        untried = any(self._known(r, f) is None and self._could_pay(r, f, batch, memo)
                      for f in set(features) for r in self.rungs
                      if _eligible(r, f) and (r.path == KERNEL or tree_ok or uses_tree))
        if self.step % (FAST_PROBE_EVERY if untried else self.probe_every):
            return
        stalest = None
        for i, f in enumerate(features):
            for r in self.rungs:
                if not _eligible(r, f) or (r.path == TREE and not (tree_ok or uses_tree)):
                    continue
                age = self.step - self._estimate(r.name, f).last_used
                if (stalest is None or age > stalest[0]) and self._could_pay(r, f, batch, memo):
                    stalest = (age, i, r)
        if stalest is None or stalest[0] < FAST_PROBE_EVERY:
            return
        _, i, rung = stalest
        cost = self._probe_cost(rung, features[i], batch, uses_tree)
        if cost > self.probe_credit:
            return
        self.probe_credit -= cost
        self.probes += 1
        choice[i] = rung.name
        if rung.path == TREE and not uses_tree:
            self._last_tree_probe = self.step


def _eligible(rung: Rung, feature: int) -> bool:
    return rung.path == KERNEL or feature < SAMPLED
