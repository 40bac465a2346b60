"""The server on the real default model (reference engine), over real loopback HTTP with the
official OpenAI client: greedy outputs equal `msn generate` and the runner called directly,
streaming and not; parallel streaming clients all finish or get 429 with no lost tokens; a
client that disconnects frees the engine. Few prompts and few tokens: CI has 2 cores."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from msn.models import resolve_model
from server.app import create_app
from server.engines.reference import ReferenceEngine
from server.settings import ServerSettings
from tests.server_support import ServerThread, wait_until

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 12
QUESTION = "Name three primary colors."
RAW_PROMPT = "The three primary colors are"
MAX_QUEUE = 2


@pytest.fixture(scope="module")
def model_path() -> Path:
    return resolve_model("base", dtype="float32")


@pytest.fixture(scope="module")
def server(model_path):
    engine = ReferenceEngine(model_path, default_method="ar")
    app = create_app(ServerSettings(max_queue=MAX_QUEUE, request_timeout_s=600), engine)
    with ServerThread(app) as srv:
        srv.wait_ready(timeout=600)
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=600)


@pytest.fixture(scope="module")
def runner(model_path):
    from proposers.reference.runner import ReferenceRunner

    return ReferenceRunner.load(model_path, device="cpu", dtype="float32")


def _greedy(runner, prompt_ids, method="ar", max_tokens=MAX_TOKENS):
    from proposers.reference.runner import GenerationConfig

    cfg = GenerationConfig(method=method, max_new_tokens=max_tokens, temperature=0.0)
    return runner.generate(prompt_ids, cfg)


def test_models_route(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.engine.model_name]


def test_chat_greedy_equals_msn_generate(client, server):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cli = subprocess.run(
        [sys.executable, "-m", "msn.cli", "generate", "--json", "--method", "ar",
         "--model", str(server.engine.model_path),
         "--max-new-tokens", str(MAX_TOKENS), "--temperature", "0", QUESTION],
        check=True, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    expected = json.loads(cli.stdout.strip().splitlines()[-1])
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model=server.engine.model_name, messages=messages,
                                       max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content == expected["text"]
    assert r.usage.completion_tokens == len(expected["token_ids"])
    assert r.choices[0].finish_reason == expected["finish_reason"]
    assert r.model_extra["decoding"]["num_steps"] == expected["num_steps"]
    assert r.model_extra["decoding"]["mat"] == pytest.approx(expected["mat"], abs=1e-4)
    # streaming, with speculation (Jacobi: a cheap chain; the 68-node TR-Jacobi tree costs
    # several plain steps on 2 CPU cores): the same text, exact in float32, and its MAT
    chunks = list(client.chat.completions.create(
        model=server.engine.model_name, messages=messages, max_tokens=MAX_TOKENS,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"method": "jacobi"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected["text"]
    decoding = chunks[-1].model_extra["decoding"]
    assert decoding["method"] == "jacobi"
    assert chunks[-1].usage.completion_tokens == len(expected["token_ids"])
    assert decoding["num_draft_tokens"] > 0
    eos = expected["finish_reason"] == "stop"  # ended on EOS: that token counts for MAT
    assert decoding["mat"] == pytest.approx((len(expected["token_ids"]) + eos)
                                            / decoding["num_steps"], abs=1e-3)


def test_mat_counts_the_end_of_sequence_token_like_msn_generate(client, server):
    """A greedy answer that ends on EOS: plain decoding reports MAT 1.0, as `msn generate`
    does (the EOS step generated a token that is not in the completion)."""
    r = client.chat.completions.create(
        model=server.engine.model_name, max_tokens=64, temperature=0,
        messages=[{"role": "user", "content": "Say hi."}])
    assert r.choices[0].finish_reason == "stop"
    decoding = r.model_extra["decoding"]
    assert decoding["num_steps"] == r.usage.completion_tokens + 1
    assert decoding["mat"] == 1.0


def test_completion_greedy_equals_runner(client, server, runner):
    expected = _greedy(runner, runner.encode(RAW_PROMPT))
    r = client.completions.create(model=server.engine.model_name, prompt=RAW_PROMPT,
                                  max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].text == expected.text
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.prompt_tokens == len(runner.encode(RAW_PROMPT))
    stream = client.completions.create(model=server.engine.model_name, prompt=RAW_PROMPT,
                                       max_tokens=MAX_TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected.text


def test_context_length_error_uses_the_model_numbers(server):
    limit = server.engine.max_context
    r = httpx.post(server.url + "/v1/completions", json={
        "model": server.engine.model_name, "prompt": "hello world", "max_tokens": limit})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded" and str(limit) in error["message"]


def test_parallel_streaming_clients_complete_or_get_429(server, runner):
    prompt = "Count: one, two,"
    expected = _greedy(runner, runner.encode(prompt), max_tokens=6).text
    body = {"model": server.engine.model_name, "prompt": prompt, "max_tokens": 6,
            "temperature": 0, "stream": True}

    async def one(http: httpx.AsyncClient) -> tuple[int, str]:
        async with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, r.headers.get("retry-after", "")
            parts = []
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    parts.extend(c["text"] for c in event["choices"])
            return 200, "".join(parts)

    async def burst() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(timeout=600) as http:
            return await asyncio.gather(*[one(http) for _ in range(6)])

    results = asyncio.run(asyncio.wait_for(burst(), 900))
    statuses = [s for s, _ in results]
    # width 1 + queue 2: at most 3 admitted at a time, the rest refused at once
    assert set(statuses) <= {200, 429} and 1 <= statuses.count(200) <= 6
    assert statuses.count(429) >= 1
    for status, payload in results:
        if status == 200:
            assert payload == expected  # every token arrives, in order
        else:
            assert payload.isdigit()  # Retry-After seconds
    assert wait_until(lambda: server.engine.active_generations == 0, timeout=120)


def test_disconnect_frees_the_engine(server):
    body = {"model": server.engine.model_name, "max_tokens": 400, "temperature": 0,
            "stream": True, "messages": [{"role": "user",
                                          "content": "Write a long story about a cat."}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0][
                    "delta"].get("content"):
                break  # the first generated text: the engine is mid-generation
        assert server.engine.active_generations == 1
    assert wait_until(lambda: server.engine.active_generations == 0, timeout=120)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'msn_requests_finished_total{finish_reason="client_disconnect"} 1.0' in metrics
    assert "msn_requests_running 0.0" in metrics
    r = httpx.post(server.url + "/v1/completions", json={
        "model": server.engine.model_name, "prompt": "Hi", "max_tokens": 2}, timeout=600)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2
