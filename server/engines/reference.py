"""The reference runner (batch 1, transformers) as a server engine.

One worker thread runs one generation at a time (the admission queue feeds it; its width is
1). Steps travel to the event loop through `call_soon_threadsafe`; cancellation is a flag
the worker checks between steps, after which it closes the runner's generator, so a
cancelled request stops within one decoding step. Any exception from the runner leaves its
KV cache in an unknown state, so it marks the engine dead (/ready false, 503) rather than
serving from a possibly corrupt runner; a ValueError (a request the runner refuses) fails
only that request.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from server.engines.base import (
    Engine,
    EngineDeadError,
    EngineError,
    EngineStep,
    SamplingSpec,
)

METHODS = ("ar", "jacobi", "tr-jacobi", "pld")
_END = object()


class ReferenceEngine(Engine):
    name = "reference"
    methods = METHODS
    default_max_running = 1
    reports_step_metrics = True

    def __init__(self, model_path: str | Path, *, device: str = "cpu",
                 dtype: str = "float32", default_method: str = "tr-jacobi",
                 template: str | None = None, attention: str = "sdpa",
                 compile_steps: bool = False):
        self.model_path = Path(model_path)
        self.attention = attention
        self.compile_steps = compile_steps
        self.model_name = self.model_path.name
        self.device = device
        self.dtype = dtype
        self.default_method = default_method
        self.template = template
        self.max_context = 0
        self._runner: Any = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="msn-reference")
        self._active = 0  # generations the worker has not finished (tests read it)
        self._active_lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._runner is not None and self.dead_reason is None

    @property
    def active_generations(self) -> int:
        with self._active_lock:
            return self._active

    async def start(self) -> None:
        from proposers.reference.runner import ReferenceRunner

        loop = asyncio.get_running_loop()
        def load():
            runner = ReferenceRunner.load(self.model_path, device=self.device, dtype=self.dtype,
                                          attn_backend=self.attention,
                                          compile_steps=self.compile_steps)
            if self.compile_steps:  # compile before /ready, not on the first requests
                runner.warm_up()
            return runner

        runner = await loop.run_in_executor(self._executor, load)
        self.max_context = int(runner.max_context)
        self._runner = runner

    async def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._runner = None

    # The runner's own encoders, so the server tokenizes exactly like `msn generate`.
    def encode_prompt(self, prompt: str) -> list[int]:
        return list(self._runner.encode(prompt))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return list(self._runner.encode_chat(messages))

    def _config(self, sampling: SamplingSpec) -> Any:
        from proposers.reference.runner import GenerationConfig

        return GenerationConfig(method=sampling.method, max_new_tokens=sampling.max_tokens,
                                stop=list(sampling.stop), temperature=sampling.temperature,
                                top_p=sampling.top_p, seed=sampling.seed,
                                template=self.template)

    async def generate(self, request_id: str, prompt_ids: list[int],
                       sampling: SamplingSpec) -> AsyncIterator[EngineStep]:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        runner = self._runner
        config = self._config(sampling)

        def put(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def work() -> None:
            if cancelled.is_set():
                return
            with self._active_lock:
                self._active += 1
            stream = None
            try:
                stream = runner.stream(list(prompt_ids), config)
                for step in stream:
                    if cancelled.is_set():
                        break
                    put(_to_engine_step(step))
                put(_END)
            except BaseException as exc:  # noqa: BLE001 - forwarded to the request
                put(exc)
            finally:
                if stream is not None:
                    stream.close()
                with self._active_lock:
                    self._active -= 1

        self._executor.submit(work)
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, ValueError):
                    raise EngineError(str(item)) from item  # the request, not the runner
                if isinstance(item, BaseException):
                    reason = f"reference runner failed: {type(item).__name__}: {item}"
                    self.mark_dead(reason)
                    raise EngineDeadError(reason) from item
                yield item
        finally:
            cancelled.set()


def _to_engine_step(step: Any) -> EngineStep:
    return EngineStep(
        token_ids=list(step.token_ids),
        text=step.text,
        num_drafted=int(step.num_drafted),
        accepted_depth=int(step.accepted_depth),
        draft_depth=int(step.draft_depth),
        finish_reason=step.finish_reason,
        eos=bool(step.eos),
    )
