"""Fuzz every operation of the OpenAPI schema (schemathesis, valid and invalid data): never a 5xx,
and every error is an OpenAI error object."""

from __future__ import annotations

import time

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode

from tests.server.conftest import live_server

FUZZ_SECONDS = 15  # hard bound on the whole fuzz run


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir):
    # Small limits keep each generated request quick; the time limit bounds any that is not.
    with live_server(tiny_model_dir, api_key="sk-fuzz", max_tokens_limit=8, max_n=4, max_prompts=4,
                     request_timeout=2.0, max_body_bytes=256 << 10) as s:
        yield s


def test_fuzz_schema_never_5xx(fuzz_server):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models", "GET /health"} <= labels
    strategy = st.one_of([op.as_strategy(generation_mode=mode) for op in operations
                          for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)])
    headers = {"Authorization": "Bearer sk-fuzz"}
    stop_at = time.monotonic() + FUZZ_SECONDS
    seen: dict[int, int] = {}

    @hypothesis.settings(max_examples=100, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
    @given(case=strategy)
    def check(case):
        if time.monotonic() > stop_at:
            return
        response = case.call(base_url=fuzz_server.url, headers=headers, timeout=15)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.operation.label, case.body, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, response.text[:500]

    check()
    print('statuses seen:', seen)
    assert sum(n for status, n in seen.items() if status < 300) > 5, seen  # it did generate, not only refuse
    assert sum(n for status, n in seen.items() if status >= 400) > 5, seen
    health = fuzz_server.wait_idle(0)
    assert health["pending_requests"] == 0 and health["kv_blocks_used"] == 0
