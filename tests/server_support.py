"""Helpers for the server tests: a small deterministic engine and a real uvicorn server on a
free loopback port in a background thread."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Self

import uvicorn

from server.engines.base import Engine, EngineDeadError, EngineStep, SamplingSpec

FAKE_MODEL = "fake-model"


class FakeEngine(Engine):
    """Deterministic engine for HTTP-layer tests. Tokens are letters: token t is the
    character chr(97 + t). Under `tr-jacobi` it emits 1, 2, 3, 1, 2, 3... tokens per step
    (accepted_depth = tokens - 1, 4 drafts over a depth-3 tree) so speculative metrics and
    multi-token deltas are exercised; under `ar` one token per step."""

    name = "fake"
    methods = ("ar", "tr-jacobi")
    default_method = "ar"
    default_max_running = 2

    def __init__(self, *, step_delay: float = 0.0, max_context: int = 256,
                 fail_at_step: int | None = None, start_delay: float = 0.0,
                 fail_start: bool = False):
        self.model_name = FAKE_MODEL
        self.max_context = max_context
        self.step_delay = step_delay
        self.fail_at_step = fail_at_step
        self.start_delay = start_delay
        self.fail_start = fail_start
        self.announce_shutdown = False
        self._started = False
        self.active = 0
        self.cancelled = 0
        self.completed = 0

    @property
    def ready(self) -> bool:
        return self._started and self.dead_reason is None

    async def start(self) -> None:
        await asyncio.sleep(self.start_delay)
        if self.fail_start:
            raise RuntimeError("simulated load failure")
        self._started = True

    async def shutdown(self) -> None:
        self._started = False
        if self.announce_shutdown:
            print("fake engine shut down", flush=True)

    def encode_prompt(self, prompt: str) -> list[int]:
        return [b % 26 for b in prompt.encode()]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return self.encode_prompt(text)

    @staticmethod
    def expected_tokens(prompt_ids: list[int], n: int) -> list[int]:
        seed = sum(prompt_ids)
        return [(seed + 7 * i) % 26 for i in range(n)]

    async def generate(self, request_id: str, prompt_ids: list[int],
                       sampling: SamplingSpec) -> AsyncIterator[EngineStep]:
        if self.dead_reason:
            raise EngineDeadError(self.dead_reason)
        tokens = self.expected_tokens(prompt_ids, sampling.max_tokens)
        emitted = ""  # text sent so far
        held = ""  # text that might be the start of a stop string
        i = 0
        step_no = 0
        self.active += 1
        finished = False
        try:
            while i < len(tokens):
                if self.step_delay:
                    await asyncio.sleep(self.step_delay)
                if self.fail_at_step is not None and step_no == self.fail_at_step:
                    self.mark_dead("simulated engine failure")
                    raise EngineDeadError("simulated engine failure")
                k = 1 if sampling.method == "ar" else 1 + step_no % 3
                chunk = tokens[i:i + k]
                i += len(chunk)
                finish = "length" if i >= len(tokens) else None
                pending = held + "".join(chr(97 + t) for t in chunk)
                hits = [p for p in (pending.find(s) for s in sampling.stop) if p >= 0]
                if hits:
                    delta, held, finish = pending[:min(hits)], "", "stop"
                elif finish:
                    delta, held = pending, ""
                else:
                    keep = max((n for s in sampling.stop for n in range(1, len(s))
                                if pending.endswith(s[:n])), default=0)
                    delta, held = pending[:len(pending) - keep], pending[len(pending) - keep:]
                emitted += delta
                drafted = 0 if sampling.method == "ar" else 4
                yield EngineStep(token_ids=chunk, text=delta, num_drafted=drafted,
                                 accepted_depth=len(chunk) - 1 if drafted else 0,
                                 draft_depth=3 if drafted else 0, finish_reason=finish)
                step_no += 1
                if finish:
                    finished = True
                    return
        finally:
            self.active -= 1
            if finished:
                self.completed += 1
            else:
                self.cancelled += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn on 127.0.0.1:<free port> in a daemon thread; `with` starts and stops it."""

    def __init__(self, app, *, graceful_shutdown_s: float = 5.0):
        self.app = app
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=graceful_shutdown_s,
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.02)
        return self

    def wait_ready(self, timeout: float = 600.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = httpx.get(self.url + "/ready", timeout=10)
            if r.status_code == 200:
                return
            if r.json()["error"]["code"] == "engine_dead":
                raise RuntimeError(f"engine failed: {r.text}")
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Polls a condition; tests assert on the result, never on elapsed time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _serve_fake(port: int) -> None:
    """`python -m tests.server_support PORT`: the real `msn serve` server path (signal
    handling and drain included) around a slow fake engine, for the shutdown test."""
    from server.app import create_app
    from server.cli import make_server
    from server.settings import ServerSettings

    settings = ServerSettings(port=port, graceful_shutdown_s=30, log_level="warning")
    engine = FakeEngine(step_delay=0.05)
    engine.announce_shutdown = True
    make_server(create_app(settings, engine), settings).run()


if __name__ == "__main__":
    import sys

    _serve_fake(int(sys.argv[1]))
