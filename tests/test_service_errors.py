"""Every bad input gets a clear 4xx in the one error format, and the service keeps serving."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.service_helpers import DEFAULT_MODEL, digits_rows, npy_bytes, serving

pytestmark = pytest.mark.anyio
ROW = digits_rows(1)[0].tolist()
NPY = {"Content-Type": "application/x-npy"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(DEFAULT_MODEL, root / "digits" / "1")
    return root


@pytest.fixture
async def client(repo):
    async with serving(repo, max_rows=32, max_body_bytes=64 * 1024, max_samples=50, max_steps=20,
                       max_decode_rows=500) as (_, c):
        yield c


JSON_CASES = [
    # (path, body, status, field, message fragment)
    ("/encode", {}, 422, "inputs", "inputs is required"),
    ("/encode", {"inputs": "abc"}, 422, "inputs", "must be a list of rows, got str"),
    ("/encode", {"inputs": []}, 422, "inputs", "inputs is empty"),
    ("/encode", {"inputs": ROW}, 422, "inputs", "wrap a single row in [...]"),
    ("/encode", {"inputs": [ROW, ROW[:10]]}, 422, "inputs", "ragged"),
    ("/encode", {"inputs": [ROW[:63]]}, 422, "inputs",
     "must have 64 values or shape [1, 8, 8]; got rows of shape [63]"),
    ("/encode", {"inputs": [[*ROW[:5], "x", *ROW[6:]]]}, 422, "inputs[0][5]", 'inputs[0][5] is "x", not a number'),
    ("/encode", {"inputs": [[*ROW[:5], None, *ROW[6:]]]}, 422, "inputs[0][5]", "is null, not a number"),
    ("/encode", {"inputs": [[*ROW[:5], True, *ROW[6:]]]}, 422, "inputs[0][5]", "is true, not a number"),
    ("/encode", {"inputs": [[*ROW[:5], 1e39, *ROW[6:]]]}, 422, "inputs[0][5]", "outside the float32 range"),
    ("/encode", {"inputs": [ROW] * 33}, 413, "inputs", "33 rows; the limit is 32 (VAE_MAX_ROWS)"),
    ("/encode", {"inputs": [ROW], "sample": "yes"}, 422, "sample", "valid boolean"),
    ("/encode", {"inputs": [ROW], "seed": -1}, 422, "seed", "greater than or equal to 0"),
    ("/encode", {"inputs": [ROW], "sedd": 1}, 422, "sedd", "Extra inputs are not permitted"),
    ("/encode", {"inputs": [ROW], "model": "nope"}, 404, "model", "model 'nope' is not loaded (loaded: digits)"),
    ("/encode", {"inputs": [ROW], "model": ""}, 422, "model", "should match pattern"),
    ("/encode", {"inputs": [ROW], "version": 9}, 404, "version", "has no version 9 (versions: [1])"),
    ("/encode", {"inputs": [ROW], "version": 0}, 422, "version", "greater than or equal to 1"),
    ("/decode", {"latents": [[0.0] * 7]}, 422, "latents", "must have 8 values; got rows of shape [7]"),
    ("/decode", {"inputs": [[0.0] * 8]}, 422, "latents", "latents is required"),
    ("/sample", {"n": 0}, 422, "n", "greater than or equal to 1"),
    ("/sample", {"n": 33}, 422, "n", "n is 33; the limit is 32 (VAE_MAX_ROWS)"),
    ("/sample", {"n": 2.5}, 422, "n", "valid integer"),
    ("/sample", {"temperature": 0}, 422, "temperature", "greater than 0"),
    ("/interpolate", {"start": ROW, "end": ROW, "steps": 21}, 422, "steps", "limit is 20 (VAE_MAX_STEPS)"),
    ("/interpolate", {"start": ROW, "end": ROW, "steps": 1}, 422, "steps", "greater than or equal to 2"),
    ("/interpolate", {"start": ROW, "steps": 3}, 422, "start", "give either start and end"),
    ("/interpolate", {"start": ROW, "end": ROW, "start_latent": [0.0] * 8, "end_latent": [0.0] * 8}, 422,
     "start", "give either start and end"),
    ("/interpolate", {"start": ROW, "end": ROW, "method": "cubic"}, 422, "method", "'linear' or 'slerp'"),
    ("/interpolate", {"start_latent": [0.0] * 3, "end_latent": [0.0] * 8}, 422, "start_latent", "8 values"),
    ("/anomaly-score", {"inputs": [ROW], "samples": 51}, 422, "samples", "limit is 50 (VAE_MAX_SAMPLES)"),
    ("/anomaly-score", {"inputs": [ROW] * 20, "samples": 50}, 422, "samples", "1000; the limit is 500"),
    ("/anomaly-score", {"inputs": [ROW], "samples": 0}, 422, "samples", "greater than or equal to 1"),
]


@pytest.mark.parametrize(("path", "body", "status", "field", "message"), JSON_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(JSON_CASES)])
async def test_bad_json_input(client, path, body, status, field, message):
    r = await client.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["field"] == field
    assert message in error["message"]
    ok = await client.post("/encode", json={"inputs": [ROW]})
    assert ok.status_code == 200


RAW_CASES = [
    (b"{bad json", {"Content-Type": "application/json"}, 400, "malformed JSON"),
    (b'{"inputs": [[NaN]]}', {"Content-Type": "application/json"}, 400, "NaN and Infinity are not JSON numbers"),
    (b"[1, 2]", {"Content-Type": "application/json"}, 422, "must be a JSON object"),
    (b"x" * (64 * 1024 + 1), {"Content-Type": "application/json"}, 413, "limit is 65536"),
    (b"<xml/>", {"Content-Type": "application/xml"}, 415, "application/x-npy"),
    (b"not numpy", NPY, 400, "not a valid .npy array"),
    (npy_bytes(np.array([["a"] * 64])), NPY, 422, "must hold real numbers"),
    (npy_bytes(np.full((1, 64), np.nan)), NPY, 422, "inputs[0][0] is NaN"),
    (npy_bytes(np.ones((2, 65), dtype=np.float32)), NPY, 422, "got rows of shape [65]"),
    (npy_bytes(np.ones((0, 64), dtype=np.float32)), NPY, 422, "inputs is empty"),
]


@pytest.mark.parametrize(("body", "headers", "status", "message"), RAW_CASES, ids=[str(c[2]) for c in RAW_CASES])
async def test_bad_raw_body(client, body, headers, status, message):
    r = await client.post("/encode", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert (await client.post("/encode", json={"inputs": [ROW]})).status_code == 200


async def test_bad_query_parameters_on_npy_bodies(client):
    r = await client.post("/encode?seed=abc", content=npy_bytes(np.ones((1, 64))), headers=NPY)
    assert r.status_code == 422 and r.json()["error"]["field"] == "seed"


async def test_sample_refuses_an_array_body(client):
    r = await client.post("/sample?n=2", content=npy_bytes(np.ones((2, 8))), headers=NPY)
    assert r.status_code == 422 and "/sample takes no array" in r.json()["error"]["message"]
    r = await client.post("/sample?n=2&seed=1", headers={"Accept": "application/x-npz"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-npz"
    assert np.load(io.BytesIO(r.content))["outputs"].shape == (2, 64)  # fields from the query string


async def test_not_acceptable(client):
    r = await client.post("/encode", json={"inputs": [ROW]}, headers={"Accept": "text/csv"})
    assert r.status_code == 406 and "application/x-npz" in r.json()["error"]["message"]


async def test_unknown_model_info(client):
    r = await client.get("/models/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = await client.get("/models/digits?version=abc")
    assert r.status_code == 422 and r.json()["error"]["field"] == "version"


async def test_rows_that_overflow_the_model_get_a_422_naming_them_not_null(tmp_path):
    """A table model's scaling and linear layers carry a huge value through: the answer would be inf or
    NaN (JSON null). Every endpoint but /anomaly-score (which flags such rows) refuses the row by index."""
    from training.cli import main as train_main

    rows = np.random.default_rng(0).normal(scale=0.01, size=(200, 5))  # scaling multiplies by ~100
    np.save(tmp_path / "t.npy", rows)
    assert train_main(["--dataset", "npy", "--data", str(tmp_path / "t.npy"), "--epochs", "2", "--refit", "0",
                       "--output", str(tmp_path / "repo"), "--name", "t", "--no-progress",
                       "--checkpoint", str(tmp_path / "t.pt")]) == 0
    near, far = rows[0].tolist(), [3e38] * 5
    scaling = json.loads((tmp_path / "repo" / "t" / "1" / "model.json").read_text())["preprocessing"]
    # Just inside float32 once scaled, with alternating signs: some unit of the first layer overflows.
    edge = (np.array(scaling["shift"]) + 0.9 * np.finfo(np.float32).max * np.array(scaling["scale"])
            * np.array([1, -1, 1, -1, 1])).tolist()
    cases = [
        ("/encode", {"inputs": [near, far]}, "inputs[1]", "the model's scaling of it overflows float32"),
        ("/encode", {"inputs": [near, edge]}, "inputs[1]", "the encoder's output for it overflows"),
        ("/encode", {"inputs": [near, [1e36] * 5], "sample": True}, "inputs[1]", "its sampled latent overflows"),
        ("/reconstruct", {"inputs": [far], "sample": True}, "inputs[0]", "the model's scaling of it overflows"),
        ("/decode", {"latents": [[0.0] * 16, [3e38] * 16]}, "latents[1]", "the decoder's output for it"),
        ("/interpolate", {"start": far, "end": near, "steps": 3}, "start, end", "overflows float32"),
    ]
    async with serving(tmp_path / "repo", default_model="t", reload_interval=0) as (_, client):
        for path, body, field, message in cases:
            r = await client.post(path, json=body)
            assert r.status_code == 422, (path, r.text)
            error = r.json()["error"]
            assert error["field"] == field and message in error["message"], (path, error)
            assert "/anomaly-score scores such rows" in error["message"]
        ok = await client.post("/reconstruct", json={"inputs": [near]})
        assert ok.status_code == 200 and np.isfinite(ok.json()["outputs"]).all()
        # Callers sharing a pass with such a row are answered as if it were not there.
        alone = (await client.post("/encode", json={"inputs": [near]})).json()["mean"]
        bad, *good = await asyncio.gather(client.post("/encode", json={"inputs": [edge]}),
                                          *(client.post("/encode", json={"inputs": [near]}) for _ in range(8)))
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "inputs[0]"
        assert all(g.status_code == 200 and g.json()["mean"] == alone for g in good)
        flagged = (await client.post("/anomaly-score", json={"inputs": [far]})).json()
        assert flagged["is_anomaly"] == [True]
