"""The Open Inference Protocol v2: the real tritonclient against a real server, same numbers as native;
native and v2 requests sharing one batch; and bad v2 requests answered with 4xx and v2's error body."""

from __future__ import annotations

import asyncio
import io
import shutil
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from bench.server import Server
from tests.service_helpers import DEFAULT_MODEL, Gate, digits_rows, metric, serving

th = pytest.importorskip("tritonclient.http")

X = digits_rows(5, start=10)
OPS = {  # v2 operation -> (v2 inputs, v2 parameters, the native body)
    "encode": ({"inputs": X}, {"sample": True, "seed": 3}, {"inputs": X.tolist(), "sample": True, "seed": 3}),
    "decode": ({"latents": X[:, :8] / 8}, {}, {"latents": (X[:, :8] / 8).tolist()}),
    "reconstruct": ({"inputs": X}, {}, {"inputs": X.tolist()}),
    "sample": ({}, {"n": 3, "seed": 11, "temperature": 0.5}, {"n": 3, "seed": 11, "temperature": 0.5}),
    "interpolate": ({"inputs": X[:2]}, {"steps": 4, "method": "slerp"},
                    {"start": X[0].tolist(), "end": X[1].tolist(), "steps": 4, "method": "slerp"}),
    "anomaly-score": ({"inputs": X}, {"samples": 8}, {"inputs": X.tolist(), "samples": 8}),
}


@pytest.fixture(scope="module")
def server(shipped_server: Server) -> Server:
    return shipped_server


@pytest.fixture(scope="module")
def triton(server: Server):
    client = th.InferenceServerClient(server.url.removeprefix("http://"))
    yield client
    client.close()


def native(server: Server, op: str, body: dict) -> dict[str, np.ndarray]:
    r = httpx.post(f"{server.url}/{op}", json=body, headers={"Accept": "application/x-npz"})
    assert r.status_code == 200, r.text
    return dict(np.load(io.BytesIO(r.content)))


def assert_same_outputs(result, expected: dict[str, np.ndarray], names: list[str]) -> None:
    """A tritonclient result (HTTP or gRPC) holds the native answer's arrays, to float32 precision."""
    for name in names:
        got = result.as_numpy(name)
        assert got.shape == expected[name].shape, name
        if got.dtype == np.bool_:
            np.testing.assert_array_equal(got, expected[name])
        else:
            np.testing.assert_allclose(got, expected[name], rtol=1e-6, atol=1e-6, err_msg=name)


def test_health_and_metadata_through_tritonclient(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready("digits.encode")
    assert triton.is_model_ready("digits.anomaly-score", "1")
    assert not triton.is_model_ready("digits.encode", "9")
    assert not triton.is_model_ready("nope.encode")
    meta = triton.get_model_metadata("digits.encode")
    assert meta["name"] == "digits.encode" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "inputs", "datatype": "FP32", "shape": [-1, 64]}]
    assert [o["name"] for o in meta["outputs"]] == ["mean", "logvar", "z"]
    assert all(o["shape"] == [-1, 8] and o["datatype"] == "FP32" for o in meta["outputs"])
    scores = triton.get_model_metadata("digits.anomaly-score", "1")
    assert {o["name"]: o["datatype"] for o in scores["outputs"]}["is_anomaly"] == "BOOL"
    assert triton.get_server_metadata()["extensions"] == ["binary_tensor_data", "model_configuration",
                                                          "model_repository", "statistics"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("op", list(OPS))
def test_every_operation_matches_the_native_api(server, triton, op, binary):
    tensors, parameters, body = OPS[op]
    inputs = []
    for name, array in tensors.items():
        tensor = th.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array.astype(np.float32), binary_data=binary)
        inputs.append(tensor)
    expected = native(server, op, body)
    wanted = [k for k, v in expected.items() if v.ndim > 0]
    outputs = [th.InferRequestedOutput(name, binary_data=binary) for name in wanted]
    result = triton.infer(f"digits.{op}", inputs, outputs=outputs, parameters=parameters or None)
    response = result.get_response()
    assert response["model_name"] == f"digits.{op}" and response["model_version"] == "1"
    assert_same_outputs(result, expected, wanted)
    if "seed" in expected:
        assert response["parameters"]["seed"] == int(expected["seed"])


def test_default_outputs_are_all_binary_and_versions_address_the_model(triton):
    tensor = th.InferInput("inputs", list(X.shape), "FP32")
    tensor.set_data_from_numpy(X)
    result = triton.infer("digits.reconstruct", [tensor], model_version="1")
    assert all("binary_data_size" in o["parameters"] for o in result.get_response()["outputs"])
    assert result.as_numpy("outputs").shape == (5, 64)
    with pytest.raises(th.InferenceServerException, match="no version 2"):
        triton.infer("digits.reconstruct", [tensor], model_version="2")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(DEFAULT_MODEL, root / "digits" / "1")
    return root


def v2_body(x: np.ndarray, name: str = "inputs") -> tuple[bytes, dict[str, str]]:
    header = orjson.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}})
    return header + x.astype("<f4").tobytes(), {"Inference-Header-Content-Length": str(len(header))}


def binary_output(r: httpx.Response, name: str) -> np.ndarray:
    n = int(r.headers["Inference-Header-Content-Length"])
    header = orjson.loads(r.content[:n])
    offset = n
    for out in header["outputs"]:
        size = out["parameters"]["binary_data_size"]
        if out["name"] == name:
            return np.frombuffer(r.content[offset : offset + size], dtype="<f4").reshape(out["shape"])
        offset += size
    raise KeyError(name)


@pytest.mark.anyio
async def test_native_and_v2_requests_share_a_batch(repo):
    rows = digits_rows(40, start=100)
    async with serving(repo) as (app, client):
        encoder = app.state.vae.repository.get(None, None).encoder
        gate = Gate(encoder.fn)
        encoder.fn = gate
        first = asyncio.create_task(client.post("/encode", json={"inputs": rows[:1].tolist()}))
        await asyncio.to_thread(gate.entered.wait, 10)

        async def v2(i: int) -> httpx.Response:
            body, headers = v2_body(rows[i : i + 1])
            return await client.post("/v2/models/digits.encode/infer", content=body, headers=headers)

        async def nat(i: int) -> httpx.Response:
            return await client.post("/encode", json={"inputs": rows[i : i + 1].tolist()})

        later = [asyncio.create_task(v2(i) if i % 2 else nat(i)) for i in range(1, 21)]
        await asyncio.sleep(0.2)  # all of them queue behind the held first batch
        gate.open.set()
        answers = [await first, *await asyncio.gather(*later)]
        text = (await client.get("/metrics")).text
    means = [binary_output(r, "mean") if i % 2 else np.asarray(r.json()["mean"]) for i, r in enumerate(answers)]
    alone = np.concatenate(means)
    assert all(r.status_code == 200 for r in answers)
    assert metric(text, "vae_batch_size_rows_count", network="encoder") == 2  # the held one, then all 20
    assert metric(text, "vae_requests_total", endpoint="v2/encode", status="200") == 10
    reference = app.state.vae.repository.get(None, None)
    expected, _ = gate.fn(reference.to_model_space(rows[:21]))
    np.testing.assert_allclose(alone, expected, atol=1e-5)


BAD = [  # (description, body, headers, status, message fragment)
    ("not json", b"{", {}, 400, "malformed JSON"),
    ("wrong datatype", {"inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}]},
     {}, 400, "datatype 'INT64'"),
    ("data and shape disagree", {"inputs": [{"name": "inputs", "shape": [2, 64], "datatype": "FP32",
                                             "data": [0] * 64}]}, {}, 400, "needs 128"),
    ("wrong row width", {"inputs": [{"name": "inputs", "shape": [1, 63], "datatype": "FP32", "data": [0] * 63}]},
     {}, 400, "64 values"),
    ("missing input", {"inputs": []}, {}, 400, "needs the input 'inputs'"),
    ("unknown input", {"inputs": [{"name": "x", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}]},
     {}, 400, "not an input of digits.encode"),
    ("non-numbers", {"inputs": [{"name": "inputs", "shape": [1, 2], "datatype": "FP32", "data": ["a", 1]}]},
     {}, 400, "not a number"),
    ("unknown parameter", {"inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}],
                           "parameters": {"nope": 1}}, {}, 400, "nope"),
    ("unknown output", {"inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32", "data": [0] * 64}],
                        "outputs": [{"name": "score"}]}, {}, 400, "not an output"),
    ("binary size disagrees with shape", {"inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32",
                                                      "parameters": {"binary_data_size": 100}}]},
     {"binary": b"\0" * 100}, 400, "takes 256 bytes"),
    ("binary body shorter than declared", {"inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32",
                                                       "parameters": {"binary_data_size": 256}}]},
     {"binary": b"\0" * 10}, 400, "holds 10 more bytes"),
    ("binary body longer than declared", {"inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32",
                                                      "parameters": {"binary_data_size": 256}}]},
     {"binary": b"\0" * 300}, 400, "300 bytes"),
    ("header length past the body", {"inputs": []}, {"length": "99999"}, 400, "Inference-Header-Content-Length"),
    ("NaN in binary", {"inputs": [{"name": "inputs", "shape": [1, 64], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 256}}]},
     {"binary": np.full(64, np.nan, dtype="<f4").tobytes()}, 400, "NaN"),
]


@pytest.mark.anyio
async def test_bad_v2_requests_get_4xx_with_the_v2_error_body(repo):
    async with serving(repo) as (_, client):
        for description, doc, extra, status, fragment in BAD:
            header = doc if isinstance(doc, bytes) else orjson.dumps(doc)
            headers = {}
            body = header
            if "binary" in extra or "length" in extra:
                body = header + extra.get("binary", b"")
                headers["Inference-Header-Content-Length"] = extra.get("length", str(len(header)))
            r = await client.post("/v2/models/digits.encode/infer", content=body, headers=headers)
            assert r.status_code == status, (description, r.text)
            error = r.json()["error"]
            assert isinstance(error, str) and fragment in error, (description, error)
        for path, status, fragment in [
            ("/v2/models/digits.fly/infer", 400, "<model>.<operation>"),
            ("/v2/models/nope.encode/infer", 400, "'nope' is not loaded"),
            ("/v2/models/digits.encode/versions/x/infer", 400, "not a positive integer"),
            ("/v2/models/digits.encode/versions/7/infer", 400, "no version 7"),
        ]:
            r = await client.post(path, json={"inputs": []})
            assert r.status_code == status and fragment in r.json()["error"], (path, r.text)
        r = await client.get("/v2/models/digits.fly")
        assert r.status_code == 400 and "<model>.<operation>" in r.json()["error"]
        r = await client.post("/v2/models/digits.sample/infer", json={"inputs": [], "parameters": {"n": 0}})
        assert r.status_code == 400 and "n" in r.json()["error"]
        r = await client.post("/v2/models/digits.encode/infer")  # no body, no inference header
        assert r.status_code == 400 and r.json()["error"].startswith("the body is empty; digits.encode takes")
        r = await client.post("/v2/models/digits.encode/infer", content=b"{")
        assert "malformed JSON in the body" in r.json()["error"]
        assert (await client.get("/v2/")).json() == (await client.get("/v2")).json()  # the spec's spelling, no 307
        r = await client.post("/encode", json={"inputs": [[0] * 63]})
        assert r.status_code == 422  # the native API keeps 422
        r = await client.post("/v2/models/digits.interpolate/infer",
                              json={"inputs": [{"name": "inputs", "shape": [3, 64], "datatype": "FP32",
                                                "data": [0] * 192}]})
        assert r.status_code == 400 and "2 rows" in r.json()["error"]
        assert (await client.get("/health/ready")).status_code == 200
