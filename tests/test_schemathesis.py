"""schemathesis against a real server on 127.0.0.1, from its own /openapi.json: positive and negative
data for every documented operation; no 5xx, no hang, and every error in the documented body.

Hypothesis drives each operation's schemathesis strategy directly (schemathesis' lazy pytest
fixture loader does not run under pytest 9)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from bench.server import Server
from tests.service_helpers import DEFAULT_MODEL

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402 - after the skip
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 25  # per operation and generation mode: ~1,000 requests, about half a minute
TIMEOUT_S = 5  # the server's VAE_REQUEST_TIMEOUT: any answer must come within it (plus slack)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server(model_dir=DEFAULT_MODEL.parents[1], env={"VAE_REQUEST_TIMEOUT": str(TIMEOUT_S),
                                                        "VAE_RELOAD_INTERVAL": "0"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def operations(server: Server) -> list:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def check(case, server: Server) -> None:
    started = time.monotonic()
    response = case.call(base_url=server.url, timeout=TIMEOUT_S + 10)
    assert time.monotonic() - started < TIMEOUT_S + 5, "no answer within the request timeout"
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        error = response.json()["error"]
        if case.path.startswith("/v2"):
            assert isinstance(error, str) and error, response.text
        else:
            assert set(error) == {"code", "message", "field"} and error["message"], response.text


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_no_5xx_no_hang_and_every_error_is_documented(operations, server, mode):
    assert len(operations) >= 20  # the native and the v2 API, models, health, admin, metrics
    tried = set()
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            check(case, server)

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid: an operation with no parameters or body
            assert mode == GenerationMode.NEGATIVE
            continue
        tried.add(operation.path)
    assert {"/encode", "/anomaly-score", "/v2/models/{name}/infer"} <= tried


SPEC = Path(__file__).parent / "specs" / "open-inference-protocol" / "open_inference_rest.yaml"
V2_MODELS = [f"digits.{op}" for op in ("encode", "decode", "reconstruct", "sample", "interpolate", "anomaly-score")]


@pytest.fixture(scope="module")
def spec_operations(server: Server) -> list:
    """The protocol's own OpenAPI document, its paths in OpenAPI's templating and the path parameters
    pinned to the shipped digits model's v2 names and version."""
    import yaml

    doc = yaml.safe_load(SPEC.read_text().replace("${", "{"))
    for item in doc["paths"].values():
        for parameter in item.get("parameters", []):
            parameter["schema"] = {"type": "string",
                                   "enum": V2_MODELS if parameter["name"] == "MODEL_NAME" else ["1"]}
    schema = schemathesis.openapi.from_dict(doc)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_the_protocols_own_openapi_document_holds(spec_operations, server, mode):
    """Positive: requests the document allows get only the statuses, content types and bodies it
    documents. Negative: requests it does not allow (an unknown model among them, which the document
    gives no status for) get a 4xx with the protocol's error body, never a 5xx."""
    checks = [not_a_server_error]
    if mode == GenerationMode.POSITIVE:
        checks += [status_code_conformance, content_type_conformance, response_schema_conformance]
    assert {op.path for op in spec_operations} == {
        "/v2/health/live", "/v2/health/ready", "/v2/", "/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/ready",
        "/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}", "/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/infer"}
    for operation in spec_operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES * 2, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case) -> None:
            response = case.call(base_url=server.url, timeout=TIMEOUT_S + 10)
            case.validate_response(response, checks=checks)
            if response.status_code >= 400:
                assert 400 <= response.status_code < 500 and isinstance(response.json()["error"], str), response.text

        try:
            run()
        except Unsatisfiable:  # nothing to make invalid: an operation with no parameters or body
            assert mode == GenerationMode.NEGATIVE
