"""Many callers at once: batches form, nobody gets another's rows, and overload fails cleanly."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.service_helpers import DEFAULT_MODEL, Gate, Reference, digits_rows, metric, serving

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(DEFAULT_MODEL, root / "digits" / "1")
    return root


async def test_concurrent_callers_are_batched_and_each_gets_its_own_rows(repo):
    ref = Reference()
    x = digits_rows(200, start=0)
    async with serving(repo) as (app, client):
        encoder = app.state.vae.repository.get(None, None).encoder
        gate = Gate(encoder.fn)
        encoder.fn = gate

        async def call(i: int):
            rows = x[i : i + 1 + i % 3]
            r = await client.post("/encode", json={"inputs": rows.tolist()})
            return rows, r

        tasks = [asyncio.create_task(call(i)) for i in range(150)]
        await asyncio.to_thread(gate.entered.wait, 10)
        await asyncio.sleep(0.2)  # the rest queue behind the first batch
        gate.open.set()
        results = await asyncio.gather(*tasks)
        for rows, r in results:
            assert r.status_code == 200
            np.testing.assert_allclose(r.json()["mean"], ref.encode(rows)[0], atol=1e-4)
        text = (await client.get("/metrics")).text
    batches = metric(text, "vae_batch_size_rows_count", network="encoder")
    rows_total = metric(text, "vae_batch_size_rows_sum", network="encoder")
    assert rows_total == sum(1 + i % 3 for i in range(150))
    assert batches < 150 and rows_total / batches > 1  # batches larger than one request formed
    assert metric(text, "vae_batch_size_rows_bucket", network="encoder", le="1.0") < batches


async def test_seeded_sampling_is_reproducible_under_concurrency(repo):
    async with serving(repo, max_batch_delay_ms=5) as (_, client):
        alone = {s: (await client.post("/sample", json={"n": 3, "seed": s})).json() for s in range(4)}
        crowd = await asyncio.gather(*(client.post("/sample", json={"n": 3, "seed": i % 4}) for i in range(64)))
        for i, r in enumerate(crowd):
            assert r.json() == alone[i % 4]
        encoded = await asyncio.gather(*(client.post("/encode", json={"inputs": digits_rows(2).tolist(),
                                                                      "sample": True, "seed": 5}) for _ in range(32)))
        assert len({r.text for r in encoded}) == 1


async def test_a_request_past_the_timeout_gets_504_and_is_not_computed(repo):
    async with serving(repo, request_timeout=0.3) as (app, client):
        encoder = app.state.vae.repository.get(None, None).encoder
        gate = Gate(encoder.fn)
        encoder.fn = gate
        first = asyncio.create_task(client.post("/encode", json={"inputs": digits_rows(1).tolist()}))
        await asyncio.to_thread(gate.entered.wait, 10)
        late = await client.post("/encode", json={"inputs": digits_rows(7).tolist()})
        assert late.status_code == 504
        assert "VAE_REQUEST_TIMEOUT" in late.json()["error"]["message"]
        gate.open.set()
        assert (await first).status_code == 504  # it also outlived its timeout while held
        ok = await client.post("/encode", json={"inputs": digits_rows(2).tolist()})
        assert ok.status_code == 200
        assert gate.rows == 1 + 2  # the 7 timed-out rows never reached the model
        text = (await client.get("/metrics")).text
    assert metric(text, "vae_requests_total", endpoint="encode", status="504") == 2


async def test_a_full_queue_gets_503_with_retry_after(repo):
    async with serving(repo, max_queue_rows=40, max_rows=32, retry_after=3) as (app, client):
        encoder = app.state.vae.repository.get(None, None).encoder
        gate = Gate(encoder.fn)
        encoder.fn = gate
        body = {"inputs": digits_rows(20).tolist()}
        held = [asyncio.create_task(client.post("/encode", json=body))]
        await asyncio.to_thread(gate.entered.wait, 10)
        held += [asyncio.create_task(client.post("/encode", json=body)) for _ in range(2)]
        await asyncio.sleep(0.2)
        r = await client.post("/encode", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == "overloaded"
        gate.open.set()
        assert [t.status_code for t in await asyncio.gather(*held)] == [200, 200, 200]


async def test_a_failing_batch_fails_only_its_own_requests(repo):
    async with serving(repo) as (app, client):
        decoder = app.state.vae.repository.get(None, None).decoder
        real = decoder.fn
        calls = {"n": 0}

        def flaky(z):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("device fell over")
            return real(z)

        decoder.fn = flaky
        r = await client.post("/decode", json={"latents": [[0.0] * 8]})
        assert r.status_code == 500
        assert "device fell over" in r.json()["error"]["message"]
        assert r.json()["error"]["code"] == "inference_failed"
        assert (await client.post("/decode", json={"latents": [[0.0] * 8]})).status_code == 200
        assert (await client.post("/encode", json={"inputs": digits_rows(1).tolist()})).status_code == 200


async def test_metrics_after_traffic(repo):
    async with serving(repo) as (_, client):
        x = digits_rows(3).tolist()
        await client.post("/encode", json={"inputs": x})
        await client.post("/anomaly-score", json={"inputs": x + [[16.0] * 64]})
        await client.post("/encode", json={"inputs": "bad"})
        await client.post("/encode", json={"inputs": x, "model": "nope"})
        r = await client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, "vae_requests_total", endpoint="encode", status="200", model="digits", version="1") == 1
    assert metric(text, "vae_requests_total", endpoint="encode", status="422") == 1
    assert metric(text, "vae_requests_total", endpoint="encode", status="404") == 1
    assert metric(text, "vae_request_duration_seconds_count", endpoint="anomaly-score") == 1
    assert metric(text, "vae_rows_processed_total", network="encoder") == 3 + 4
    assert metric(text, "vae_anomaly_rows_scored_total", model="digits") == 4
    assert metric(text, "vae_anomaly_rows_flagged_total", model="digits") >= 1
    assert metric(text, "vae_model_info", model="digits", version="1", device="cpu") == 1
    for name in ("vae_queue_wait_seconds_count", "vae_inference_seconds_count", "vae_queue_depth_rows",
                 "vae_model_load_failures_total"):
        assert name in text or name.replace("_total", "") in text, name
