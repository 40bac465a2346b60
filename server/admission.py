"""Bounded admission: `max_running` generations at once, `max_queue` waiting, the rest 429.

The decision to admit is taken synchronously when the request arrives (so a rejected
streaming request still gets a real 429 status, before any SSE header), and the wait for a
running slot happens later, inside the request's deadline. Release is synchronous and
idempotent, so it is safe from a `finally` that runs while its task is being cancelled.
"""

from __future__ import annotations

import asyncio

from server.errors import APIError
from server.metrics import Metrics


class Admission:
    def __init__(self, max_running: int, max_queue: int, retry_after_s: int,
                 metrics: Metrics):
        assert max_running >= 1 and max_queue >= 0
        self.max_running = max_running
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._slots = asyncio.Semaphore(max_running)
        self._metrics = metrics
        self.admitted = 0  # waiting + running
        self.running = 0

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    def admit(self) -> Ticket:
        if self.admitted >= self.max_running + self.max_queue:
            self._metrics.requests_rejected.labels(reason="queue_full").inc()
            raise APIError(
                429,
                f"server is at capacity ({self.running} running, {self.waiting} queued); "
                f"retry after {self.retry_after_s} s",
                code="queue_full",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        self.admitted += 1
        self._publish()
        return Ticket(self)

    def _publish(self) -> None:
        self._metrics.requests_running.set(self.running)
        self._metrics.requests_waiting.set(self.waiting)


class Ticket:
    """One admitted request: waits for a running slot, then holds it until released."""

    __slots__ = ("_admission", "_holds_slot", "_released")

    def __init__(self, admission: Admission):
        self._admission = admission
        self._holds_slot = False
        self._released = False

    async def acquire_slot(self) -> None:
        assert not self._released
        await self._admission._slots.acquire()
        self._holds_slot = True
        self._admission.running += 1
        self._admission._publish()

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        adm = self._admission
        if self._holds_slot:
            self._holds_slot = False
            adm.running -= 1
            adm._slots.release()
        adm.admitted -= 1
        adm._publish()
