"""M1+M2 (`vae-train --semi-supervised --stack-on M1`): M2 trained on an unconditional model's latent
means, exported as one model of the rows; its graphs checked against M1's own exported graphs and M2's
weights, and served like any semi-supervised model."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.numpy import load_file
from sklearn.datasets import load_digits as sk_digits

from service.folder import read_manifest
from tests.service_helpers import serving
from training.config import ModelConfig
from training.data import DataError
from training.model import VAE
from training.run import train

pytestmark = pytest.mark.anyio
SHIPPED = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture(scope="module")
def stack_repo(tmp_path_factory: pytest.TempPathFactory, tiny_repo: Path) -> Path:
    """M2 over `tiny`'s latent means (digits, 5 labels per class), a short run."""
    root = tmp_path_factory.mktemp("stack")
    shutil.copytree(tiny_repo / "tiny", root / "tiny")
    train(["--dataset", "digits", "--semi-supervised", "--labelled-per-class", "5",
           "--stack-on", str(root / "tiny" / "1"), "--epochs", "3", "--output", str(root), "--name", "stack",
           "--no-progress", "--checkpoint", str(root / "ckpt.pt")])
    return root


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return sk_digits().data.astype(np.float32)[:40]


def _run(folder: Path, graph: str, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(folder / f"{graph}.onnx"))
    return session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})


def _m2(folder: Path) -> tuple[VAE, dict[str, np.ndarray]]:
    """M2 rebuilt from the stack's weights file (its m2. entries), and the stack's own buffers."""
    m = read_manifest(folder)
    weights = load_file(str(folder / "weights.safetensors"))
    m2 = VAE(ModelConfig.from_dict(m.architecture["m2"]))
    m2.load_state_dict({k[3:]: torch.from_numpy(v) for k, v in weights.items() if k.startswith("m2.")})
    return m2.eval(), {k[6:]: v for k, v in weights.items() if k.startswith("stack.")}


def test_the_manifest_describes_the_stack(stack_repo: Path) -> None:
    m = read_manifest(stack_repo / "stack" / "1")
    m1 = read_manifest(stack_repo / "tiny" / "1")
    on = m.architecture["stacked_on"]
    assert (on["name"], on["version"], on["files"]) == ("tiny", 1, m1.files)
    assert m.semi_supervised and m.classes == [str(c) for c in range(10)]
    assert m.input_shape == m1.input_shape and m.likelihood == m1.likelihood
    assert m.preprocessing == m1.preprocessing
    assert m.latent_dim == m.architecture["m2"]["latent_dim"] == 16  # M2's, the stack's defaults
    assert m.architecture["m2"]["input_shape"] == [len(on["active_units"])]
    assert m.training["stacked_on"] == on and 0.0 < m.metrics["val_accuracy"] <= 1.0


def test_the_encoder_is_m2_over_m1s_latent_means(stack_repo: Path, rows: np.ndarray) -> None:
    """The stack's q(y|x) and q(z|x, y) against M1's exported encoder, its active units standardised, then M2."""
    folder, m1_folder = stack_repo / "stack" / "1", stack_repo / "tiny" / "1"
    m = read_manifest(folder)
    m2, stack = _m2(folder)
    xm = rows / 16.0
    labels = np.eye(10, dtype=np.float32)[np.arange(len(rows)) % 10]
    mean, logvar, probabilities = _run(folder, "encoder", np.concatenate([xm, labels], axis=1))
    m1_mean = _run(m1_folder, "encoder", xm)[0]
    features = (m1_mean[:, m.architecture["stacked_on"]["active_units"]] - stack["shift"]) / stack["scale"]
    with torch.no_grad():
        want = torch.softmax(m2.classifier(torch.from_numpy(features)), dim=1).numpy()
        want_mean, want_logvar = m2.encoder(torch.from_numpy(np.concatenate([features, labels], axis=1)))
    np.testing.assert_allclose(probabilities, want, atol=1e-5)
    np.testing.assert_allclose(mean, want_mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(logvar, want_logvar.numpy(), atol=1e-5)


def test_the_decoder_is_m1s_decoder_of_m2s_decoded_features(stack_repo: Path) -> None:
    folder, m1_folder = stack_repo / "stack" / "1", stack_repo / "tiny" / "1"
    m = read_manifest(folder)
    m2, stack = _m2(folder)
    rng = np.random.default_rng(0)
    zy = np.concatenate([rng.standard_normal((12, m.latent_dim)), np.eye(10)[rng.integers(0, 10, 12)]], axis=1)
    (got,) = _run(folder, "decoder", zy)
    with torch.no_grad():
        features = m2.decoder(torch.from_numpy(zy.astype(np.float32))).numpy() * stack["scale"] + stack["shift"]
    z1 = np.tile(stack["fill"], (12, 1))
    z1[:, m.architecture["stacked_on"]["active_units"]] = features
    (want,) = _run(m1_folder, "decoder", z1)
    np.testing.assert_allclose(got, want, atol=1e-5)


async def test_it_serves_as_a_semi_supervised_model(stack_repo: Path, rows: np.ndarray) -> None:
    folder = stack_repo / "stack" / "1"
    xm = np.concatenate([rows / 16.0, np.zeros((len(rows), 10), np.float32)], axis=1)
    async with serving(stack_repo) as (_, client):
        r = await client.post("/classify", json={"model": "stack", "inputs": rows.tolist()})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["probabilities"], _run(folder, "encoder", xm)[2], atol=1e-6)
        r = await client.post("/reconstruct", json={"model": "stack", "inputs": rows[:3].tolist()})
        assert r.status_code == 200, r.text
        assert np.asarray(r.json()["outputs"]).shape == (3, 64)
        r = await client.post("/anomaly-score", json={"model": "stack", "inputs": rows[:3].tolist()})
        assert r.status_code == 200, r.text


def test_it_refuses_what_cannot_be_stacked(tmp_path: Path, tiny_repo: Path) -> None:
    tiny = str(tiny_repo / "tiny" / "1")
    base = ["--dataset", "digits", "--output", str(tmp_path), "--no-progress"]
    with pytest.raises(DataError, match="add --semi-supervised"):
        train([*base, "--stack-on", tiny])
    with pytest.raises(DataError, match="is conditional"):
        train([*base, "--semi-supervised", "--stack-on", str(SHIPPED / "digits-conditional" / "1")])
    with pytest.raises(DataError, match="a Gaussian decoder"):
        train([*base, "--semi-supervised", "--stack-on", tiny, "--arch", "conv"])
    with pytest.raises(DataError, match="not a model folder"):
        train([*base, "--semi-supervised", "--stack-on", str(tmp_path)])
    table = tmp_path / "t.csv"
    table.write_text("a,b,y\n" + "".join(f"{i % 7},{i % 5},{i % 2}\n" for i in range(60)))
    with pytest.raises(DataError, match="takes rows of 64 values; these have 2"):
        train(["--dataset", "csv", "--data", str(table), "--label-column", "y", "--semi-supervised",
               "--stack-on", tiny, "--output", str(tmp_path)])
