"""The HTTP layer over real loopback HTTP with a deterministic fake engine: OpenAI client
compatibility, the OpenAI error shape, limits, auth, admission (429), cancellation,
timeouts, engine failure, metrics, settings. The real model is in test_server_model.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

from server.app import create_app
from server.settings import ServerSettings
from tests.server_support import FAKE_MODEL, FakeEngine, ServerThread, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


def _text(tokens: list[int]) -> str:
    return "".join(chr(97 + t) for t in tokens)


def _assert_openai_error(response: httpx.Response, status: int, param: str | None = None,
                         code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def _metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample in a Prometheus text exposition (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, value = line.rsplit(" ", 1)
        sample, _, rest = key.partition("{")
        if sample != name:
            continue
        got = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if got == want:
            return float(value)
    return 0.0


@pytest.fixture(scope="module")
def server():
    engine = FakeEngine()
    app = create_app(ServerSettings(max_body_bytes=4096), engine)
    with ServerThread(app) as srv:
        srv.wait_ready(timeout=30)
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


# ----- OpenAI client compatibility -----

def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [FAKE_MODEL]


def test_completion_non_streaming(client):
    prompt = "Hello there"
    r = client.completions.create(model=FAKE_MODEL, prompt=prompt, max_tokens=7)
    expected = FakeEngine.expected_tokens(FakeEngine().encode_prompt(prompt), 7)
    assert r.object == "text_completion"
    assert r.choices[0].text == _text(expected)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == len(prompt) + 7
    assert r.model_extra["decoding"]["method"] == "ar"
    assert r.model_extra["decoding"]["mat"] == 1.0


def test_completion_streaming_with_usage(client):
    prompt = "Stream me"
    chunks = list(client.completions.create(
        model=FAKE_MODEL, prompt=prompt, max_tokens=9, stream=True,
        stream_options={"include_usage": True}, extra_body={"method": "tr-jacobi"}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    expected = FakeEngine.expected_tokens(FakeEngine().encode_prompt(prompt), 9)
    assert text == _text(expected)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    # tr-jacobi in the fake emits 1, 2, 3 tokens per step: 9 tokens in 5 steps
    assert any(len(c.choices[0].text) > 1 for c in chunks if c.choices)
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 9
    assert last.model_extra["decoding"]["num_steps"] == 5
    assert last.model_extra["decoding"]["mat"] == pytest.approx(9 / 5)


def test_chat_non_streaming(client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=FAKE_MODEL, messages=messages,
                                       max_completion_tokens=5, seed=3, temperature=0)
    prompt_ids = FakeEngine().encode_chat(messages)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _text(FakeEngine.expected_tokens(prompt_ids, 5))
    assert r.usage.prompt_tokens == len(prompt_ids)


def test_chat_streaming_and_stop(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    flat = [{"role": "user", "content": "hi"}]  # text parts are joined
    full = _text(FakeEngine.expected_tokens(FakeEngine().encode_chat(flat), 12))
    stop = full[5:7]
    stream = client.chat.completions.create(model=FAKE_MODEL, messages=messages,
                                            max_tokens=12, stop=[stop], stream=True,
                                            user="someone")
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == full[:full.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is None  # usage only with stream_options.include_usage


def test_sse_wire_format(server):
    body = {"model": FAKE_MODEL, "prompt": "x", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_token_id_prompt(client):
    r = client.completions.create(model=FAKE_MODEL, prompt=[3, 1, 4], max_tokens=2)
    assert r.choices[0].text == _text(FakeEngine.expected_tokens([3, 1, 4], 2))


def test_default_max_tokens_fills_the_context(server):
    # chat without max_tokens: the rest of the context (256 in the fake)
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": FAKE_MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert usage["total_tokens"] == 256
    assert r.json()["choices"][0]["finish_reason"] == "length"


# ----- errors in the OpenAI format -----

@pytest.mark.parametrize(("body", "param"), [
    ({"model": FAKE_MODEL, "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": FAKE_MODEL, "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": FAKE_MODEL, "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": FAKE_MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": FAKE_MODEL, "prompt": "x", "n": 2}, "n"),
    ({"model": FAKE_MODEL, "prompt": "x", "logprobs": 2}, "logprobs"),
    ({"model": FAKE_MODEL, "prompt": ["a", "b"]}, "prompt"),
    ({"model": FAKE_MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": FAKE_MODEL, "prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"model": FAKE_MODEL, "prompt": "x", "frequency_penalty": 1.0}, "frequency_penalty"),
    ({"model": FAKE_MODEL, "prompt": "x", "surprise": 1}, "surprise"),
    ({"prompt": "x"}, "model"),
])
def test_invalid_completion_requests(server, body, param):
    r = httpx.post(server.url + "/v1/completions", json=body)
    error = _assert_openai_error(r, 400, param=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("body", "param"), [
    ({"model": FAKE_MODEL, "messages": []}, "messages"),
    ({"model": FAKE_MODEL, "messages": [{"role": "tool", "content": "x"}]},
     "messages.0.role"),
    ({"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x"}], "tools": []},
     "tools"),
    ({"model": FAKE_MODEL, "messages": [{"role": "user", "content": "x"}], "n": 3}, "n"),
])
def test_invalid_chat_requests(server, body, param):
    _assert_openai_error(httpx.post(server.url + "/v1/chat/completions", json=body), 400,
                         param=param)


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=FAKE_MODEL, prompt="x", n=2)
    assert info.value.body["param"] == "n"


def test_malformed_json(server):
    r = httpx.post(server.url + "/v1/completions", content=b'{"model": ',
                   headers={"content-type": "application/json"})
    _assert_openai_error(r, 400, code="invalid_json")
    r = httpx.post(server.url + "/v1/completions", content=b"[1, 2]",
                   headers={"content-type": "application/json"})
    _assert_openai_error(r, 400)


def test_context_length_error_reports_the_numbers(server):
    prompt = "p" * 250  # 250 tokens in the fake; context 256
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": FAKE_MODEL, "prompt": prompt, "max_tokens": 10})
    error = _assert_openai_error(r, 400, param="max_tokens", code="context_length_exceeded")
    for number in ("256", "260", "250", "10"):
        assert number in error["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "model": FAKE_MODEL, "messages": [{"role": "user", "content": "p" * 300}]})
    _assert_openai_error(r, 400, param="messages", code="context_length_exceeded")


def test_unknown_model_and_method(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    _assert_openai_error(r, 404, param="model", code="model_not_found")
    r = httpx.post(server.url + "/v1/completions",
                   json={"model": FAKE_MODEL, "prompt": "x", "method": "beam"})
    _assert_openai_error(r, 400, param="method", code="unsupported_method")


def test_body_size_limit(server):
    big = {"model": FAKE_MODEL, "prompt": "x" * 5000}
    _assert_openai_error(httpx.post(server.url + "/v1/completions", json=big), 413)

    def chunked():  # no Content-Length: the limit applies to the bytes streamed
        yield b'{"model": "fake-model", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = httpx.post(server.url + "/v1/completions", content=chunked(),
                   headers={"content-type": "application/json"})
    _assert_openai_error(r, 413)


def test_unknown_route_and_method(server):
    _assert_openai_error(httpx.get(server.url + "/v1/nothing"), 404)
    _assert_openai_error(httpx.delete(server.url + "/v1/models"), 405)


def test_health_ready_openapi(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok", "detail": None}
    ready = httpx.get(server.url + "/ready").json()
    assert ready["status"] == "ready" and ready["detail"]["max_context"] == 256
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]


def test_cors_off_by_default(server):
    r = httpx.options(server.url + "/v1/models", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert "access-control-allow-origin" not in r.headers


# ----- metrics -----

def test_metrics_exposition(server, client):
    client.completions.create(model=FAKE_MODEL, prompt="metrics", max_tokens=6,
                              extra_body={"method": "tr-jacobi"})
    text = httpx.get(server.url + "/metrics").text
    names = {line.split(" ")[2].removesuffix("_total") for line in text.splitlines()
             if line.startswith("# TYPE")}
    assert all(n.startswith("msn_") for n in names), names
    for name in ("msn_http_requests", "msn_http_request_duration_seconds",
                 "msn_time_to_first_token_seconds", "msn_inter_token_latency_seconds",
                 "msn_prompt_tokens", "msn_generation_tokens", "msn_requests_waiting",
                 "msn_requests_running", "msn_spec_decode_accepted_tokens_per_step",
                 "msn_spec_decode_num_draft_tokens", "msn_spec_decode_num_accepted_tokens",
                 "msn_spec_decode_accepted_tokens_per_depth",
                 "msn_spec_decode_draft_tokens_per_depth"):
        assert name in names, name
    assert _metric(text, "msn_http_requests_total", route="/v1/completions", method="POST",
                   status="200") >= 1
    # 6 tokens in steps of 1, 2, 3: three steps drafted 4 nodes over depth 3 each,
    # accepting 0, 1, 2; per-depth counts follow (this module's other tr-jacobi request
    # adds its own, so compare the sums the fake guarantees).
    drafted = _metric(text, "msn_spec_decode_num_draft_tokens_total", method="tr-jacobi")
    drafts = _metric(text, "msn_spec_decode_num_drafts_total", method="tr-jacobi")
    assert drafted == 4 * drafts
    d1 = _metric(text, "msn_spec_decode_draft_tokens_per_depth_total", method="tr-jacobi",
                 depth="1")
    a1 = _metric(text, "msn_spec_decode_accepted_tokens_per_depth_total", method="tr-jacobi",
                 depth="1")
    a2 = _metric(text, "msn_spec_decode_accepted_tokens_per_depth_total", method="tr-jacobi",
                 depth="2")
    accepted = _metric(text, "msn_spec_decode_num_accepted_tokens_total", method="tr-jacobi")
    assert d1 == drafts and 0 < a2 <= a1 <= d1 and accepted == a1 + a2
    steps = _metric(text, "msn_spec_decode_accepted_tokens_per_step_count",
                    method="tr-jacobi")
    emitted = _metric(text, "msn_spec_decode_accepted_tokens_per_step_sum",
                      method="tr-jacobi")
    assert emitted == steps + accepted  # every step: accepted drafts + one bonus token
    assert _metric(text, "msn_engine_ready") == 1


# ----- admission, cancellation, timeouts -----

async def _stream_all(url: str, body: dict) -> tuple[int, str, dict]:
    async with httpx.AsyncClient(timeout=60) as http:  # noqa: SIM117
        async with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, r.text, dict(r.headers)
            text = []
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    if event["choices"]:
                        text.append(event["choices"][0]["text"])
            return 200, "".join(text), dict(r.headers)


def test_bounded_queue_rejects_with_429():
    engine = FakeEngine(step_delay=0.02)
    app = create_app(ServerSettings(max_running=1, max_queue=2, retry_after_s=3), engine)
    with ServerThread(app) as srv:
        srv.wait_ready(timeout=30)
        body = {"model": FAKE_MODEL, "prompt": "queue", "max_tokens": 20, "stream": True}
        expected = _text(FakeEngine.expected_tokens(engine.encode_prompt("queue"), 20))

        async def burst():
            return await asyncio.gather(*[_stream_all(srv.url + "/v1/completions", body)
                                          for _ in range(8)])

        results = asyncio.run(asyncio.wait_for(burst(), 120))
        statuses = sorted(r[0] for r in results)
        assert set(statuses) <= {200, 429}
        assert statuses.count(200) >= 1 and statuses.count(429) >= 1
        for status, text, headers in results:
            if status == 200:
                assert text == expected  # no lost tokens
            else:
                assert headers["retry-after"] == "3"
                assert json.loads(text)["error"]["code"] == "queue_full"
        metrics = httpx.get(srv.url + "/metrics").text
        assert _metric(metrics, "msn_requests_rejected_total", reason="queue_full") == \
            statuses.count(429)
        assert wait_until(lambda: engine.active == 0)


def test_stream_disconnect_cancels_generation():
    engine = FakeEngine(step_delay=0.05)
    app = create_app(ServerSettings(max_running=1, max_queue=0), engine)
    with ServerThread(app) as srv:
        srv.wait_ready(timeout=30)
        body = {"model": FAKE_MODEL, "prompt": "bye", "max_tokens": 200, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert engine.active == 1
        # closing the response drops the connection mid-stream
        assert wait_until(lambda: engine.active == 0 and engine.cancelled == 1)
        metrics = httpx.get(srv.url + "/metrics").text
        assert wait_until(lambda: _metric(httpx.get(srv.url + "/metrics").text,
                                          "msn_requests_running") == 0)
        assert "msn_requests_finished_total" in metrics
        # the single running slot is free again: a new request is admitted and completes
        r = httpx.post(srv.url + "/v1/completions",
                       json={"model": FAKE_MODEL, "prompt": "again", "max_tokens": 3})
        assert r.status_code == 200
        metrics = httpx.get(srv.url + "/metrics").text
        assert _metric(metrics, "msn_requests_finished_total",
                       finish_reason="client_disconnect") == 1


def test_non_streaming_disconnect_cancels_generation():
    engine = FakeEngine(step_delay=0.05)
    app = create_app(ServerSettings(max_running=1, max_queue=0), engine)
    with ServerThread(app) as srv:
        srv.wait_ready(timeout=30)
        body = {"model": FAKE_MODEL, "prompt": "patience", "max_tokens": 200}
        started = threading.Event()

        def impatient():
            with httpx.Client(timeout=httpx.Timeout(30, read=0.5)) as http:
                started.set()
                with pytest.raises(httpx.ReadTimeout):
                    http.post(srv.url + "/v1/completions", json=body)

        t = threading.Thread(target=impatient)
        t.start()
        t.join(60)
        assert started.is_set()
        assert wait_until(lambda: engine.cancelled == 1 and engine.active == 0)
        assert engine.completed == 0
        r = httpx.post(srv.url + "/v1/completions",
                       json={"model": FAKE_MODEL, "prompt": "next", "max_tokens": 2})
        assert r.status_code == 200


def test_request_timeout():
    engine = FakeEngine(step_delay=0.05)
    app = create_app(ServerSettings(request_timeout_s=0.3), engine)
    with ServerThread(app) as srv:
        srv.wait_ready(timeout=30)
        body = {"model": FAKE_MODEL, "prompt": "slow", "max_tokens": 250}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        _assert_openai_error(r, 504, code="timeout")
        with httpx.stream("POST", srv.url + "/v1/completions",
                          json={**body, "stream": True}, timeout=60) as s:
            assert s.status_code == 200
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "timeout"
        assert wait_until(lambda: engine.active == 0)
        assert engine.completed == 0 and engine.cancelled == 2


def test_engine_failure_turns_ready_false():
    engine = FakeEngine(fail_at_step=2)
    app = create_app(ServerSettings(), engine)
    with ServerThread(app) as srv:
        srv.wait_ready(timeout=30)
        body = {"model": FAKE_MODEL, "prompt": "boom", "max_tokens": 10}
        r = httpx.post(srv.url + "/v1/completions", json=body)
        _assert_openai_error(r, 503, code="engine_dead")
        _assert_openai_error(httpx.get(srv.url + "/ready"), 503, code="engine_dead")
        _assert_openai_error(httpx.get(srv.url + "/health"), 503, code="engine_dead")
        # later requests fail fast with a clear error instead of hanging
        r = httpx.post(srv.url + "/v1/completions", json=body)
        error = _assert_openai_error(r, 503, code="engine_dead")
        assert "simulated engine failure" in error["message"]
        with httpx.stream("POST", srv.url + "/v1/completions",
                          json={**body, "stream": True}) as s:
            assert s.status_code == 503


def test_engine_start_failure_and_loading():
    engine = FakeEngine(fail_start=True)
    with ServerThread(create_app(ServerSettings(), engine)) as srv:
        assert wait_until(lambda: engine.dead_reason is not None)
        error = _assert_openai_error(httpx.get(srv.url + "/ready"), 503, code="engine_dead")
        assert "simulated load failure" in error["message"]
    engine = FakeEngine(start_delay=3600)
    with ServerThread(create_app(ServerSettings(), engine)) as srv:
        assert httpx.get(srv.url + "/health").status_code == 200
        _assert_openai_error(httpx.get(srv.url + "/ready"), 503, code="model_loading")
        r = httpx.post(srv.url + "/v1/completions", json={"model": FAKE_MODEL, "prompt": "x"})
        _assert_openai_error(r, 503, code="model_loading")
        assert "retry-after" in r.headers


# ----- security -----

def test_api_keys(tmp_path, monkeypatch):
    key_file = tmp_path / "keys"
    key_file.write_text("file-key\n\n")
    monkeypatch.setenv("MSN_API_KEYS", "env-key-1, env-key-2")
    settings = ServerSettings(api_key_file=key_file)
    with ServerThread(create_app(settings, FakeEngine())) as srv:
        srv.wait_ready(timeout=30)
        url = srv.url + "/v1/models"
        error = _assert_openai_error(httpx.get(url), 401, code="invalid_api_key")
        assert "Authorization" in error["message"]
        _assert_openai_error(httpx.get(url, headers={"Authorization": "Bearer nope"}), 401)
        _assert_openai_error(httpx.get(url, headers={"Authorization": "Basic file-key"}), 401)
        # no key: 401 even when the body is also invalid (auth is checked first)
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": 5})
        _assert_openai_error(r, 401)
        for key in ("env-key-1", "env-key-2", "file-key"):
            c = openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0)
            assert c.models.list().data[0].id == FAKE_MODEL
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=FAKE_MODEL, prompt="x")
        # operational routes stay open for probes and scrapers
        assert httpx.get(srv.url + "/health").status_code == 200
        assert httpx.get(srv.url + "/metrics").status_code == 200


def test_key_checker_matches_only_exact_keys():
    from server.auth import KeyChecker

    checker = KeyChecker(["alpha", "beta-longer-key"])
    assert checker.enabled
    assert checker.check("alpha") and checker.check("beta-longer-key")
    assert not checker.check("alph") and not checker.check("alpha ") \
        and not checker.check("")
    assert not KeyChecker([]).enabled


def test_cors_when_configured():
    settings = ServerSettings(cors_allow_origins=["https://ui.example"])
    with ServerThread(create_app(settings, FakeEngine())) as srv:
        r = httpx.options(srv.url + "/v1/models", headers={
            "Origin": "https://ui.example", "Access-Control-Request-Method": "GET"})
        assert r.headers["access-control-allow-origin"] == "https://ui.example"


def test_prompts_stay_out_of_logs(caplog):
    secret = "zebra-quartz-secret"
    for log_prompts in (False, True):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="msn.server"), \
                ServerThread(create_app(ServerSettings(log_prompts=log_prompts),
                                        FakeEngine())) as srv:
            srv.wait_ready(timeout=30)
            r = httpx.post(srv.url + "/v1/completions",
                           json={"model": FAKE_MODEL, "prompt": secret, "max_tokens": 2})
            assert r.status_code == 200
            assert wait_until(lambda: "completion_tokens=2" in caplog.text)
        assert (secret in caplog.text) == log_prompts


# ----- settings and CLI -----

def test_settings_from_env_and_flags(monkeypatch):
    from msn.cli import build_parser
    from server.cli import settings_from_args

    monkeypatch.setenv("MSN_MAX_QUEUE", "3")
    monkeypatch.setenv("MSN_PORT", "9001")
    monkeypatch.setenv("MSN_CORS_ALLOW_ORIGINS", "https://a.example,https://b.example")
    monkeypatch.setenv("MSN_VLLM_ENGINE_ARGS", '{"max_num_seqs": 4}')
    settings = ServerSettings()
    assert settings.max_queue == 3 and settings.port == 9001
    assert settings.cors_allow_origins == ["https://a.example", "https://b.example"]
    assert settings.vllm_engine_args == {"max_num_seqs": 4}
    assert settings.host == "127.0.0.1"  # loopback unless asked otherwise
    args = build_parser().parse_args(["serve", "--port", "9002", "--speculative-config",
                                      '{"method": "ngram"}'])
    from_flags = settings_from_args(args)
    assert from_flags.port == 9002 and from_flags.max_queue == 3
    assert from_flags.speculative_config == {"method": "ngram"}


def test_serve_cli_rejects_bad_input():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "msn.cli", "serve", "--model", "/no/such/dir"],
                       check=False, capture_output=True, text=True, env=env, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("msn serve: error:") and len(
        r.stderr.strip().splitlines()) == 1


def test_serve_defaults_to_vllm_with_the_plugin():
    """`msn serve` with no flags serves vLLM with the TR-Jacobi plugin (the product);
    the reference runner is one flag away, on cpu unless told."""
    from msn.cli import build_parser
    from server.cli import settings_from_args

    settings = settings_from_args(build_parser().parse_args(["serve"]))
    assert settings.engine == "vllm" and settings.vllm_speculation == "tr-jacobi"
    assert settings.speculative_config is None and settings.device is None


@pytest.mark.parametrize("argv, message", [
    (["--device", "cuda"], r"--device cuda applies to --engine reference"),
    (["--engine", "vllm", "--device", "cpu"], r"--device cpu applies to --engine reference"),
    (["--engine", "reference", "--default-method", "beam"],
     r"--default-method beam is not available on the reference engine; choose one of ar, "),
    (["--default-method", "jacobi"],
     (r"--default-method jacobi is not available on the vllm engine; choose one of "
      r"tr-jacobi, pld, ar$")),
    (["--vllm-speculation", "none", "--default-method", "tr-jacobi"],
     r"--default-method tr-jacobi is not available on the vllm engine; choose one of ar$"),
    (["--engine", "reference", "--trjacobi", '{"corpus_tokens": 0}'], "needs --engine vllm"),
    (["--reference-compile"], "apply to --engine reference"),
    (["--engine", "vllm", "--reference-attention", "sdpa"], "apply to --engine reference"),
    (["--engine", "reference", "--reference-attention", "paged-triton"], "needs --device cuda"),
    (["--engine", "vllm", "--vllm-speculation", "none", "--trjacobi", '{"corpus_tokens": 0}'],
     "needs --engine vllm, --vllm-speculation tr-jacobi"),
    (["--engine", "vllm", "--trjacobi", '{"corpus_tokens": -1}'], "corpus_tokens"),
    (["--engine", "vllm", "--trjacobi", '{"no_such_setting": 1}'],
     r"unknown setting\(s\) no_such_setting \(known: .*corpus_tokens"),
])
def test_serve_cli_checks_engine_settings(argv, message):
    """Settings for the other engine (`--device` is the reference runner's, `--trjacobi`
    the vllm plugin's), a default method the engine lacks and bad TR-Jacobi settings are
    one line, exit code 2, before anything starts."""
    from msn.cli import build_parser
    from msn.errors import UsageError
    from server.cli import build_engine, settings_from_args

    settings = settings_from_args(build_parser().parse_args(["serve", *argv]))
    if "needs --engine vllm" not in message and "applies to" not in message and (
            "reference engine" not in message):
        pytest.importorskip("vllm")
    with pytest.raises(UsageError, match=message):
        build_engine(settings)


def test_reference_engine_settings_reach_the_engine(base_model_path, caplog):
    from msn.cli import build_parser
    from server.cli import build_engine, settings_from_args

    argv = ["serve", "--engine", "reference", "--model", str(base_model_path),
            "--reference-attention", "paged-torch", "--reference-compile"]
    engine = build_engine(settings_from_args(build_parser().parse_args(argv)))
    assert engine.attention == "paged-torch" and engine.compile_steps
    plain = build_engine(settings_from_args(build_parser().parse_args(argv[:5])))
    assert plain.attention == "sdpa" and not plain.compile_steps
    assert "float32" not in caplog.text
    # Our kernels in float32 are exact but slow: built (not started), with a warning.
    gpu = argv[:5] + ["--device", "cuda", "--reference-attention", "paged-triton"]
    engine = build_engine(settings_from_args(build_parser().parse_args(gpu)))
    assert engine.attention == "paged-triton" and "--dtype bfloat16" in caplog.text


# ----- graceful shutdown -----

def test_sigterm_drains_in_flight_streams():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.server_support", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _ready(url), timeout=60), proc.stdout.read() \
            if proc.poll() is not None else "server not ready"
        body = {"model": FAKE_MODEL, "prompt": "drain", "max_tokens": 30, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(lines)
            assert first.startswith("data: ")
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        text = json.loads(first[6:])["choices"][0]["text"] + "".join(
            json.loads(e[6:])["choices"][0]["text"] for e in rest[:-1])
        assert text == _text(FakeEngine.expected_tokens(FakeEngine().encode_prompt("drain"),
                                                        30))
        # uvicorn re-raises the captured SIGTERM once shutdown (lifespan included) is done
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert "fake engine shut down" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url + "/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ----- TR-Jacobi worker counters (vLLM engine with the plugin) -----

TRJ_STATS = {  # the shape of runner.trjacobi_stats()
    "tree_steps": 3, "compactions": 2, "verified_drafts": 40, "accepted_tokens": 55,
    "undrafted_steps": 90, "proposals": 41, "feedback_proposals": 12, "shadow_outcomes": 30,
    "idle_steps": 60, "corpus": {"tokens": 900, "docs": 4, "lookups": 25, "drafts": 9},
    "sampled_unspeculated": 0, "rungs": {"none": 100, "chain:4": 30, "tree-16": 11},
    "closed_batch_steps": 80, "probes": 5,
    "paths": {"plain": {"steps": 90, "tokens": 90, "seconds": 4.5},
              "chain": {"steps": 20, "tokens": 140, "seconds": 1.25},
              "tree": {"steps": 3, "tokens": 60, "seconds": 0.5}},
    "draft_seconds": 0.25, "between_steps_seconds": 0.4,
    "propose_seconds": {"lookup": 0.01, "shadows": 0.02, "plan": 0.03, "draft": 0.04},
    "cost_lines": {"kernel": [0.03, 0.001]},
}


def test_trjacobi_collector_exports_the_worker_counters():
    from prometheus_client import generate_latest

    from server.metrics import Metrics

    metrics = Metrics()
    assert "msn_trjacobi" not in generate_latest(metrics.registry).decode()  # no copy yet
    metrics.trjacobi.update(TRJ_STATS)
    text = generate_latest(metrics.registry).decode()
    assert _metric(text, "msn_trjacobi_proposals_total") == 41
    assert _metric(text, "msn_trjacobi_tree_steps_total") == 3
    assert _metric(text, "msn_trjacobi_idle_steps_total") == 60
    assert _metric(text, "msn_trjacobi_corpus_tokens") == 900
    assert _metric(text, "msn_trjacobi_corpus_docs") == 4
    assert _metric(text, "msn_trjacobi_corpus_lookups_total") == 25
    assert _metric(text, "msn_trjacobi_corpus_drafts_total") == 9
    assert _metric(text, "msn_trjacobi_rung_request_steps_total", rung="chain:4") == 30
    assert _metric(text, "msn_trjacobi_proposer_seconds_total", phase="plan") == 0.03
    assert _metric(text, "msn_trjacobi_steps_total", path="chain") == 20
    assert _metric(text, "msn_trjacobi_step_seconds_total", path="plain") == 4.5
    # A later copy replaces the earlier one (the worker keeps the totals).
    metrics.trjacobi.update({**TRJ_STATS, "proposals": 50})
    assert _metric(generate_latest(metrics.registry).decode(), "msn_trjacobi_proposals_total") == 50


def test_vllm_engine_refreshes_trjacobi_metrics_and_keeps_the_last_copy(caplog):
    import asyncio
    import types

    from prometheus_client import generate_latest

    from server.engines.vllm import VLLMEngine
    from server.metrics import Metrics

    calls = []

    async def rpc(method, timeout=None, args=(), kwargs=None):
        calls.append((method, timeout))
        if len(calls) in (2, 3):
            raise TimeoutError("engine busy")
        return [TRJ_STATS]

    metrics = Metrics()
    engine = VLLMEngine("/models/m", metrics=metrics, speculative_config={
        "method": "custom_class", "model": "proposers.vllm.TRJacobiProposer",
        "num_speculative_tokens": 8})
    engine._llm = types.SimpleNamespace(errored=False, collective_rpc=rpc)
    asyncio.run(engine.refresh_metrics())
    assert calls[0][0] == "trjacobi_stats" and calls[0][1] > 0
    assert _metric(generate_latest(metrics.registry).decode(), "msn_trjacobi_probes_total") == 5
    caplog.set_level(logging.DEBUG, logger="msn.server")
    asyncio.run(engine.refresh_metrics())  # times out: the last copy stays, a warning says why
    assert _metric(generate_latest(metrics.registry).decode(), "msn_trjacobi_probes_total") == 5
    asyncio.run(engine.refresh_metrics())  # fails again: no second warning
    warnings = [r for r in caplog.records if "worker stats unavailable" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.DEBUG]
    asyncio.run(engine.refresh_metrics())  # succeeds: a later failure warns again
    assert engine._stats_failing is False
    # Plain vLLM (no plugin) has no such counters: nothing is asked.
    plain = VLLMEngine("/models/m", metrics=Metrics())
    plain._llm = types.SimpleNamespace(errored=False, collective_rpc=rpc)
    asyncio.run(plain.refresh_metrics())
    assert len(calls) == 4


def test_eos_token_ids_from_generation_config_and_tokenizer(tmp_path):
    import json
    import types

    from server.engines.vllm import model_eos_ids

    tokenizer = types.SimpleNamespace(eos_token_id=5)
    assert model_eos_ids(tmp_path, tokenizer) == {5}  # no generation_config.json
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert model_eos_ids(tmp_path, tokenizer) == {2, 5, 7}


def test_vllm_cpu_env_defaults_leave_explicit_settings(monkeypatch):
    """`msn serve --engine vllm` sets vLLM-CPU's measured defaults (all cores bound, a
    short OpenMP spin) only where the environment says nothing."""
    from server.engines.vllm import GOMP_SPINCOUNT, set_cpu_env_defaults

    for key in ("GOMP_SPINCOUNT", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_KVCACHE_SPACE",
                "VLLM_CPU_OMP_THREADS_BIND"):  # all it sets, so the test leaves none behind
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "5")
    set_cpu_env_defaults()
    assert os.environ["GOMP_SPINCOUNT"] == GOMP_SPINCOUNT
    assert os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "5"
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    set_cpu_env_defaults()
    assert os.environ["GOMP_SPINCOUNT"] == "300000"


def test_vllm_engine_counts_steps_from_per_request_draft_metrics(caplog):
    """The vLLM engine's per-request decoding info (`VLLMEngine._request_counts`): each
    step emits one token plus its accepted drafts, so steps = tokens - accepted; vLLM may
    merge steps into one streamed output (outputs undercount steps) and counts drafts
    accepted past a stop as accepted (tokens - accepted undercounts): the larger of the
    two lower bounds is reported, and accepted drafts are what it leaves."""
    import types

    from server.engines.vllm import VLLMEngine

    def done(histogram, drafted):
        return types.SimpleNamespace(spec_decode_metrics=types.SimpleNamespace(
            histogram=histogram, num_draft_tokens=drafted))

    spec = VLLMEngine("m", speculative_config={"method": "custom_class",
                                               "model": "proposers.vllm.TRJacobiProposer"})
    # 20 tokens: 5 steps accepted 2, 1 and 0 drafts (3 accepted) -> 17 steps.
    assert spec._request_counts(done([3, 1, 1], 40), chunks=17, generated=20) == (17, 40, 3)
    # The same, streamed as 9 outputs (steps merged): still 17 steps.
    assert spec._request_counts(done([3, 1, 1], 40), chunks=9, generated=20) == (17, 40, 3)
    # The last step accepted 4 drafts but max_tokens kept 1 of them: 10 outputs of 1-2
    # tokens, 12 tokens; vLLM counts 6 accepted, 2 emitted -> 10 steps, 2 accepted.
    assert spec._request_counts(done([5, 0, 1, 0, 1], 30), chunks=10, generated=12) == (10, 30, 2)
    # Without vLLM's counts (e.g. n > 1): steps as streamed, said once in the log.
    with caplog.at_level(logging.WARNING, logger="msn.server"):
        missing = types.SimpleNamespace(spec_decode_metrics=None)
        assert spec._request_counts(missing, chunks=7, generated=9) == (7, 0, 0)
        assert spec._request_counts(missing, chunks=7, generated=9) == (7, 0, 0)
    assert sum("no per-request draft counts" in r.getMessage() for r in caplog.records) == 1
    # An engine without drafting: one token a step, however the outputs were merged.
    plain = VLLMEngine("m")
    assert plain._request_counts(types.SimpleNamespace(), chunks=3, generated=9) == (9, 0, 0)
