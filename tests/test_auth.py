"""API keys: every inference path needs one when keys are on, health stays open, keys never logged."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest

from bench.server import Server
from service.__main__ import main as serve_main
from service.auth import KeyFileError, KeyRing, hash_key, new_key_main
from service.settings import get_settings
from tests.service_helpers import DEFAULT_MODEL, digits_rows, metric, npy_bytes, serving

KEY, OTHER = "k-" + "a" * 40, "k-" + "b" * 40
ROW = digits_rows(1).tolist()
INFERENCE = [  # every inference path: native JSON, native .npy, v2, admin
    ("POST", "/encode", {"json": {"inputs": ROW}}),
    ("POST", "/encode", {"content": npy_bytes(np.asarray(ROW, dtype=np.float32)),
                         "headers": {"Content-Type": "application/x-npy"}}),
    ("POST", "/decode", {"json": {"latents": [[0.0] * 8]}}),
    ("POST", "/reconstruct", {"json": {"inputs": ROW}}),
    ("POST", "/sample", {"json": {"n": 1, "seed": 1}}),
    ("POST", "/interpolate", {"json": {"start": ROW[0], "end": ROW[0], "steps": 2}}),
    ("POST", "/anomaly-score", {"json": {"inputs": ROW}}),
    ("POST", "/v2/models/digits.encode/infer",
     {"json": {"inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32", "data": ROW[0]}]}}),
    ("GET", "/v2/models/digits.encode", {}),
    ("GET", "/v2/models/digits.encode/config", {}),  # Triton's extensions
    ("POST", "/v2/repository/index", {}),
    ("GET", "/v2/models/stats", {}),
    ("GET", "/models", {}),
    ("GET", "/models/digits", {}),
    ("POST", "/admin/reload", {}),
]


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(f"# who may call\n{hash_key(KEY)} pipeline\n\n{hash_key(OTHER).upper()}\n")
    return path


def with_headers(kwargs: dict, headers: dict) -> dict:
    return {**kwargs, "headers": {**kwargs.get("headers", {}), **headers}}


@pytest.mark.anyio
async def test_every_inference_path_needs_a_key(keys_file):
    async with serving(DEFAULT_MODEL.parents[1], api_keys_file=keys_file, reload_interval=0) as (_, client):
        for method, path, kwargs in INFERENCE:
            refused = []
            for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"},
                            {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}):
                r = await client.request(method, path, **with_headers(kwargs, headers))
                assert r.status_code == 401, (path, headers, r.text)
                assert r.headers["WWW-Authenticate"] == "Bearer"
                refused.append(r.content)
            assert len(set(refused)) == 1, "a missing and a wrong key must look the same"
            error = r.json()["error"]
            assert (error if path.startswith("/v2") else error["message"]).startswith("a valid API key is required")
            for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": OTHER},
                            {"authorization": f"bearer {KEY}"}):
                r = await client.request(method, path, **with_headers(kwargs, headers))
                assert r.status_code == 200, (path, headers, r.text)
        for path in ("/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready", "/metrics",
                     "/openapi.json", "/docs", "/redoc", "/docs-assets/redoc.standalone.js"):
            assert (await client.get(path)).status_code == 200, path
        text = (await client.get("/metrics")).text
    assert metric(text, "vae_requests_total", endpoint="encode", status="401") == 10
    assert metric(text, "vae_requests_total", endpoint="v2", status="401") == 25
    assert metric(text, "vae_requests_total", endpoint="admin", status="401") == 5
    assert metric(text, "vae_requests_total", endpoint="encode", status="200") == 6


@pytest.mark.anyio
async def test_metrics_and_docs_follow_their_settings(keys_file):
    async with serving(DEFAULT_MODEL.parents[1], api_keys_file=keys_file, protect_metrics=True, protect_docs=True,
                       reload_interval=0) as (_, client):
        for path in ("/metrics", "/docs", "/openapi.json", "/redoc", "/docs-assets/swagger-ui.css"):
            assert (await client.get(path)).status_code == 401, path
            assert (await client.get(path, headers={"X-API-Key": KEY})).status_code == 200, path
        assert (await client.get("/health/ready")).status_code == 200


@pytest.mark.anyio
async def test_keys_off_by_default():
    async with serving(DEFAULT_MODEL.parents[1], reload_interval=0) as (_, client):
        assert (await client.post("/encode", json={"inputs": ROW})).status_code == 200
        assert (await client.post("/admin/reload")).status_code == 200


def test_key_file_format(tmp_path):
    good = tmp_path / "keys"
    good.write_text(f"{hash_key('x')} a\n# comment\n{hash_key('y')}\n")
    ring = KeyRing.from_file(good)
    assert len(ring) == 2 and ring.check("x") == "a" and ring.check("y") == "key3" and ring.check("z") is None
    assert ring.check("") is None and ring.check(None) is None
    for text, fragment in [("x" * 64 + "\n", "line 1"), ("", "holds no key"), ("# only a comment\n", "holds no key"),
                           ("secret-key-in-plain-text\n", "store hashes")]:
        good.write_text(text)
        with pytest.raises(KeyFileError, match=fragment):
            KeyRing.from_file(good)
    with pytest.raises(KeyFileError, match="No such file"):
        KeyRing.from_file(tmp_path / "missing")


def test_new_key_prints_a_key_and_its_line(capsys, tmp_path):
    assert new_key_main(["--name", "billing"]) == 0
    out = capsys.readouterr().out.splitlines()
    key = out[0].rsplit(" ", 1)[1]
    line = out[1].split(": ", 1)[1]
    (tmp_path / "keys").write_text(line + "\n")
    assert KeyRing.from_file(tmp_path / "keys").check(key) == "billing"


def test_service_refuses_to_start_on_an_unusable_keys_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "keys").write_text("not a hash\n")
    monkeypatch.setenv("VAE_API_KEYS_FILE", str(tmp_path / "keys"))
    get_settings.cache_clear()
    try:
        assert serve_main([]) == 2
    finally:
        get_settings.cache_clear()
    assert "store hashes" in capsys.readouterr().err


def test_keys_never_reach_the_logs(keys_file, tmp_path):
    log = tmp_path / "server.log"
    server = Server(model_dir=DEFAULT_MODEL.parents[1], log=log,
                    env={"VAE_API_KEYS_FILE": str(keys_file), "VAE_ACCESS_LOG": "true", "VAE_LOG_LEVEL": "debug"})
    try:
        for headers in ({"Authorization": f"Bearer {KEY}"}, {"X-API-Key": OTHER}, {"X-API-Key": KEY + "x"}):
            httpx.post(f"{server.url}/encode", json={"inputs": ROW}, headers=headers)
        r = httpx.post(f"{server.url}/encode", json={"inputs": ROW})
        assert r.status_code == 401
    finally:
        server.stop()
    text = log.read_text()
    assert "POST /encode" in text  # the access log was on
    assert KEY not in text and OTHER not in text and KEY[:12] not in text
    assert io.StringIO(text).read().count("401") >= 2
