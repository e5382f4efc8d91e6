import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from service.folder import read_manifest
from service.manifest import SCHEMA_VERSION, ManifestError, json_schema


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "m"))


def edit(folder: Path, change) -> None:
    data = json.loads((folder / "model.json").read_text())
    change(data)
    (folder / "model.json").write_text(json.dumps(data))


def test_exported_manifest_is_valid_and_complete(tiny_model):
    m = read_manifest(tiny_model)
    assert m.schema_version == SCHEMA_VERSION and m.name == "tiny" and m.version == 1
    assert m.input_shape == [1, 8, 8] and m.latent_dim == 4 and m.likelihood == "bernoulli"
    assert set(m.files) == {"encoder.pt", "decoder.pt", "encoder.onnx", "decoder.onnx", "weights.safetensors"}
    assert m.preprocessing.scale == [16.0]
    assert m.training["command"].startswith("vae-train --dataset digits")
    assert m.training["config"]["epochs"] == 2 and len(m.training["history"]) == 2
    assert m.metrics["val_neg_elbo"] > 0
    assert len(m.parity) == 2 * 2 * 2 * 2  # graphs x runtimes x input kinds x batch sizes
    assert {c.batch_size for c in m.parity} == {1, 64}
    assert m.calibration.n_rows == 270 and m.calibration.threshold_level == 0.99
    assert m.typicality is not None and m.typicality.n_rows == 1527 and m.typicality.samples == 1
    assert m.default_score == "typicality" and m.calibrations["typicality"].n_rows == 270


def test_calibration_percentile_is_monotone_and_bounded(tiny_model):
    cal = read_manifest(tiny_model).calibration
    p = cal.percentile(np.array([-1e9, cal.values[100], cal.threshold, 1e9]))
    assert p[0] == 0 and p[-1] == 100 and np.all(np.diff(p) >= 0)
    assert p[1] == pytest.approx(50, abs=1)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "schema_version"),
    (lambda d: d.update(surprise=1), "surprise"),
    (lambda d: d.pop("calibration"), "calibration"),
    (lambda d: d["preprocessing"].update(shift=[0.0, 1.0]), "expected 1 or 64"),
    (lambda d: d["preprocessing"].update(scale=[0.0]), "scale"),
    (lambda d: d["calibration"].update(values=d["calibration"]["values"][::-1]), "must not decrease"),
    (lambda d: d["parity"][0].update(max_abs_diff=0.1), "exceeds"),
    (lambda d: d["files"].pop("decoder.onnx"), "missing"),
    (lambda d: d["files"].update({"../evil": "0" * 64}), "plain files"),
    (lambda d: d.update(name="../x"), "name"),
    (lambda d: d["typicality"].update(precision=[[1, 0, 0], [0, -1, 0], [0, 0, 1]]), "positive-definite"),
    (lambda d: d["typicality"].update(precision=[[1, 2, 0], [0, 1, 0], [0, 0, 1]]), "positive-definite"),
    (lambda d: d["typicality"].update(statistics=["kl", "reconstruction", "distance"]), "reconstruction, kl, distance"),
    (lambda d: d["typicality"].update(elbo_std=0.0), "elbo_std"),
])
def test_invalid_manifests_are_refused(model_copy, change, message):
    edit(model_copy, change)
    with pytest.raises(ManifestError, match=message):
        read_manifest(model_copy)


def test_tampered_or_missing_files_are_refused(model_copy):
    (model_copy / "encoder.onnx").write_bytes(b"not a graph")
    with pytest.raises(ManifestError, match="encoder.onnx does not match its sha256"):
        read_manifest(model_copy)
    (model_copy / "encoder.onnx").unlink()
    with pytest.raises(ManifestError, match="encoder.onnx is listed in the manifest but missing"):
        read_manifest(model_copy)


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="no manifest"):
        read_manifest(tmp_path)


def test_json_schema_is_written_down():
    schema = json_schema()
    assert {"schema_version", "calibration", "files", "preprocessing"} <= set(schema["properties"])
