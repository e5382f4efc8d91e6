"""What an attacker sends gets a 4xx, never a 500: non-ASCII digits, shapes numpy cannot hold, odd request
targets, and values echoed back in errors only as a short prefix (issue 19's probe, each case)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service import codec, v2
from service.auth import hash_key
from service.errors import ServiceError
from service.operations import OPERATIONS
from tests.service_helpers import DEFAULT_MODEL, digits_rows, serving

PROPERTY = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROW = digits_rows(1)[0].tolist()


def refused_cleanly(call) -> ServiceError | None:
    """Run `call`; a ServiceError must be a 4xx with a message of bounded length. Anything else fails."""
    try:
        call()
    except ServiceError as e:
        assert 400 <= e.status < 500 and e.message and len(e.message) < 1000, (e.status, e.message[:200])
        return e
    return None


@PROPERTY
@given(st.text())
@example("²")
@example("١")
@example("٣")
@example("9" * 5000)
@example("0")
@example("-1")
@example(" 1")
@example("+1")
def test_versions_from_all_of_unicode_are_ascii_numbers_or_a_404(text):
    error = refused_cleanly(lambda: v2.parse_version(text))
    if error is None:
        assert text.isascii() and text.isdigit() and int(text) >= 1
    else:
        assert error.status == 404


@PROPERTY
@given(st.text(), st.binary(max_size=40))
@example("²", b"{}")
@example("١", b'{"inputs": []}')
@example("9" * 5000, b"{}")
@example("1_0", b"{}" * 6)
def test_header_lengths_from_all_of_unicode_parse_or_answer_400(length, body):
    op = OPERATIONS["encode"]
    error = refused_cleanly(lambda: v2.parse_infer(body, length, "digits.encode", op))
    if not (length.isascii() and length.isdigit()):
        assert error is not None and error.status == 400


@PROPERTY
@given(st.lists(st.integers(), max_size=80))
@example([1] * 65)
@example([0, 2**62, 2**62])
@example([2**70])
@example([1, 2**63])
@example([0] * 9)
def test_v2_shapes_of_any_size_parse_or_answer_4xx(shape):
    doc = {"inputs": [{"name": "inputs", "datatype": "FP32", "shape": shape, "data": [0.5]}]}
    body = json.dumps(doc).encode()  # the standard library writes integers of any size, as clients may
    refused_cleanly(lambda: v2.parse_infer(body, None, "digits.encode", OPERATIONS["encode"]))


@pytest.mark.parametrize("dims", [9, 32, 65])
def test_npy_headers_with_too_many_dimensions_answer_4xx(dims):
    shape = "(" + ", ".join(["1"] * dims) + ",)"
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".encode("latin1")
    header += b" " * (-(10 + len(header) + 1) % 64) + b"\n"
    body = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x00\x00\x80\x3f"
    error = refused_cleanly(lambda: codec.parse_npy(body))
    assert error is not None and "dimensions" in error.message


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copytree(DEFAULT_MODEL, tmp_path / "digits" / "1")
    return tmp_path


@pytest.mark.anyio
async def test_every_case_of_the_probe_answers_4xx_over_http(repo):
    async with serving(repo, reload_interval=0) as (_, client):
        infer = {"inputs": [{"name": "inputs", "datatype": "FP32", "shape": [1, 64], "data": ROW}]}
        for version, status in (("%C2%B2", 400), (quote("١"), 400), (quote("٣"), 400), ("9" * 5000, 400), ("1", 200)):
            r = await client.post(f"/v2/models/digits.encode/versions/{version}/infer", json=infer)
            assert r.status_code == status, (version, r.text[:200])
        for length in ("²", "١", "1_0", " 5"):
            r = await client.post("/v2/models/digits.encode/infer", content=b'{"inputs": []}',
                                  headers={"Inference-Header-Content-Length": length.encode()})
            assert r.status_code == 400 and "ASCII digits" in r.json()["error"], (length, r.text)
        for shape in ([1] * 65, [0, 2**62, 2**62], [2**70, 64]):
            body = {"inputs": [{"name": "inputs", "datatype": "FP32", "shape": shape, "data": [0.5]}]}
            r = await client.post("/v2/models/digits.encode/infer", json=body)
            assert r.status_code == 400 and len(r.text) < 600, r.text[:300]
        r = await client.post("/encode", json={"inputs": [ROW], "label": "x" * 4_000_000})
        assert 400 <= r.status_code < 500 and len(r.content) < 1000, r.text[:300]
        r = await client.post("/v2/models/" + "m" * 60_000 + ".encode/infer", json=infer)
        assert 400 <= r.status_code < 500 and len(r.content) < 1000, r.text[:300]
        assert (await client.post("/encode", json={"inputs": [ROW]})).status_code == 200  # still serving


async def asgi_status(app, method: str, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    """Call the app with a raw request target (httpx cannot send `*`), returning the status it answers."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return next(m["status"] for m in sent if m["type"] == "http.response.start")


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["GET", "OPTIONS", "POST"])
@pytest.mark.parametrize("target", ["*", "", "//", "/v2", "/v2/"])
async def test_odd_request_targets_with_keys_on_answer_4xx(repo, tmp_path, method, target):
    keys = tmp_path / "keys"
    keys.write_text(f"{hash_key('k' * 32)} tester\n")
    async with serving(repo, reload_interval=0, api_keys_file=keys) as (app, _):
        status = await asgi_status(app, method, target, [])
        assert 400 <= status < 500, (method, target, status)
        good = [(b"authorization", b"Bearer " + b"k" * 32)]
        status = await asgi_status(app, method, target, good)
        assert status < 500, (method, target, status)
