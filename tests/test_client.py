"""vaeclient against a real `vae-serve` process: every operation, chunking to the server's row limit,
the server's errors, API keys, and retries that honour 503's Retry-After and never repeat a 4xx."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from bench.server import Server
from service.auth import hash_key
from tests.service_helpers import DEFAULT_MODEL, Reference, digits_rows, metric
from vaeclient import APIError, AsyncClient, Client, EncodeResult

REPO_ROOT = DEFAULT_MODEL.parents[1]


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """A server that takes at most 16 rows per request, so the client must chunk."""
    s = Server(model_dir=REPO_ROOT, env={"VAE_MAX_ROWS": "16", "VAE_MAX_DECODE_ROWS": "64"})
    yield s
    s.stop()


def native(server: Server, path: str, body: dict) -> dict:
    r = httpx.post(server.url + path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_every_operation_matches_the_server_and_chunks_to_its_limit(server):
    ref = Reference()
    x = digits_rows(50, start=300)
    with Client(server.url) as vae:
        enc = vae.encode(x)
        assert isinstance(enc, EncodeResult) and enc.model == "digits" and enc.version == 1
        assert enc.mean.shape == (50, 8) and enc.mean.dtype == np.float32 and enc.seed is None
        np.testing.assert_allclose(enc.mean, ref.encode(x)[0], atol=1e-5)
        np.testing.assert_array_equal(enc.z, enc.mean)
        np.testing.assert_allclose(vae.decode(enc.mean).outputs, ref.decode(enc.mean), atol=1e-4)
        rec = vae.reconstruct(x[:3], model="digits", version=1)
        np.testing.assert_allclose(rec.outputs, native(server, "/reconstruct", {"inputs": x[:3].tolist()})["outputs"],
                                   atol=1e-4)
        scores = vae.anomaly_score(x, samples=8)  # 64 decode rows per request: chunks of 8 rows
        expected = np.concatenate([native(server, "/anomaly-score", {"inputs": x[i : i + 8].tolist(), "samples": 8})
                                   ["score"] for i in range(0, 50, 8)])
        np.testing.assert_allclose(scores.score, expected, rtol=1e-9)
        assert scores.is_anomaly.dtype == np.bool_ and scores.samples == 8 and scores.threshold > 0
        one = vae.sample(4, seed=9, temperature=0.5)
        np.testing.assert_allclose(one.outputs, native(server, "/sample", {"n": 4, "seed": 9, "temperature": 0.5})
                                   ["outputs"], atol=1e-5)
        many = vae.sample(40, seed=100)  # three chunks, seeds 100, 101, 102
        assert many.outputs.shape == (40, 64) and many.seed == 100
        np.testing.assert_allclose(many.latents[16:32], native(server, "/sample", {"n": 16, "seed": 101})["latents"])
        drawn = vae.encode(x, sample=True)  # chunked noise: reproducible from the seed it reports
        np.testing.assert_array_equal(vae.encode(x, sample=True, seed=drawn.seed).z, drawn.z)
        path = vae.interpolate(x[0], x[1], steps=5, method="slerp")
        assert path.t.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and path.outputs.shape == (5, 64)
        back = vae.interpolate(path.latents[0], path.latents[-1], steps=5, method="slerp", latent=True)
        np.testing.assert_allclose(back.latents, path.latents, atol=1e-5)
        assert vae.ready() and vae.models()["limits"]["max_rows"] == 16


def test_errors_carry_the_servers_code_message_and_field_and_are_not_retried(server):
    before = httpx.get(server.url + "/metrics").text
    with Client(server.url, retries=5) as vae:
        with pytest.raises(APIError) as err:
            vae.encode(np.zeros((2, 63)))
        assert err.value.status == 422 and err.value.code == "invalid_input" and err.value.field == "inputs"
        assert "64 values" in err.value.message
        with pytest.raises(APIError) as err:
            vae.decode(np.zeros((1, 8)), model="nope")
        assert (err.value.status, err.value.code, err.value.field) == (404, "model_not_found", "model")
    after = httpx.get(server.url + "/metrics").text
    assert metric(after, "vae_requests_total", status="422") - metric(before, "vae_requests_total", status="422") == 1
    assert metric(after, "vae_requests_total", status="404") - metric(before, "vae_requests_total", status="404") == 1
    with Client("http://127.0.0.1:9", retries=1, timeout=1) as vae, pytest.raises(httpx.ConnectError):
        vae.encode(np.zeros((1, 64)))


def test_api_key_option(tmp_path):
    (tmp_path / "keys").write_text(hash_key("sesame") + " tests\n")
    server = Server(model_dir=REPO_ROOT, env={"VAE_API_KEYS_FILE": str(tmp_path / "keys")})
    try:
        with Client(server.url) as vae, pytest.raises(APIError) as err:
            vae.encode(np.zeros((1, 64)))
        assert err.value.status == 401 and err.value.code == "unauthorized"
        with Client(server.url, api_key="sesame") as vae:
            assert vae.encode(np.zeros((1, 64))).mean.shape == (1, 8)
    finally:
        server.stop()


def test_overloaded_requests_are_retried_after_503_until_they_succeed():
    """A queue of one request's rows: concurrent heavy requests get 503s, and the client waits them out."""
    server = Server(model_dir=REPO_ROOT, env={"VAE_MAX_ROWS": "64", "VAE_MAX_QUEUE_ROWS": "64",
                                              "VAE_RETRY_AFTER": "1"})
    x = digits_rows(64)
    try:
        async def burst() -> list:
            async with AsyncClient(server.url, retries=50, max_retry_wait=0.1) as vae:
                return await asyncio.gather(*(vae.anomaly_score(x, samples=400) for _ in range(12)))

        for _ in range(5):  # a burst nearly always overloads it at once; try a few before calling it untested
            results = asyncio.run(burst())
            text = httpx.get(server.url + "/metrics").text
            if metric(text, "vae_requests_total", status="503"):
                break
        assert metric(text, "vae_requests_total", status="503") > 0, "no 503 happened: the retry was not exercised"
        assert metric(text, "vae_requests_total", endpoint="anomaly-score", status="200") == 12 * (_ + 1)
        np.testing.assert_array_equal(results[0].score, results[-1].score)
    finally:
        server.stop()


def test_retry_after_is_honoured_and_4xx_is_final():
    calls: list[float] = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(time.monotonic())
        if request.url.path == "/models":
            return httpx.Response(200, json={"limits": {"max_rows": 8, "max_samples": 10, "max_decode_rows": 80,
                                                        "max_steps": 8}})
        if len(calls) < 4:
            return httpx.Response(503, headers={"Retry-After": "0.2"},
                                  json={"error": {"code": "overloaded", "message": "busy", "field": None}})
        return httpx.Response(422, json={"error": {"code": "invalid_input", "message": "bad", "field": "inputs"}})

    with Client("http://test", transport=httpx.MockTransport(answer), retries=5) as vae, \
            pytest.raises(APIError) as err:
        vae.encode(np.zeros((1, 4)))
    assert err.value.code == "invalid_input" and len(calls) == 4  # models, two 503s, one 422: not retried
    assert all(b - a >= 0.19 for a, b in zip(calls[1:], calls[2:], strict=False))
    calls.clear()
    with Client("http://test", transport=httpx.MockTransport(answer), retries=1) as vae, \
            pytest.raises(APIError) as err:
        vae.encode(np.zeros((1, 4)))
    assert err.value.status == 503 and err.value.retry_after == 0.2  # retries spent: the 503 surfaces
