"""HTTP routes: parse (pydantic), call the generation service, shape the response."""

from __future__ import annotations

import asyncio
from contextlib import suppress
from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.auth import require_api_key
from server.engines.base import EngineError
from server.errors import APIError, ClientGone
from server.generation import (
    GenerationService,
    Job,
    engine_error_to_api,
    timeout_error,
)
from server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
)
from server.streaming import EventStreamResponse, stream_events

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500,
                                                           503, 504)}

openai_router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)],
                          responses=_ERRORS)
ops_router = APIRouter()


def get_service(request: Request) -> GenerationService:
    return request.app.state.service


ServiceDep = Annotated[GenerationService, Depends(get_service)]


@openai_router.get("/models", response_model=ModelList)
async def list_models(service: ServiceDep) -> ModelList:
    return ModelList(data=[ModelCard(id=service.served_model_name,
                                     created=service.engine_created,
                                     max_model_len=service.engine.max_context)])


@openai_router.post("/completions", response_model=CompletionResponse,
                    responses={200: {"content": {"text/event-stream": {}}}})
async def create_completion(body: CompletionRequest, request: Request,
                            service: ServiceDep) -> Response:
    job = service.prepare_completion(body)
    if body.stream:
        return EventStreamResponse(stream_events(service, job, body.include_usage()))
    await _run_unless_disconnected(service, job, request)
    return JSONResponse(CompletionResponse(
        id=job.request_id, created=job.created, model=job.model,
        choices=[CompletionChoice(index=0, text="".join(job.text),
                                  finish_reason=job.finish_reason)],
        usage=job.usage(), decoding=job.decoding(),
    ).model_dump())


@openai_router.post("/chat/completions", response_model=ChatCompletionResponse,
                    responses={200: {"content": {"text/event-stream": {}}}})
async def create_chat_completion(body: ChatCompletionRequest, request: Request,
                                 service: ServiceDep
                                 ) -> Response:
    job = service.prepare_chat(body)
    if body.stream:
        return EventStreamResponse(stream_events(service, job, body.include_usage()))
    await _run_unless_disconnected(service, job, request)
    return JSONResponse(ChatCompletionResponse(
        id=job.request_id, created=job.created, model=job.model,
        choices=[ChatChoice(index=0, message=AssistantMessage(content="".join(job.text)),
                            finish_reason=job.finish_reason)],
        usage=job.usage(), decoding=job.decoding(),
    ).model_dump())


async def _run_unless_disconnected(service: GenerationService, job: Job,
                                   request: Request) -> None:
    """Runs the job while watching the connection: a client that hangs up cancels its
    generation (Starlette does this for streams, not for plain responses)."""
    work = asyncio.ensure_future(service.run_to_end(job))
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            with suppress(asyncio.CancelledError):
                await work
            raise ClientGone()
        try:
            work.result()
        except TimeoutError:
            raise timeout_error(service.settings) from None
        except EngineError as exc:
            raise engine_error_to_api(exc) from None
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
        job.ticket.release()


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


@ops_router.get("/health", response_model=HealthResponse,
                responses={503: {"model": ErrorResponse}})
async def health(service: ServiceDep) -> Response:
    """Liveness: 200 while the process can make progress (also while the model loads);
    503 once the engine has failed for good, so an orchestrator restarts the process."""
    reason = service.engine.dead_reason
    if reason:
        raise APIError(503, f"engine failed: {reason}", code="engine_dead")
    return JSONResponse(HealthResponse(status="ok").model_dump())


@ops_router.get("/ready", response_model=HealthResponse,
                responses={503: {"model": ErrorResponse}})
async def ready(request: Request,
                service: ServiceDep) -> Response:
    """Readiness: 200 only when the model is loaded and the server is not draining."""
    if request.app.state.draining:
        raise APIError(503, "server is shutting down", code="draining")
    if not service.engine.ready:
        reason = service.engine.dead_reason
        raise APIError(503, f"engine failed: {reason}" if reason else "model is loading",
                       code="engine_dead" if reason else "model_loading")
    return JSONResponse(HealthResponse(status="ready", detail={
        "engine": service.engine.name, "model": service.served_model_name,
        "max_context": service.engine.max_context,
        "methods": list(service.engine.methods)}).model_dump())


@ops_router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    await request.app.state.service.engine.refresh_metrics()
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
