"""Triton's HTTP extensions: model configuration, the repository index and statistics, through the
real tritonclient against a real server and in-process, with the figures checked against the work done."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bench.server import Server
from tests.service_helpers import DEFAULT_MODEL, Gate, digits_rows, serving

th = pytest.importorskip("tritonclient.http")

X = digits_rows(5, start=20)


@pytest.fixture(scope="module")
def triton() -> Iterator:
    server = Server(model_dir=DEFAULT_MODEL.parents[1])
    client = th.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()
    server.stop()


def test_the_configuration_describes_each_operation_as_perf_analyzer_reads_it(triton):
    encode = triton.get_model_config("digits.encode")
    assert encode["name"] == "digits.encode" and encode["max_batch_size"] == 1024  # VAE_MAX_ROWS
    assert encode["input"] == [{"name": "inputs", "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": [64]}]
    assert [(o["name"], o["data_type"], o["dims"]) for o in encode["output"]] == [
        ("mean", "TYPE_FP32", [8]), ("logvar", "TYPE_FP32", [8]), ("z", "TYPE_FP32", [8])]
    assert encode["dynamic_batching"]["max_queue_delay_microseconds"] == 0
    assert encode["instance_group"][0]["kind"] == "KIND_CPU" and encode["instance_group"][0]["count"] == 1
    scores = {o["name"]: o for o in triton.get_model_config("digits.anomaly-score", "1")["output"]}
    assert scores["score"]["data_type"] == "TYPE_FP64" and scores["score"]["dims"] == [1]
    assert scores["score"]["reshape"] == {"shape": []}
    assert scores["is_anomaly"]["data_type"] == "TYPE_BOOL" and scores["explanation"]["dims"] == [64]
    interpolate = triton.get_model_config("digits.interpolate")
    assert interpolate["max_batch_size"] == 0 and "dynamic_batching" not in interpolate
    assert [(i["name"], i["dims"], i["optional"]) for i in interpolate["input"]] == [
        ("inputs", [2, 64], True), ("latents", [2, 8], True)]
    sample = triton.get_model_config("digits.sample")
    assert sample["input"] == [] and sample["max_batch_size"] == 0
    assert {o["name"]: o["dims"] for o in sample["output"]} == {"outputs": [-1, 64], "latents": [-1, 8]}
    with pytest.raises(th.InferenceServerException, match="no version 7"):
        triton.get_model_config("digits.encode", "7")
    with pytest.raises(th.InferenceServerException, match="<model>.<operation>"):
        triton.get_model_config("digits")


def test_statistics_count_each_request_its_rows_and_its_passes(triton):
    before = triton.get_inference_statistics("digits.encode", "1")["model_stats"][0]
    tensor = th.InferInput("inputs", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    for _ in range(3):
        triton.infer("digits.encode", [tensor])
    bad = th.InferInput("inputs", [1, 63], "FP32")
    bad.set_data_from_numpy(np.zeros((1, 63), np.float32))
    with pytest.raises(th.InferenceServerException, match="64 values"):
        triton.infer("digits.encode", [bad])
    after = triton.get_inference_statistics("digits.encode", "1")["model_stats"][0]
    assert after["name"] == "digits.encode" and after["version"] == "1"
    assert after["inference_count"] - before["inference_count"] == 15  # rows, as Triton counts them
    assert after["execution_count"] - before["execution_count"] == 3
    stats, old = after["inference_stats"], before["inference_stats"]
    for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[phase]["count"] - old[phase]["count"] == 3, phase
    assert stats["fail"]["count"] - old["fail"]["count"] == 1
    # The phases are a split of each request's time: they add up to it (to a nanosecond per phase).
    parts = sum(stats[p]["ns"] for p in ("queue", "compute_input", "compute_infer", "compute_output"))
    assert abs(parts - stats["success"]["ns"]) <= 4 * stats["success"]["count"]
    assert stats["compute_infer"]["ns"] > 0 and after["last_inference"] >= before["last_inference"]
    batch_fives = [b for b in after["batch_stats"] if b["batch_size"] == 5]
    assert batch_fives and batch_fives[0]["compute_infer"]["count"] >= 3
    everything = triton.get_inference_statistics()["model_stats"]
    assert {(s["name"], s["version"]) for s in everything} >= {("digits.encode", "1"), ("digits.sample", "1")}
    assert triton.get_inference_statistics("digits.sample")["model_stats"][0]["inference_count"] == 0


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copytree(DEFAULT_MODEL, tmp_path / "digits" / "1")
    shutil.copytree(DEFAULT_MODEL, tmp_path / "digits" / "2")
    (tmp_path / "digits" / "2" / "manifest.json").write_text("{")  # refused at start
    return tmp_path


@pytest.mark.anyio
async def test_the_index_lists_loaded_and_refused_versions_and_load_is_refused(repo):
    async with serving(repo) as (_, client):
        everything = (await client.post("/v2/repository/index")).json()
        ready = (await client.post("/v2/repository/index", json={"ready": True})).json()
        load = await client.post("/v2/repository/models/digits.encode/load")
        unload = await client.post("/v2/repository/models/digits.encode/unload")
        bad = await client.post("/v2/repository/index", json={"ready": "yes"})
    assert {(e["name"], e["version"], e["state"]) for e in ready} == {
        (f"digits.{op}", "1", "READY") for op in ("encode", "decode", "reconstruct", "sample", "interpolate",
                                                   "anomaly-score")}
    refused = [e for e in everything if e["state"] == "UNAVAILABLE"]
    assert len(refused) == 6 and all(e["version"] == "2" and "manifest" in e["reason"] for e in refused)
    assert load.status_code == unload.status_code == 400
    assert "POST /admin/reload" in load.json()["error"]
    assert bad.status_code == 400 and "ready must be true or false" in bad.json()["error"]


@pytest.mark.anyio
async def test_requests_sharing_a_pass_are_one_execution_and_native_requests_count_too(repo):
    async with serving(repo) as (app, client):
        encoder = app.state.vae.repository.get(None, 1).encoder
        gate = Gate(encoder.fn)
        encoder.fn = gate
        first = asyncio.create_task(client.post("/encode", json={"inputs": X[:1].tolist(), "version": 1}))
        await asyncio.to_thread(gate.entered.wait, 10)
        later = [asyncio.create_task(client.post("/encode", json={"inputs": X[i : i + 2].tolist(), "version": 1}))
                 for i in range(4)]
        await asyncio.sleep(0.2)  # the four queue behind the held pass, and then share one
        gate.open.set()
        answers = [await first, *await asyncio.gather(*later)]
        stats = (await client.get("/v2/models/digits.encode/versions/1/stats")).json()["model_stats"][0]
    assert all(r.status_code == 200 for r in answers)
    assert stats["inference_count"] == 1 + 4 * 2 and stats["execution_count"] == 2
    assert {b["batch_size"]: b["compute_infer"]["count"] for b in stats["batch_stats"]} == {1: 1, 8: 1}
    queued = stats["inference_stats"]["queue"]
    assert queued["count"] == 5 and queued["ns"] >= 4 * 0.15e9  # the four waited out the held pass
