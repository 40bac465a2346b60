"""vLLM's scheduler, telling the workers whether any request waits for a slot.

The cost-aware planner (planner.py) plans for the step's throughput while requests wait
(a request that finishes early hands its slot on); when none does, the batch ends with
its last request, and the batch drafts all together or not at all. Only the engine core
knows its waiting queue, so this subclass of vLLM's V1
`Scheduler` (vLLM 0.32's `scheduler_cls` hook; a `custom_class` drafter runs without
async scheduling, so the synchronous scheduler is the one vLLM would use) adds the count
to each `SchedulerOutput` it hands to the workers (`WAITING_ATTR`; the multiprocess
executor pickles the object, extra attribute included). The runner reads it with
`waiting_requests`, which says so when it is missing.
"""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

WAITING_ATTR = "trjacobi_num_waiting"


class TRJacobiScheduler(Scheduler):
    def schedule(self, *args, **kwargs):
        output = super().schedule(*args, **kwargs)
        setattr(output, WAITING_ATTR, self.get_request_counts()[1])
        return output


def waiting_requests(scheduler_output) -> int | None:
    """Requests waiting for a slot when `scheduler_output` was made; None when the
    engine's scheduler is not `TRJacobiScheduler` (a user's own `scheduler_cls`)."""
    return getattr(scheduler_output, WAITING_ATTR, None)
