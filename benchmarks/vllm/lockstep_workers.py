"""Workers for `bench_lockstep.py`: vLLM's shared-memory readers sleep while they wait.

vLLM 0.32's message-queue readers (`shm_broadcast.SpinCondition`) keep polling with
`sched_yield` for 1 s after each read before they sleep on a socket. One engine at a
time that costs little; in lockstep, while one engine steps, every other engine's worker
(waiting for its next step) and engine core (waiting for its worker) spin on the same
2 cores. A first lockstep run (MSN model, batch 8) had a quarter to half of the plain
engines' steps at 0.8-1.1 s against a median of ~0.15 s, and plain vLLM at 28 tok/s;
with the readers asleep it ran at 56 tok/s, every engine within 3% of the others.
Imported in a process, this module makes every reader there sleep on its socket until
the writer's notification (which vLLM sends on every write), for every engine alike: the
main process (in-process engine cores) imports it before building engines, and each
worker process imports it through its `worker_cls`.

A reader asleep can miss a notification; vLLM then looks at the buffer again after
SHM_READER_RECHECK_INTERVAL_MS (5 s). A second run (`--off-first`,
vllm_cpu_msn_lockstep_b8-offfirst.json) had 1-11 steps a batch of ~5.1 s in both plain
engines, none in the plugin's. So a sleeping reader here wakes after at most WAKE_MS to
look again: a missed notification costs at most that, and a few idle readers waking 100
times a second cost little.
"""

from __future__ import annotations

from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
from vllm.v1.worker.cpu_worker import CPUWorker

from proposers.vllm.runner import TRJacobiWorker

PLAIN_WORKER = "benchmarks.vllm.lockstep_workers.QuietCPUWorker"
PLUGIN_WORKER = "benchmarks.vllm.lockstep_workers.QuietTRJacobiWorker"
WAKE_MS = 10

_busy_wait = SpinCondition.wait


def _sleeping_wait(self, timeout_ms=None):
    """`SpinCondition.wait` with no busy phase: a reader waits on its socket at once, for
    at most WAKE_MS (its caller then looks at the buffer and waits again)."""
    if self.is_reader:
        self.busy_loop_s = 0
        timeout_ms = WAKE_MS if timeout_ms is None else min(timeout_ms, WAKE_MS)
    return _busy_wait(self, timeout_ms)


SpinCondition.wait = _sleeping_wait


class QuietCPUWorker(CPUWorker):
    """vLLM-CPU's worker, in a process whose readers sleep while waiting."""


class QuietTRJacobiWorker(TRJacobiWorker):
    """The plugin's worker, in a process whose readers sleep while waiting."""
