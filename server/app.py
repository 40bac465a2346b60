"""`create_app(settings, engine)`: the FastAPI application, wired but not started.

The engine loads in the background after startup, so `/health` answers at once and
`/ready` turns 200 when the model can serve. Shutdown: the server stops accepting
connections, in-flight requests drain (uvicorn waits up to `graceful_shutdown_s`), then the
engine is shut down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from msn.errors import UsageError
from server.admission import Admission
from server.auth import KeyChecker
from server.engines.base import Engine
from server.errors import install_error_handlers
from server.generation import GenerationService
from server.metrics import Metrics
from server.middleware import BodySizeLimit, RequestMetrics
from server.routes import openai_router, ops_router
from server.settings import ServerSettings

log = logging.getLogger("msn.server")


def served_name(settings: ServerSettings, engine: Engine) -> str:
    return settings.served_model_name or engine.model_name


def create_app(settings: ServerSettings, engine: Engine) -> FastAPI:
    try:
        keys = settings.load_api_keys()
    except OSError as exc:
        raise UsageError(f"cannot read API key file {settings.api_key_file}: {exc}") from None
    metrics = Metrics()
    engine.attach_metrics(metrics)
    admission = Admission(settings.max_running or engine.default_max_running,
                          settings.max_queue, settings.retry_after_s, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(_start_engine(engine), name="msn-engine-start")
        app.state.engine_loading = loading
        try:
            yield
        finally:
            app.state.draining = True
            if not loading.done():
                loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await engine.shutdown()
            log.info("engine shut down")

    app = FastAPI(
        title="msn-serve",
        summary="OpenAI-compatible server for MSN models with TR-Jacobi speculative decoding",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.keys = KeyChecker(keys)
    app.state.draining = False
    app.state.service = GenerationService(
        engine, admission, metrics, settings, served_name(settings, engine),
        is_draining=lambda: app.state.draining)
    metrics.engine_ready.set_function(lambda: 1.0 if engine.ready else 0.0)

    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(ops_router)
    # Added last = outermost: metrics see every response, including 413s.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    if settings.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allow_origins,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


async def _start_engine(engine: Engine) -> None:
    try:
        await engine.start()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("engine failed to start")
        engine.mark_dead(f"engine start failed: {type(exc).__name__}: {exc}")
        return
    log.info("engine ready: %s (%s, context %d)", engine.name, engine.model_name,
             engine.max_context)
