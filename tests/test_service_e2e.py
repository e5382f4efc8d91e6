"""A real `python -m service` process on 127.0.0.1, driven over HTTP."""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import signal
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from bench.server import Server
from tests.service_helpers import DEFAULT_MODEL, Reference, digits_rows


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(DEFAULT_MODEL, root / "digits" / "1")
    with Server(model_dir=root, log=root / "server.log") as running:
        yield running


def test_endpoints_over_real_http(server):
    url = server.url
    ref = Reference()
    x = digits_rows(4)
    with httpx.Client(base_url=url, timeout=10) as client:
        enc = client.post("/encode", json={"inputs": x.tolist()}).json()
        np.testing.assert_allclose(enc["mean"], ref.encode(x)[0], atol=1e-4)
        assert client.post("/sample", json={"n": 2, "seed": 1}).status_code == 200
        bad = client.post("/encode", content=b"{", headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "malformed_body"
        assert client.get("/docs").status_code == 200


def test_concurrent_callers_over_real_http(server):
    url = server.url
    ref = Reference()
    x = digits_rows(300)

    async def run() -> None:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
            responses = await asyncio.gather(
                *(client.post("/encode", json={"inputs": x[i : i + 2].tolist()}) for i in range(256)))
        for i, r in enumerate(responses):
            assert r.status_code == 200
            np.testing.assert_allclose(r.json()["mean"], ref.encode(x[i : i + 2])[0], atol=1e-4)

    asyncio.run(run())
    text = httpx.get(f"{url}/metrics").text
    assert 'vae_requests_total{endpoint="encode",model="digits",status="200",version="1"}' in text


def test_sigterm_lets_in_flight_requests_finish(tmp_path):
    shutil.copytree(DEFAULT_MODEL, tmp_path / "digits" / "1")
    env = {"VAE_MAX_SAMPLES": "1000", "VAE_MAX_DECODE_ROWS": "1000000"}
    with Server(model_dir=tmp_path, env=env, log=tmp_path / "server.log") as server:
        url, proc = server.url, server.proc
        assert proc is not None
        heavy = {"inputs": digits_rows(400).tolist(), "samples": 1000}  # 400k decoder rows: well under a second

        def call() -> tuple[httpx.Response, float]:
            response = httpx.post(f"{url}/anomaly-score", json=heavy, timeout=60)
            return response, time.monotonic()

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            future = pool.submit(call)
            time.sleep(0.15)  # the request is being served
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            response, finished = future.result(60)
        assert finished > signalled, "the request ended before SIGTERM: it proves nothing"
        assert response.status_code == 200 and len(response.json()["score"]) == 400
        # uvicorn finishes in-flight work, then exits by re-raising the signal it caught.
        assert proc.wait(30) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health/live", timeout=1)
