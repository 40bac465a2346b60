"""Server-sent events in the OpenAI shape: one `data: {json}` per delta, a final chunk with
`finish_reason`, an optional usage chunk, then `data: [DONE]`. Errors after the stream
started become an `{"error": ...}` event (the OpenAI clients raise it) before `[DONE]`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Send

from server.engines.base import EngineError
from server.errors import APIError
from server.generation import GenerationService, Job, engine_error_to_api, timeout_error
from server.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
)

DONE = b"data: [DONE]\n\n"


def sse(payload: BaseModel | dict) -> bytes:
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json(exclude_none=False)
    else:
        text = json.dumps(payload)
    return f"data: {text}\n\n".encode()


class EventStreamResponse(StreamingResponse):
    """Closes its body iterator on every exit, so a disconnect runs the generator's
    cleanup at once instead of whenever the garbage collector finalizes it."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]):
        super().__init__(content, headers={"Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})

    async def stream_response(self, send: Send) -> None:
        async with aclosing(self.body_iterator):
            await super().stream_response(send)


def _completion_chunk(job: Job, text: str, finish_reason: str | None) -> CompletionResponse:
    return CompletionResponse(
        id=job.request_id, created=job.created, model=job.model,
        choices=[CompletionChoice(index=0, text=text, finish_reason=finish_reason)])


def _chat_chunk(job: Job, delta: ChatDelta, finish_reason: str | None) -> ChatCompletionChunk:
    return ChatCompletionChunk(
        id=job.request_id, created=job.created, model=job.model,
        choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason)])


async def stream_events(service: GenerationService, job: Job,
                        include_usage: bool) -> AsyncIterator[bytes]:
    chat = job.kind == "chat"
    try:
        if chat:
            yield sse(_chat_chunk(job, ChatDelta(role="assistant", content=""), None))
        async with aclosing(service.steps(job)) as steps:
            async for step in steps:
                if step.text:
                    if chat:
                        yield sse(_chat_chunk(job, ChatDelta(content=step.text), None))
                    else:
                        yield sse(_completion_chunk(job, step.text, None))
        if chat:
            yield sse(_chat_chunk(job, ChatDelta(), job.finish_reason))
        else:
            yield sse(_completion_chunk(job, "", job.finish_reason))
        if include_usage:
            if chat:
                usage_chunk = ChatCompletionChunk(id=job.request_id, created=job.created,
                                                  model=job.model, choices=[])
            else:
                usage_chunk = CompletionResponse(id=job.request_id, created=job.created,
                                                 model=job.model, choices=[])
            usage_chunk.usage = job.usage()
            usage_chunk.decoding = job.decoding()
            yield sse(usage_chunk)
    except TimeoutError:
        yield sse(timeout_error(service.settings).body())
    except EngineError as exc:
        yield sse(engine_error_to_api(exc).body())
    except APIError as exc:
        yield sse(exc.body())
    finally:
        job.ticket.release()  # idempotent; covers a stream closed before it started
    yield DONE
