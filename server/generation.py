"""From a validated OpenAI request to engine steps and back: the service behind the routes.

Order of checks for a generation request: engine ready, not draining, known model, known
method, prompt fits the context (400 with the numbers), then admission (429 when full).
Only then does the response start, so every refusal is a real HTTP status. The deadline
(`request_timeout_s`) covers the queue wait and the generation.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.admission import Admission, Ticket
from server.engines.base import Engine, EngineDeadError, EngineError, EngineStep, SamplingSpec
from server.errors import APIError, ClientGone
from server.metrics import Metrics
from server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DecodingInfo,
    Usage,
)
from server.settings import ServerSettings

log = logging.getLogger("msn.server")


@dataclass(slots=True)
class Job:
    """One admitted generation and everything it reports back."""

    request_id: str
    kind: str  # "completion" | "chat"
    model: str
    prompt_ids: list[int]
    sampling: SamplingSpec
    ticket: Ticket
    arrival: float
    deadline: float
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    num_tokens: int = 0
    num_steps: int = 0
    num_eos: int = 0  # 1 once a step generated the end-of-sequence token (EngineStep.eos)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    finish_reason: str | None = None

    def usage(self) -> Usage:
        prompt = len(self.prompt_ids)
        return Usage(prompt_tokens=prompt, completion_tokens=self.num_tokens,
                     total_tokens=prompt + self.num_tokens)

    def decoding(self) -> DecodingInfo:
        generated = self.num_tokens + self.num_eos
        mat = generated / self.num_steps if self.num_steps else None
        return DecodingInfo(method=self.sampling.method, num_steps=self.num_steps,
                            mat=round(mat, 4) if mat is not None else None,
                            num_draft_tokens=self.num_draft_tokens,
                            num_accepted_tokens=self.num_accepted_tokens)


class GenerationService:
    def __init__(self, engine: Engine, admission: Admission, metrics: Metrics,
                 settings: ServerSettings, served_model_name: str,
                 is_draining: Callable[[], bool]):
        self.engine = engine
        self.admission = admission
        self.metrics = metrics
        self.settings = settings
        self.served_model_name = served_model_name
        self._is_draining = is_draining
        self.engine_created = int(time.time())

    # ----- admission -----

    def _check_serving(self) -> None:
        if self._is_draining():
            self.metrics.requests_rejected.labels(reason="draining").inc()
            raise APIError(503, "server is shutting down", code="draining",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        if not self.engine.ready:
            self.metrics.requests_rejected.labels(reason="not_ready").inc()
            reason = self.engine.dead_reason
            if reason:
                raise APIError(503, f"engine failed and cannot serve: {reason}",
                               code="engine_dead")
            raise APIError(503, "model is still loading; retry when GET /ready is 200",
                           code="model_loading",
                           headers={"Retry-After": str(self.settings.retry_after_s)})

    def _check_model(self, model: str) -> None:
        if model != self.served_model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves "
                           f"'{self.served_model_name}'", param="model",
                           code="model_not_found")

    def _method(self, requested: str | None) -> str:
        method = requested or self.settings.default_method or self.engine.default_method
        if method not in self.engine.methods:
            raise APIError(400, f"method '{method}' is not available on the "
                           f"{self.engine.name} engine; choose one of "
                           f"{', '.join(self.engine.methods)}", param="method",
                           code="unsupported_method")
        return method

    def _max_tokens(self, requested: int | None, num_prompt: int, prompt_param: str) -> int:
        limit = self.engine.max_context
        if num_prompt == 0:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        if requested is None:
            if num_prompt >= limit:
                raise APIError(
                    400, f"This model's maximum context length is {limit} tokens. However, "
                    f"your prompt has {num_prompt} tokens, leaving no room for completion "
                    "tokens.", param=prompt_param, code="context_length_exceeded")
            return limit - num_prompt
        if num_prompt + requested > limit:
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you "
                f"requested {num_prompt + requested} tokens ({num_prompt} in the prompt, "
                f"{requested} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens", code="context_length_exceeded")
        return requested

    def prepare_completion(self, body: CompletionRequest) -> Job:
        self._check_serving()
        self._check_model(body.model)
        method = self._method(body.method)
        prompt = body.single_prompt()
        prompt_ids = self.engine.encode_prompt(prompt) if isinstance(prompt, str) \
            else list(prompt)
        return self._admit("completion", body, method, prompt_ids, body.max_tokens, "prompt")

    def prepare_chat(self, body: ChatCompletionRequest) -> Job:
        self._check_serving()
        self._check_model(body.model)
        method = self._method(body.method)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt_ids = self.engine.encode_chat(messages)
        return self._admit("chat", body, method, prompt_ids, body.max_new_tokens(),
                           "messages")

    def _admit(self, kind: str, body: CompletionRequest | ChatCompletionRequest, method: str,
               prompt_ids: list[int], max_tokens: int | None, prompt_param: str) -> Job:
        max_new = self._max_tokens(max_tokens, len(prompt_ids), prompt_param)
        sampling = SamplingSpec(max_tokens=max_new, temperature=body.temperature,
                                top_p=body.top_p, seed=body.seed, stop=body.stop_list(),
                                method=method)
        ticket = self.admission.admit()
        arrival = time.monotonic()
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        job = Job(request_id=f"{prefix}-{uuid.uuid4().hex}", kind=kind,
                  model=self.served_model_name, prompt_ids=prompt_ids, sampling=sampling,
                  ticket=ticket, arrival=arrival,
                  deadline=arrival + self.settings.request_timeout_s)
        if self.settings.log_prompts:
            log.info("request %s prompt=%r", job.request_id, body.model_dump(
                include={"prompt", "messages"}))
        return job

    # ----- running -----

    async def steps(self, job: Job) -> AsyncIterator[EngineStep]:
        """Run one admitted job, yielding the steps that carry tokens. Records metrics and
        releases the admission ticket on every exit path (done, error, timeout, cancel)."""
        m = self.metrics
        outcome = "error"
        first_token_at: float | None = None
        last_step_at = 0.0
        stream = None
        try:
            try:
                async with asyncio.timeout_at(self._loop_deadline(job)):
                    await job.ticket.acquire_slot()
            except TimeoutError:
                outcome = "timeout"
                raise
            m.queue_time.observe(time.monotonic() - job.arrival)
            m.prompt_tokens.inc(len(job.prompt_ids))
            m.request_prompt_tokens.observe(len(job.prompt_ids))
            stream = self.engine.generate(job.request_id, job.prompt_ids, job.sampling)
            while True:
                try:
                    async with asyncio.timeout_at(self._loop_deadline(job)):
                        step = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    outcome = "timeout"
                    raise
                now = time.monotonic()
                n = len(step.token_ids)
                job.num_steps += step.steps
                job.num_tokens += n
                job.num_eos += step.eos
                job.num_draft_tokens += step.num_drafted
                job.num_accepted_tokens += step.accepted_depth
                if self.engine.reports_step_metrics:
                    m.observe_step(job.sampling.method, n, step.num_drafted,
                                   step.accepted_depth, step.draft_depth)
                if n:
                    m.generation_tokens.inc(n)
                    if first_token_at is None:
                        first_token_at = now
                        m.time_to_first_token.observe(now - job.arrival)
                    else:
                        m.inter_token_latency.observe(now - last_step_at)
                    last_step_at = now
                if step.finish_reason is not None:
                    job.finish_reason = step.finish_reason
                if n or step.text or step.finish_reason is not None:
                    job.text.append(step.text)
                    yield step
                if step.finish_reason is not None:
                    break
            if job.finish_reason is None:
                raise EngineError("engine stream ended without a finish reason")
            outcome = job.finish_reason
            end = time.monotonic()
            m.e2e_latency.observe(end - job.arrival)
            m.request_generation_tokens.observe(job.num_tokens)
            if first_token_at is not None and job.num_tokens > 1:
                m.time_per_output_token.observe(
                    (end - first_token_at) / (job.num_tokens - 1))
        except (asyncio.CancelledError, GeneratorExit, ClientGone):
            outcome = "client_disconnect"
            raise
        finally:
            if stream is not None:
                # Synchronous close path: engines free their work in the generator's
                # finally; scheduling aclose keeps this safe inside a cancelled task.
                _close_soon(stream)
            job.ticket.release()
            m.requests_finished.labels(finish_reason=outcome).inc()
            log.info("%s %s method=%s prompt_tokens=%d completion_tokens=%d steps=%d "
                     "finish=%s %.3fs", job.request_id, job.kind, job.sampling.method,
                     len(job.prompt_ids), job.num_tokens, job.num_steps, outcome,
                     time.monotonic() - job.arrival)

    @staticmethod
    def _loop_deadline(job: Job) -> float:
        # Job.deadline is on time.monotonic(); asyncio's clock is the loop's time().
        loop = asyncio.get_running_loop()
        return loop.time() + (job.deadline - time.monotonic())

    async def run_to_end(self, job: Job) -> Job:
        steps = self.steps(job)
        try:
            async for _ in steps:
                pass
        finally:
            await steps.aclose()
        return job


def _close_soon(stream: AsyncIterator[EngineStep]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return
    task = loop.create_task(aclose())
    task.add_done_callback(_log_close_failure)


def _log_close_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("closing an engine stream failed: %r", task.exception())


def engine_error_to_api(exc: EngineError) -> APIError:
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"engine failed and cannot serve: {exc}", code="engine_dead")
    return APIError(500, f"generation failed: {exc}", code="engine_error")


def timeout_error(settings: ServerSettings) -> APIError:
    return APIError(504, f"request exceeded the server's timeout of "
                    f"{settings.request_timeout_s:g} s", code="timeout")
