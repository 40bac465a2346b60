"""Property-based HTTP fuzzing of the app's own OpenAPI schema (schemathesis): valid and
invalid requests to every operation, over real loopback HTTP, never a 5xx, and every JSON
error in the OpenAI shape. A fast fake engine keeps it quick; the HTTP layer under test is
the production one.

Cases come from schemathesis strategies driven by hypothesis directly (its pytest
`parametrize` integration does not load under pytest 9 yet)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation.modes import GenerationMode

from server.app import create_app
from server.settings import ServerSettings
from tests.server_support import FAKE_MODEL, FakeEngine, ServerThread

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def fuzz_server():
    # A small context keeps generated max_tokens cheap; a deep queue avoids 429s.
    app = create_app(ServerSettings(max_queue=64, max_body_bytes=64 * 1024),
                     FakeEngine(max_context=64))
    with ServerThread(app) as srv:
        srv.wait_ready(timeout=30)
        yield srv


def _operations(url: str):
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_schema_lists_every_route(fuzz_server):
    labels = {op.label for op in _operations(fuzz_server.url)}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
            "GET /health", "GET /ready", "GET /metrics"} <= labels


def _fuzz_check(operation, mode, failures: list[str], statuses: set[int]):
    """One hypothesis test per operation (a factory, so the closure binds this operation)."""

    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            # A random model id is a 404 before anything else is looked at; name the
            # served model so the generated sampling fields reach the engine.
            case.body["model"] = FAKE_MODEL
        response = case.call(timeout=30)
        statuses.add(response.status_code)
        if response.status_code >= 500:
            failures.append(f"{case.method} {case.path} -> {response.status_code}: "
                            f"{response.text[:300]} body={case.body!r}")
        case.validate_response(response, checks=[not_a_server_error])
        content_type = (response.headers.get("content-type") or [""])[0]
        if response.status_code >= 400 and content_type.startswith("application/json"):
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}

    return check


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(fuzz_server, mode):
    operations = _operations(fuzz_server.url)
    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        check = _fuzz_check(operation, mode, failures, statuses.setdefault(operation.label, set()))
        try:
            check()
        except Unsatisfiable:
            # No invalid input exists for an operation without parameters (GET /health).
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET", \
                operation.label
    assert not failures, "\n".join(failures)
    if mode is GenerationMode.POSITIVE:
        for label in ("POST /v1/completions", "POST /v1/chat/completions"):
            assert 200 in statuses[label], (label, statuses[label])
