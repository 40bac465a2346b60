"""Closed-loop async HTTP load against an OpenAI-compatible server on loopback.

`concurrency` workers each send one streaming chat completion at a time, taking prompts
from a fixed list in order, until `max_requests` were sent or `max_seconds` passed. A 429 is
counted and its worker waits Retry-After (bounded by the time left) before the next
request. Latencies: TTFT = request sent -> first content delta; ITL = gaps between
content deltas (a speculative step may deliver several tokens in one delta).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import httpx
import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the load generator only targets loopback, not {host!r}")


@dataclass(slots=True)
class RequestRecord:
    status: int  # HTTP status; 0 = transport error
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    mat: float | None = None
    prompt_index: int = -1  # which of the level's prompts (run_level)
    text: str = ""  # the streamed completion


@dataclass(slots=True)
class LevelResult:
    concurrency: int
    wall_s: float
    sent: int
    completed: int
    status_counts: dict[str, int]
    transport_errors: int
    stream_errors: int
    requests_per_s: float
    output_tokens_per_s: float
    ttft_s: dict[str, float | None]
    itl_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    mean_mat: float | None

    def to_json(self) -> dict:
        return asdict(self)


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "mean": float(arr.mean())}


async def one_request(http: httpx.AsyncClient, url: str, model: str, prompt: str,
                      max_tokens: int, extra: dict) -> tuple[RequestRecord, float]:
    """Returns the record and, for a 429, the Retry-After seconds (else 0)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    try:
        async with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                retry = float(r.headers.get("retry-after", 0) or 0)
                return RequestRecord(status=r.status_code, error=text[:300]), retry
            record = RequestRecord(status=200)
            last = None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    record.error = event["error"]["message"]
                    continue
                now = time.perf_counter()
                if event.get("choices") and event["choices"][0]["delta"].get("content"):
                    record.text += event["choices"][0]["delta"]["content"]
                    if last is None:
                        record.ttft_s = now - start
                    else:
                        record.itl_s.append(now - last)
                    last = now
                if event.get("usage"):
                    record.output_tokens = event["usage"]["completion_tokens"]
                    record.mat = (event.get("decoding") or {}).get("mat")
            record.e2e_s = time.perf_counter() - start
            return record, 0.0
    except httpx.HTTPError as exc:
        return RequestRecord(status=0, error=f"{type(exc).__name__}: {exc}"), 0.0


async def run_level(url: str, model: str, prompts: list[str], concurrency: int,
                    max_requests: int, max_seconds: float, max_tokens: int,
                    extra: dict | None = None) -> tuple[LevelResult, list[RequestRecord]]:
    check_loopback(url)
    extra = extra or {}
    records: list[RequestRecord] = []
    next_index = 0
    start = time.perf_counter()
    deadline = start + max_seconds

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < max_requests and time.perf_counter() < deadline:
            index = next_index % len(prompts)
            next_index += 1
            record, retry_after = await one_request(http, url, model, prompts[index],
                                                    max_tokens, extra)
            record.prompt_index = index
            records.append(record)
            if retry_after:
                await asyncio.sleep(min(retry_after, max(deadline - time.perf_counter(), 0)))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(max_seconds + 60), limits=limits) as http:
        await asyncio.gather(*[worker(http) for _ in range(concurrency)])
    wall = time.perf_counter() - start

    ok = [r for r in records if r.status == 200 and r.error is None]
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r.status)] = statuses.get(str(r.status), 0) + 1
    mats = [r.mat for r in ok if r.mat is not None]
    result = LevelResult(
        concurrency=concurrency, wall_s=wall, sent=len(records), completed=len(ok),
        status_counts=statuses,
        transport_errors=sum(1 for r in records if r.status == 0),
        stream_errors=sum(1 for r in records if r.status == 200 and r.error is not None),
        requests_per_s=len(ok) / wall,
        output_tokens_per_s=sum(r.output_tokens for r in ok) / wall,
        ttft_s=percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        itl_s=percentiles([x for r in ok for x in r.itl_s]),
        e2e_s=percentiles([r.e2e_s for r in ok if r.e2e_s is not None]),
        mean_mat=float(np.mean(mats)) if mats else None,
    )
    return result, records
