"""Cost-aware tree sizing: how much to speculate in the next step, or not at all.

On a 2-core CPU a verify step of 1+N tokens costs far more than a 1-token step
(architecture.md: vLLM's own n-gram speculation runs at 0.75-0.83x), so a fixed tree
loses wherever drafts are rarely accepted. Each step we pick the rung of a ladder
(no speculation, then the configured templates, smallest first) with the best expected
throughput:

    rate(rung) = B * (1 + accepted(rung)) / cost(path(rung), B * (1 + nodes(rung)))

`accepted` and `nodes` are exponential averages per rung of what the runner observed
(accepted drafts and drafted nodes per request-step); `cost` is a line a + b*T fitted
to measured step times per attention path ("kernel": the stock CPU kernel, which
chain and plain steps use; "tree": the PyTorch tree path). Rungs never tried have no
estimate; the planner probes the rung above the current one now and then (more often
while it is speculating, since that is where a bigger tree may pay), so the estimates
follow the workload at a small probing cost.
"""

from __future__ import annotations

from dataclasses import dataclass

NONE = "none"


@dataclass
class _Line:
    """Exponentially weighted least squares of seconds against tokens."""

    decay: float = 0.97
    w: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.w = self.w * d + 1.0
        self.sx = self.sx * d + x
        self.sy = self.sy * d + y
        self.sxx = self.sxx * d + x * x
        self.sxy = self.sxy * d + x * y

    def predict(self, x: float) -> float | None:
        if self.w < 1.0:
            return None
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var < 1.0:  # all samples at one size: assume cost proportional to tokens
            return my * max(x, 1.0) / max(mx, 1.0)
        slope = max((self.sxy / self.w - mx * my) / var, 0.0)
        return max(my + slope * (x - mx), 1e-6)


@dataclass
class _Ema:
    value: float | None = None
    alpha: float = 0.1

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)


@dataclass
class Rung:
    name: str
    path: str  # "kernel" or "tree"
    accepted: _Ema
    nodes: _Ema
    last_used: int = -(10**9)


class CostPlanner:
    def __init__(self, rungs: list[tuple[str, str]], cost_aware: bool = True,
                 probe_every: int = 24, idle_probe_every: int = 64):
        self.cost_aware = cost_aware
        self.rungs = [Rung(name, path, _Ema(), _Ema()) for name, path in rungs]
        self.lines = {"kernel": _Line(), "tree": _Line()}
        self.probe_every = probe_every
        self.idle_probe_every = idle_probe_every
        self.step = 0
        self.current = NONE if cost_aware else self.rungs[-1].name
        self.history: dict[str, int] = {}  # rung -> steps chosen (reported by benchmarks)

    def record_step(self, path: str, num_tokens: int, seconds: float) -> None:
        self.lines[path].add(float(num_tokens), seconds)

    def record_request(self, rung: str, num_nodes: int, num_accepted: int) -> None:
        for r in self.rungs:
            if r.name == rung:
                r.accepted.add(float(num_accepted))
                r.nodes.add(float(num_nodes))

    def cost(self, path: str, num_tokens: float) -> float | None:
        kernel = self.lines["kernel"].predict(num_tokens)
        if path == "kernel" or kernel is None:
            return kernel
        return self.lines["tree"].predict(num_tokens)

    def rate(self, rung: Rung, batch: int) -> float | None:
        if rung.accepted.value is None:
            return None
        cost = self.cost(rung.path, batch * (1.0 + rung.nodes.value))
        return None if cost is None else batch * (1.0 + rung.accepted.value) / cost

    def choose(self, batch: int) -> str:
        """The rung for the next step of `batch` decoding requests."""
        self.step += 1
        if batch == 0:
            return NONE
        if not self.cost_aware:
            choice = self.rungs[-1].name
        else:
            choice = self._best(batch)
            probe = self._probe(choice)
            if probe is not None:
                choice = probe
        for r in self.rungs:
            if r.name == choice:
                r.last_used = self.step
        self.current = choice
        self.history[choice] = self.history.get(choice, 0) + 1
        return choice

    def _best(self, batch: int) -> str:
        plain = self.cost("kernel", batch)
        best, best_rate = NONE, (batch / plain if plain else None)
        if best_rate is None:
            return NONE
        for r in self.rungs:
            rate = self.rate(r, batch)
            if rate is not None and rate > best_rate:
                best, best_rate = r.name, rate
        return best

    def _probe(self, choice: str) -> str | None:
        names = [NONE] + [r.name for r in self.rungs]
        above = names.index(choice) + 1
        if above >= len(names):
            return None
        every = self.idle_probe_every if choice == NONE else self.probe_every
        rung = self.rungs[above - 1]
        if self.step - rung.last_used >= every:
            return rung.name
        return None
