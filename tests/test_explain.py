"""`explain`: each feature's part of a row's reconstruction term, through JSON, .npz, v2, PNG and
vae-score, checked against the same quantity computed by hand from the exported graphs."""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from service.folder import read_manifest
from service.scoring import common_noise
from tests.service_helpers import DEFAULT_MODEL, digits_rows, npy_bytes, serving
from training.cli import main as train_main
from training.score import main as score_main

pytestmark = pytest.mark.anyio
COLUMNS = ["pressure", "flow", "temperature", "vibration"]


def by_hand(folder: Path, x: np.ndarray, samples: int) -> np.ndarray:
    """-log p(x_j | z) per feature averaged over the calibration's K samples, straight from the ONNX files."""
    m = read_manifest(folder)
    shift, scale = m.preprocessing.arrays()
    xm = ((x - shift) / scale).astype(np.float32)
    mean, logvar = ort.InferenceSession(str(folder / "encoder.onnx")).run(None, {"x": xm})
    eps = common_noise(samples, m.latent_dim, m.calibration.seed)
    z = (mean[:, None] + np.exp(0.5 * logvar.astype(np.float64))[:, None] * eps).reshape(-1, m.latent_dim)
    (out,) = ort.InferenceSession(str(folder / "decoder.onnx")).run(None, {"z": z.astype(np.float32)})
    xr = np.repeat(xm, samples, axis=0).astype(np.float64)
    out = out.astype(np.float64)
    if m.likelihood == "bernoulli":
        p = np.clip(out, 1e-7, 1 - 1e-7)
        parts = -(xr * np.log(p) + (1 - xr) * np.log(1 - p))
    else:
        lv = np.asarray(m.decoder_logvar)
        parts = 0.5 * (np.log(2 * np.pi) + lv + (xr - out) ** 2 / np.exp(lv))
    return parts.reshape(len(x), samples, -1).mean(axis=1)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with a small table model whose columns are named, beside digits."""
    root = tmp_path_factory.mktemp("explain")
    rng = np.random.default_rng(0)
    x = rng.normal([5.0, 1.0, 40.0, 0.1], [1.0, 0.2, 3.0, 0.02], (400, 4))
    (root / "plant.csv").write_text(",".join(COLUMNS) + "\n" + "\n".join(",".join(map(str, r)) for r in x))
    assert train_main(["--dataset", "csv", "--data", str(root / "plant.csv"), "--epochs", "3", "--no-progress",
                       "--output", str(root / "models"), "--checkpoint", str(root / "c.pt")]) == 0
    shutil.copytree(DEFAULT_MODEL, root / "models" / "digits" / "1")
    return root


def odd_rows() -> np.ndarray:
    x = np.tile([5.0, 1.0, 40.0, 0.1], (3, 1))
    x[1, 2] = 80.0  # temperature far out
    x[2, 3] = 0.5  # vibration far out
    return x


async def test_json_npz_and_v2_explain_a_table_by_column(table):
    folder = table / "models" / "plant" / "1"
    x = odd_rows()
    expected = by_hand(folder, x, samples=1)
    async with serving(table / "models", reload_interval=0) as (_, client):
        asked = {"model": "plant", "inputs": x.tolist(), "explain": True}
        body = (await client.post("/anomaly-score", json=asked)).json()
        assert body["feature_names"] == COLUMNS
        parts = np.asarray(body["explanation"])
        np.testing.assert_allclose(parts, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(parts.sum(axis=1), body["reconstruction"], rtol=1e-9)
        assert [COLUMNS[i] for i in parts.argmax(axis=1)[1:]] == ["temperature", "vibration"]
        plain = (await client.post("/anomaly-score", json={"model": "plant", "inputs": x.tolist()})).json()
        assert "explanation" not in plain and plain["score"] == body["score"]  # asked for, or not there at all
        r = await client.post("/anomaly-score?model=plant&explain=true", content=npy_bytes(x.astype(np.float32)),
                              headers={"Content-Type": "application/x-npy", "Accept": "application/x-npz"})
        npz = np.load(io.BytesIO(r.content), allow_pickle=False)
        np.testing.assert_allclose(npz["explanation"], expected, rtol=1e-5, atol=1e-6)
        assert npz["feature_names"].tolist() == COLUMNS
        doc = {"inputs": [{"name": "inputs", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
               "parameters": {"explain": True}}
        v2 = (await client.post("/v2/models/plant.anomaly-score/infer", json=doc)).json()
        tensor = next(o for o in v2["outputs"] if o["name"] == "explanation")
        assert tensor["datatype"] == "FP64" and tensor["shape"] == [3, 4]
        np.testing.assert_allclose(np.reshape(tensor["data"], (3, 4)), parts, rtol=1e-12)
        assert v2["parameters"]["feature_names"] == COLUMNS
        r = await client.post("/anomaly-score", json={"model": "plant", "inputs": x.tolist(), "explain": True},
                              headers={"Accept": "image/png"})
        assert r.status_code == 406 and "image models" in r.json()["error"]["message"]
        r = await client.post("/anomaly-score", json={"model": "plant", "inputs": x.tolist(), "explain": "maybe"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "explain"


async def test_images_explain_per_pixel_and_draw_a_heat_map(table):
    x = digits_rows(4)
    expected = by_hand(DEFAULT_MODEL, x, samples=64)
    async with serving(table / "models", reload_interval=0) as (_, client):
        body = (await client.post("/anomaly-score", json={"inputs": x.tolist(), "explain": True,
                                                          "score": "iwae"})).json()
        parts = np.asarray(body["explanation"])
        assert parts.shape == (4, 64) and body["feature_names"] is None
        np.testing.assert_allclose(parts, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(parts.sum(axis=1), body["reconstruction"], rtol=1e-9)
        r = await client.post("/anomaly-score", json={"inputs": x.tolist(), "explain": True, "columns": 2,
                                                      "upscale": 4}, headers={"Accept": "image/png"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(r.content))
        assert image.size == (2 + 4 * (32 + 2), 2 + 2 * (32 + 2))  # two pairs a row: input, heat map
        r = await client.post("/anomaly-score", json={"inputs": x.tolist()}, headers={"Accept": "image/png"})
        assert r.status_code == 406 and "explain: true" in r.json()["error"]["message"]


def test_vae_score_writes_the_top_features_in_process(table, tmp_path, capsys):
    folder = table / "models" / "plant" / "1"
    (tmp_path / "rows.csv").write_text(",".join(COLUMNS) + "\n" + "\n".join(",".join(map(str, r)) for r in odd_rows()))
    out = tmp_path / "scores.csv"
    assert score_main([str(tmp_path / "rows.csv"), "--model-dir", str(folder), "-o", str(out), "--explain", "2",
                       "--no-progress"]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0])[3:] == ["feature_1", "part_1", "feature_2", "part_2"]
    assert [r["feature_1"] for r in rows[1:]] == ["temperature", "vibration"]
    expected = by_hand(folder, odd_rows(), samples=1)
    assert float(rows[1]["part_1"]) == pytest.approx(expected[1].max(), rel=1e-5)
    npy = tmp_path / "scores.npy"
    assert score_main([str(tmp_path / "rows.csv"), "--model-dir", str(folder), "-o", str(npy), "--explain", "1",
                       "--no-progress"]) == 0
    assert np.load(npy)["feature_1"].tolist()[1:] == ["temperature", "vibration"]
