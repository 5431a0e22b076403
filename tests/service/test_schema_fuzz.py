"""schemathesis against the served OpenAPI schema: generated requests never get a 5xx.

A real uvicorn server (the deployed entry point) answers a few thousand requests that
schemathesis generates from /openapi.json, schema-valid ones and, for every operation
that takes a body or a path parameter, deliberately invalid ones; afterwards its log
must hold no traceback, i.e. no unhandled exception.
"""

from __future__ import annotations

import uuid

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from tests.servers import UvicornService  # noqa: E402
from tests.service.conftest import delete_prefix, server_settings  # noqa: E402

EXAMPLES_PER_OPERATION = 250  # valid and invalid requests per operation (each mode)
# Operations whose only inputs are credential headers get fewer: the catalogue writes take
# the same headers (authorization, x-api-key) and fuzz them with the full share.
EXAMPLES_FOR_HEADERS_ONLY = 50


@pytest.fixture(scope="module")
def fuzzed_server(exported_bundle, tmp_path_factory, shared_redis):
    models_dir, _ = exported_bundle
    prefix = f"fuzz{uuid.uuid4().hex[:16]}"
    log = tmp_path_factory.mktemp("fuzz") / "uvicorn.log"
    service = UvicornService(server_settings(models_dir, prefix), log_path=log)
    service.start(timeout=60)
    yield service
    service.stop()
    delete_prefix(shared_redis, prefix)
    text = service.log()
    assert "Traceback" not in text and "Exception in ASGI" not in text, text[-5000:]


@pytest.fixture(scope="module")
def api_schema(fuzzed_server):
    return schemathesis.openapi.from_url(f"{fuzzed_server.url}/openapi.json")


def examples_for(operation) -> int:
    takes_more = operation.body or operation.path_parameters or operation.query
    return EXAMPLES_PER_OPERATION if takes_more else EXAMPLES_FOR_HEADERS_ONLY


def fuzz(operation, mode, sent: dict[str, int]) -> None:
    """Send up to ``examples_for(operation)`` requests generated in ``mode`` to one
    operation."""
    label = f"{operation.method.upper()} {operation.path} ({mode.value})"
    sent[label] = 0

    @settings(
        max_examples=examples_for(operation),
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def call(case):
        response = case.call(timeout=30)
        sent[label] += 1
        assert response.status_code < 500, (label, case.body, response.text)

    call()


@pytest.mark.slow
def test_generated_requests_never_get_a_server_error(api_schema):
    # Driven through Hypothesis directly: schemathesis' lazy pytest fixture loader does not
    # work with pytest 9.
    sent: dict[str, int] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        fuzz(operation, schemathesis.GenerationMode.POSITIVE, sent)
        if operation.body or operation.path_parameters:  # something to get wrong
            fuzz(operation, schemathesis.GenerationMode.NEGATIVE, sent)
    assert sum(sent.values()) >= 2000, sent
