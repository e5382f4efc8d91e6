"""Loading the repository: broken or tampered versions are refused, the rest served; runtimes agree."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from service.runtime import cuda_available
from tests.service_helpers import copy_model, digits_rows, serving

pytestmark = pytest.mark.anyio


async def test_broken_versions_are_refused_and_the_rest_served(tmp_path, caplog):
    copy_model(tmp_path, "digits", 1)
    copy_model(tmp_path, "digits", 2)
    tampered = copy_model(tmp_path, "digits", 3)
    (tampered / "decoder.onnx").write_bytes(b"\x00" * 100)
    misplaced = copy_model(tmp_path, "other", 1)
    manifest = json.loads((misplaced / "model.json").read_text())
    manifest["name"] = "digits"
    (misplaced / "model.json").write_text(json.dumps(manifest))
    (tmp_path / "digits" / "notes").mkdir()  # not a version: ignored
    caplog.set_level(logging.ERROR, logger="vaeserve")
    async with serving(tmp_path) as (_, client):
        listing = (await client.get("/models")).json()
        assert listing["models"] == [{"name": "digits", "versions": [1, 2], "latest": 2}]
        assert "sha256" in listing["refused"]["digits/3"]
        assert "lives in other/1" in listing["refused"]["other/1"]
        r = await client.post("/encode", json={"inputs": digits_rows(1).tolist()})
        assert r.json()["version"] == 2  # latest loaded version
        r = await client.post("/encode", json={"inputs": digits_rows(1).tolist(), "version": 3})
        assert r.status_code == 404
        text = (await client.get("/metrics")).text
    assert 'vae_model_load_failures_total{model="digits",version="3"} 1.0' in text
    assert any("refusing model digits/3" in rec.message for rec in caplog.records)


async def test_ready_is_503_without_the_default_model(tmp_path):
    copy_model(tmp_path, "other", 1)
    async with serving(tmp_path) as (_, client):
        r = await client.get("/health/ready")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "VAE_DEFAULT_MODEL" in r.json()["error"]["message"]
        assert (await client.get("/health/live")).status_code == 200
        ok = await client.post("/encode", json={"inputs": digits_rows(1).tolist(), "model": "other"})
        assert ok.status_code == 200


async def test_an_empty_or_missing_repository_is_not_ready(tmp_path):
    async with serving(tmp_path / "missing") as (_, client):
        assert (await client.get("/health/ready")).status_code == 503
        r = await client.post("/encode", json={"inputs": digits_rows(1).tolist()})
        assert r.status_code == 404


async def test_runtimes_agree_within_tolerance(tmp_path):
    copy_model(tmp_path, "digits", 1)
    x = digits_rows(16, start=40)
    z = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    results = {}
    for runtime in ("onnx", "torchscript"):
        async with serving(tmp_path, runtime=runtime) as (_, client):
            info = (await client.get("/models/digits")).json()
            assert info["runtime"] == runtime
            enc = (await client.post("/encode", json={"inputs": x.tolist()})).json()
            dec = (await client.post("/decode", json={"latents": z.tolist()})).json()
            results[runtime] = (np.asarray(enc["mean"]), np.asarray(enc["logvar"]), np.asarray(dec["outputs"]) / 16)
    for a, b in zip(results["onnx"], results["torchscript"], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


async def test_auto_runtime_measures_both_and_picks_the_faster(tmp_path):
    copy_model(tmp_path, "digits", 1)
    async with serving(tmp_path, runtime="auto") as (_, client):
        info = (await client.get("/models/digits")).json()
    timings = info["runtime_timings_us"]
    assert set(timings) == {"onnx", "torchscript"}
    assert info["runtime"] == min(timings, key=timings.get)


@pytest.mark.cuda
@pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("runtime", ["torchscript", "onnx"])
async def test_cuda_matches_cpu(tmp_path, runtime):
    if runtime == "onnx":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime-gpu is not installed")
    copy_model(tmp_path, "digits", 1)
    x = digits_rows(64).tolist()
    async with serving(tmp_path, runtime=runtime, device="cpu") as (_, client):
        cpu = (await client.post("/reconstruct", json={"inputs": x})).json()
    async with serving(tmp_path, runtime=runtime, device="cuda") as (_, client):
        assert (await client.get("/models/digits")).json()["device"] == "cuda"
        gpu = (await client.post("/reconstruct", json={"inputs": x})).json()
    np.testing.assert_allclose(gpu["latents"], cpu["latents"], atol=1e-4)
    np.testing.assert_allclose(gpu["outputs"], cpu["outputs"], atol=16e-4)


async def test_requests_during_loading_wait_while_ready_says_503(tmp_path, monkeypatch):
    import asyncio
    import threading

    import httpx

    from service.app import create_app
    from service.repository import Repository
    from service.settings import Settings

    copy_model(tmp_path, "digits", 1)
    release = threading.Event()
    real_load_all = Repository.load_all

    def slow_load_all(self):
        assert release.wait(30)
        real_load_all(self)

    monkeypatch.setattr(Repository, "load_all", slow_load_all)
    app = create_app(Settings(model_dir=tmp_path))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            r = await client.get("/health/ready")
            assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
            assert (await client.get("/health/live")).status_code == 200
            pending = asyncio.create_task(client.post("/encode", json={"inputs": digits_rows(1).tolist()}))
            await asyncio.sleep(0.2)
            assert not pending.done()
            release.set()
            assert (await pending).status_code == 200
            assert (await client.get("/health/ready")).status_code == 200
