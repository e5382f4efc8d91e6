"""Semi-supervised VAEs (M2): a few labels and many unlabelled rows through training, export, /classify
and the conditional endpoints without a label."""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
from scipy.special import logsumexp
from sklearn.datasets import load_digits as sk_digits
from sklearn.linear_model import LogisticRegression

from service.folder import read_manifest
from tests.service_helpers import serving
from training.cli import main as train_main
from training.data import DataError, keep_per_class, labelled, load_digits, load_table
from training.run import train

pytestmark = pytest.mark.anyio
CLASSES = [str(c) for c in range(10)]


@pytest.fixture(scope="module")
def semi_repo(tmp_path_factory: pytest.TempPathFactory, tiny_repo: Path) -> Path:
    """The issue's command, defaults and all: digits with 5 labels per class; `tiny` (unconditional) beside it."""
    root = tmp_path_factory.mktemp("semi")
    rc = train_main(["--semi-supervised", "--labelled-per-class", "5", "--dataset", "digits", "--output", str(root),
                     "--name", "semi", "--no-progress", "--checkpoint", str(root / "ckpt.pt")])
    assert rc == 0
    shutil.copytree(tiny_repo / "tiny", root / "tiny")
    return root


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    bunch = sk_digits()
    return bunch.data.astype(np.float32), bunch.target


def _graph_probabilities(folder: Path, x: np.ndarray) -> np.ndarray:
    """q(y|x) straight from the exported ONNX encoder: its third output, the label slot left empty."""
    m = read_manifest(folder)
    shift, scale = m.preprocessing.arrays()
    xm = ((x - shift) / scale).astype(np.float32)
    session = ort.InferenceSession(str(folder / "encoder.onnx"))
    assert [o.name for o in session.get_outputs()] == ["mean", "logvar", "probabilities"]
    return session.run(None, {"x": np.concatenate([xm, np.zeros((len(x), 10), np.float32)], axis=1)})[2]


def test_the_manifest_says_semi_supervised_and_lists_the_classes(semi_repo: Path) -> None:
    m = read_manifest(semi_repo / "semi" / "1")
    assert m.semi_supervised and m.classes == CLASSES and m.architecture["semi_supervised"]
    assert set(m.marginal_calibrations) == {"elbo", "iwae"}
    assert {(p.graph, p.runtime) for p in m.parity} == {(g, r) for g in ("encoder", "decoder")
                                                        for r in ("torchscript", "onnx")}
    history = m.training["history"]
    assert all(h["labelled_loss"] > 0 and h["unlabelled_loss"] > 0 and 0 <= h["val_accuracy"] <= 1 for h in history)
    assert m.training["data"]["labelled_per_class"] == 5
    assert m.training["config"]["vat_weight"] == 1.0 and m.training["config"]["vat_rms"] == 0.0625
    assert 0.0 < m.metrics["val_accuracy"] <= 1.0


async def test_classify_beats_a_classifier_of_the_labelled_rows_alone(semi_repo: Path, digits) -> None:
    """Over every digits row, /classify against the true digit, and against logistic regression fitted on
    the same 50 labelled rows (about 87 %): the unlabelled rows must be what makes the difference. The
    issue's bar is 93 %; this model scores 93.5-94.1 % over six initialisation seeds (docs/semi-supervised.md)."""
    x, y = digits
    async with serving(semi_repo, max_rows=2048, default_model="semi") as (_, client):
        r = await client.post("/classify", json={"model": "semi", "inputs": x.tolist()})
    assert r.status_code == 200, r.text
    body = r.json()
    accuracy = float(np.mean(np.array(body["labels"]) == y.astype(str)))
    data = load_digits(seed=0, val_fraction=0.15).with_classes(True, 5, 0)
    known = data.label_index_train >= 0
    assert known.sum() == 50
    baseline = LogisticRegression(max_iter=2000).fit(data.x_train[known] / 16, data.label_index_train[known])
    baseline_accuracy = float(np.mean(baseline.predict(x / 16) == y))
    assert accuracy >= 0.93 and accuracy >= baseline_accuracy + 0.03, (accuracy, baseline_accuracy)
    probabilities = np.array(body["probabilities"])
    assert probabilities.shape == (len(x), 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probabilities, _graph_probabilities(semi_repo / "semi" / "1", x), atol=1e-6)
    assert body["labels"] == [CLASSES[i] for i in probabilities.argmax(axis=1)]


async def test_classify_answers_alike_through_json_npz_and_v2(semi_repo: Path, digits) -> None:
    x = digits[0][:7]
    buffer = io.BytesIO()
    np.save(buffer, x)
    async with serving(semi_repo) as (_, client):
        as_json = (await client.post("/classify", json={"model": "semi", "inputs": x.tolist()})).json()
        r = await client.post("/classify?model=semi", content=buffer.getvalue(),
                              headers={"content-type": "application/x-npy", "accept": "application/x-npz"})
        assert r.status_code == 200, r.text
        npz = np.load(io.BytesIO(r.content))
        v2 = (await client.post("/v2/models/semi.classify/infer", json={
            "inputs": [{"name": "inputs", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]
        })).json()
        metadata = (await client.get("/v2/models/semi.classify")).json()
        arrow = await client.post("/classify?model=semi", content=buffer.getvalue(),
                                  headers={"content-type": "application/x-npy",
                                           "accept": "application/vnd.apache.arrow.stream"})
        config = (await client.get("/v2/models/semi.classify/config")).json()
    assert npz["labels"].tolist() == as_json["labels"] == v2["parameters"]["labels"]
    table = pa.ipc.open_stream(arrow.content).read_all()
    assert table.column("labels").to_pylist() == as_json["labels"]
    np.testing.assert_array_equal(np.stack(table.column("probabilities").to_numpy(zero_copy_only=False)),
                                  npz["probabilities"])
    np.testing.assert_array_equal(npz["probabilities"], np.array(as_json["probabilities"], dtype=np.float32))
    (out,) = v2["outputs"]
    assert out["name"] == "probabilities" and out["shape"] == [7, 10]
    np.testing.assert_array_equal(np.array(out["data"], dtype=np.float32).reshape(7, 10), npz["probabilities"])
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert config["output"][0]["dims"] == [10]


async def test_without_a_label_encode_and_reconstruct_use_the_inferred_class(semi_repo: Path, digits) -> None:
    """Leaving the label out is the same as giving the class q(y|x) finds most likely, and says which."""
    x = digits[0][:6].tolist()
    async with serving(semi_repo) as (_, client):
        guessed = (await client.post("/classify", json={"model": "semi", "inputs": x})).json()["labels"]
        for path in ("/encode", "/reconstruct"):
            free = (await client.post(path, json={"model": "semi", "inputs": x})).json()
            given = (await client.post(path, json={"model": "semi", "inputs": x, "labels": guessed})).json()
            assert free["labels"] == guessed and "labels" not in given
            for key in ("mean", "logvar", "z") if path == "/encode" else ("outputs", "latents"):
                assert free[key] == given[key], (path, key)
        ends = {"model": "semi", "start": x[0], "end": x[1], "steps": 3}
        walk = (await client.post("/interpolate", json=ends)).json()
        given = (await client.post("/interpolate", json={**ends, "label": guessed[0]})).json()
        assert walk["labels"] == guessed[:1] and walk["outputs"] == given["outputs"]
        v2 = (await client.post("/v2/models/semi.encode/infer", json={
            "inputs": [{"name": "inputs", "datatype": "FP32", "shape": [6, 64], "data": sum(x, [])}]})).json()
    assert v2["parameters"]["labels"] == guessed


async def test_without_a_label_the_anomaly_score_marginalises_the_class(semi_repo: Path, digits) -> None:
    """The label-free score is -log sum_y p(y) p(x|y) with the uniform prior: computed here from the same
    server's score given each class in turn (the same fixed noise), and placed among its own calibration."""
    x = digits[0][:5].tolist()
    m = read_manifest(semi_repo / "semi" / "1")
    async with serving(semi_repo) as (_, client):
        for score in ("elbo", "iwae"):
            free = (await client.post("/anomaly-score", json={"model": "semi", "inputs": x, "score": score})).json()
            per_class = np.stack([
                (await client.post("/anomaly-score", json={"model": "semi", "inputs": x, "score": score,
                                                           "label": c})).json()["score"] for c in CLASSES], axis=1)
            expected = math.log(10) - logsumexp(-per_class, axis=1)
            np.testing.assert_allclose(free["score"], expected, rtol=1e-9)
            assert free["score_name"] == score
            assert free["threshold"] == m.marginal_calibrations[score].threshold
        default = (await client.post("/anomaly-score", json={"model": "semi", "inputs": x})).json()
        explained = (await client.post("/anomaly-score", json={"model": "semi", "inputs": x, "explain": True})).json()
        refused = await client.post("/anomaly-score", json={"model": "semi", "inputs": x, "score": "typicality"})
        npz = await client.post("/anomaly-score?model=semi", content=_npy(np.array(x, np.float32)),
                                headers={"content-type": "application/x-npy", "accept": "application/x-npz"})
    assert default["score_name"] == "elbo"
    np.testing.assert_allclose(np.array(explained["explanation"]).sum(axis=1), explained["reconstruction"], rtol=1e-9)
    assert refused.status_code == 422 and "needs a label" in refused.json()["error"]["message"]
    np.testing.assert_array_equal(np.load(io.BytesIO(npz.content))["score"], default["score"])


def _npy(a: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, a)
    return buffer.getvalue()


async def test_sample_draws_labels_from_the_prior_or_takes_one(semi_repo: Path) -> None:
    async with serving(semi_repo) as (_, client):
        drawn = [(await client.post("/sample", json={"model": "semi", "n": 32, "seed": 5})).json() for _ in range(2)]
        given = (await client.post("/sample", json={"model": "semi", "n": 4, "seed": 5, "label": "7"})).json()
    assert drawn[0]["labels"] == drawn[1]["labels"] and len(set(drawn[0]["labels"])) > 3
    assert given["labels"] == ["7"] * 4
    assert given["latents"] == drawn[0]["latents"][:4]  # a label changes what is drawn, not the latents


@pytest.mark.parametrize(("path", "body", "status", "needle"), [
    ("/classify", {"model": "tiny", "inputs": [[0.0] * 64]}, 422, "has no classifier"),
    ("/v2/models/tiny.classify/infer", {"inputs": [{"name": "inputs", "datatype": "FP32", "shape": [1, 64],
                                                     "data": [0.0] * 64}]}, 400, "no classify operation"),
    ("/classify", {"model": "semi", "inputs": [[0.0] * 64], "label": "3"}, 422, "label"),
    ("/decode", {"model": "semi", "latents": [[0.0] * 4]}, 422, "semi-supervised model infers it"),
    ("/interpolate", {"model": "semi", "start_latent": [0.0] * 4, "end_latent": [1.0] * 4}, 422, "not here"),
    ("/anomaly-score", {"model": "semi", "inputs": [[0.0] * 64] * 14, "samples": 1000}, 422, "x classes"),
])
async def test_what_cannot_be_answered_says_why(semi_repo: Path, path: str, body: dict, status: int,
                                                needle: str) -> None:
    async with serving(semi_repo) as (_, client):
        r = await client.post(path, json=body)
        index = (await client.post("/v2/repository/index", json={"ready": True})).json()
    assert r.status_code == status and needle in r.text, r.text
    names = {e["name"] for e in index}
    assert "semi.classify" in names and "tiny.classify" not in names


async def test_the_client_classifies_in_chunks(semi_repo: Path, digits) -> None:
    from vaeclient import AsyncClient

    x = digits[0][:9]
    async with serving(semi_repo, max_rows=4) as (app, _), \
            AsyncClient("http://test", model="semi", transport=httpx.ASGITransport(app=app)) as vae:
        result = await vae.classify(x)
    assert len(result.labels) == 9 and result.probabilities.shape == (9, 10)
    np.testing.assert_allclose(result.probabilities, _graph_probabilities(semi_repo / "semi" / "1", x), atol=1e-6)


def test_unlabelled_cells_and_hidden_labels(tmp_path: Path) -> None:
    assert labelled(np.array(["3", "", "-1", "nan", " 2 ", "None"])).tolist() == [True, False, False, False, True,
                                                                                  False]
    kept = keep_per_class(np.array([0, 0, 0, 1, 1, 1, 1, -1]), 2, 2, seed=0)
    assert (kept == 0).sum() == 2 and (kept == 1).sum() == 2 and (kept == -1).sum() == 4
    rows = ["a,b,y"] + [f"{i % 7},{i % 5},{'' if i % 3 else i % 2}" for i in range(60)]
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    data = load_table(tmp_path / "t.csv", kind="csv", label_column="y", likelihood="gaussian", seed=0,
                      val_fraction=0.2).with_classes(semi_supervised=True)
    assert data.classes == ["0", "1"]
    assert set(data.label_index_train.tolist()) == {-1, 0, 1}
    assert (data.label_index_train >= 0).sum() + (data.label_index_val >= 0).sum() == 20
    with pytest.raises(DataError, match="add --semi-supervised"):
        train(["--dataset", "digits", "--labelled-per-class", "5", "--output", str(tmp_path)])
    with pytest.raises(DataError, match="--vat-weight smooths a semi-supervised model's classifier"):
        train(["--dataset", "digits", "--vat-weight", "1", "--output", str(tmp_path)])
    with pytest.raises(DataError, match="--trim and --refit"):
        train(["--dataset", "digits", "--semi-supervised", "--trim", "0.1", "--output", str(tmp_path)])


def test_the_semi_supervised_anomaly_benchmark_labels_a_share_of_each_class() -> None:
    from bench.semi_anomaly import partial_labels

    y = np.array([0] * 95 + [1] * 5)
    labels = partial_labels(y, 0.05, seed=1)
    assert (labels == 1).sum() == 1 and (labels == 0).sum() == 5 and (labels == -1).sum() == 94
    assert set(np.flatnonzero(labels == 1)) <= set(np.flatnonzero(y == 1))


async def test_offline_scoring_marginalises_the_label_as_the_service_does(semi_repo: Path, digits) -> None:
    """vae-score, vae-train evaluate and Spark score with ServedScorer: a semi-supervised model's rows need
    no label there either, and get the service's numbers."""
    from training.anomaly import ServedScorer

    x = digits[0][:6]
    scorer = ServedScorer.load(semi_repo / "semi" / "1")
    assert scorer.default_score == "elbo"
    async with serving(semi_repo) as (_, client):
        for score in ("elbo", "iwae"):
            body = (await client.post("/anomaly-score", json={"model": "semi", "inputs": x.tolist(), "score": score,
                                                              "explain": True})).json()
            np.testing.assert_allclose(scorer(x, score=score), body["score"], rtol=1e-6)
            np.testing.assert_allclose(scorer.explain(x, score=score), body["explanation"], rtol=1e-6, atol=1e-9)
    with pytest.raises(DataError, match="without labels"):
        scorer(x, score="typicality")
