"""vLLM's multiprocess executor, with each step's drafts carried on its output.

Without async scheduling (vLLM-CPU forces it off, and a `custom_class` drafter disables
it everywhere) vLLM 0.32's engine core asks the workers for the next drafts with one more
RPC after every step (`EngineCore.post_step` -> `take_draft_token_ids`). With the
multiprocess executor (the only one vLLM-CPU runs) that is one more round trip through
shared memory per step, paid even when the planner drafts nothing.

Here the worker attaches the drafts it just proposed to the `ModelRunnerOutput` of
`sample_tokens` (`DRAFTS_ATTR`; the executor pickles the object, extra attribute
included), and this executor hands them to the engine core when it asks, without the
round trip. A step whose output carries no drafts (the worker returned its output from
`execute_model`, or the worker is not ours) falls back to vLLM's RPC, so nothing is lost.
"""

from __future__ import annotations

import copy

from vllm.v1.executor.multiproc_executor import MultiprocExecutor

DRAFTS_ATTR = "trjacobi_draft_token_ids"
_NONE = object()  # no drafts carried this step (as opposed to "drafts: None")


def attach_drafts(output, drafts):
    """`output` (a ModelRunnerOutput) with `drafts` attached; a shallow copy, since the
    runner may return shared singletons (vLLM's EMPTY_MODEL_RUNNER_OUTPUT)."""
    output = copy.copy(output)
    setattr(output, DRAFTS_ATTR, drafts)
    return output


class TRJacobiExecutor(MultiprocExecutor):
    """`MultiprocExecutor` that serves `take_draft_token_ids` from the last step's output."""

    def _init_executor(self) -> None:
        self._carried = _NONE
        super()._init_executor()

    def execute_model(self, scheduler_output, non_block: bool = False):
        self._carried = _NONE  # a new step: what was carried belongs to the last one
        return super().execute_model(scheduler_output, non_block=non_block)

    def sample_tokens(self, grammar_output, non_block: bool = False):
        output = super().sample_tokens(grammar_output, non_block=non_block)
        if not non_block:  # the engine core's synchronous step (the only one used here)
            self._carried = getattr(output, DRAFTS_ATTR, _NONE)
        return output

    def take_draft_token_ids(self):
        carried, self._carried = self._carried, _NONE
        if carried is _NONE:
            return super().take_draft_token_ids()
        return carried
