"""End to end: train a tiny model, export it, load the files back with torch and onnxruntime."""

import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file

from service.folder import read_manifest
from training.cli import main as train_main
from training.config import ModelConfig
from training.data import load_dataset
from training.export import ExportError, check_parity
from training.model import VAE

REPO = Path(__file__).resolve().parents[1]


def rebuild(folder: Path) -> VAE:
    manifest = read_manifest(folder)
    vae = VAE(ModelConfig.from_dict(manifest.architecture))
    vae.load_state_dict(load_file(str(folder / "weights.safetensors")))
    return vae.eval()


def test_exported_graphs_load_in_torch_and_onnxruntime_and_match_eager(tiny_model):
    vae = rebuild(tiny_model)
    data = load_dataset("digits")
    x = data.preprocessing.apply(data.x_val[:64])
    with torch.no_grad():
        mean, logvar = vae.encode(torch.from_numpy(x))
        probs = torch.sigmoid(vae.decode(mean))
    encoder_ts = torch.jit.load(str(tiny_model / "encoder.pt"))
    decoder_ts = torch.jit.load(str(tiny_model / "decoder.pt"))
    encoder_ort = ort.InferenceSession(str(tiny_model / "encoder.onnx"))
    decoder_ort = ort.InferenceSession(str(tiny_model / "decoder.onnx"))
    for n in (1, 7, 64):  # a dynamic batch dimension, not only the traced size
        with torch.no_grad():
            m_ts, lv_ts = encoder_ts(torch.from_numpy(x[:n]))
            p_ts = decoder_ts(mean[:n])
        m_ort, lv_ort = encoder_ort.run(None, {"x": x[:n]})
        (p_ort,) = decoder_ort.run(None, {"z": mean[:n].numpy()})
        for got in (m_ts.numpy(), m_ort):
            np.testing.assert_allclose(got, mean[:n].numpy(), atol=1e-5)
        for got in (lv_ts.numpy(), lv_ort):
            np.testing.assert_allclose(got, logvar[:n].numpy(), atol=1e-5)
        for got in (p_ts.numpy(), p_ort):
            np.testing.assert_allclose(got, probs[:n].numpy(), atol=1e-5)


def test_parity_check_catches_a_graph_that_differs(tiny_model):
    vae = rebuild(tiny_model)
    with torch.no_grad():
        vae.encoder.mean.bias += 1e-2  # the files on disk no longer match this eager model
    x = load_dataset("digits").preprocessing.apply(load_dataset("digits").x_val)
    with pytest.raises(ExportError, match="differs from the eager model"):
        check_parity(tiny_model, vae, x)


def test_new_runs_get_new_versions_and_never_overwrite(tiny_repo):
    before = (tiny_repo / "tiny" / "1" / "model.json").read_bytes()
    rc = train_main(["--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--output", str(tiny_repo),
                     "--name", "tiny", "--no-progress", "--checkpoint", str(tiny_repo / "ckpt2.pt")])
    assert rc == 0
    assert (tiny_repo / "tiny" / "1" / "model.json").read_bytes() == before
    assert read_manifest(tiny_repo / "tiny" / "2").version == 2
    assert not [p for p in (tiny_repo / "tiny").iterdir() if p.name.startswith(".")]


def versions(root: Path) -> dict[str, list[str]]:
    return {m.name: sorted(v.name for v in m.iterdir()) for m in sorted(root.iterdir()) if m.is_dir()}


def test_training_without_a_name_never_adds_a_version_to_an_existing_model(tmp_path):
    """The README's commands, run against a copy of the shipped repository, leave its models as they were."""
    repo = Path(shutil.copytree(REPO / "models", tmp_path / "models"))
    shipped = versions(repo)
    quick = ["--epochs", "1", "--hidden", "16", "--latent-dim", "2", "--no-progress", "--output", str(repo)]
    assert train_main(["--dataset", "digits", *quick, "--checkpoint", str(tmp_path / "a.pt")]) == 0
    assert train_main(["--dataset", "digits", "--conditional", *quick, "--checkpoint", str(tmp_path / "b.pt")]) == 0
    assert train_main(["--dataset", "digits", *quick, "--checkpoint", str(tmp_path / "c.pt")]) == 0
    rows = np.random.default_rng(0).normal(size=(200, 3))
    (tmp_path / "sensor readings.csv").write_text("a,b,c\n" + "\n".join(",".join(map(str, r)) for r in rows))
    csv = ["--dataset", "csv", "--data", str(tmp_path / "sensor readings.csv"), *quick]
    assert train_main([*csv, "--checkpoint", str(tmp_path / "d.pt")]) == 0
    assert train_main([*csv, "--checkpoint", str(tmp_path / "e.pt")]) == 0
    assert versions(repo) == {**shipped, "digits-2": ["1"], "digits-3": ["1"], "digits-conditional-2": ["1"],
                              "sensor-readings": ["1"], "sensor-readings-2": ["1"]}
    assert read_manifest(repo / "digits-2" / "1").name == "digits-2"
    assert train_main(["--dataset", "digits", *quick, "--name", "digits", "--checkpoint", str(tmp_path / "f.pt")]) == 0
    assert versions(repo)["digits"] == ["1", "2"]  # --name says so explicitly


def test_conv_model_exports(tmp_path):
    rc = train_main(["--arch", "conv", "--hidden", "8,16", "--epochs", "1", "--batch-size", "256",
                     "--output", str(tmp_path), "--no-progress", "--checkpoint", str(tmp_path / "c.pt")])
    assert rc == 0
    m = read_manifest(tmp_path / "digits" / "1")
    assert m.input_shape == [1, 8, 8] and m.architecture["arch"] == "conv"


def test_gaussian_csv_model_keeps_its_standardisation(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[100.0, -5.0, 0.0], scale=[10.0, 0.1, 1.0], size=(300, 3))
    lines = ["a,b,c,kind"] + [f"{a},{b},{c},{'xy'[i % 2]}" for i, (a, b, c) in enumerate(x)]
    (tmp_path / "t.csv").write_text("\n".join(lines))
    rc = train_main(["--dataset", "csv", "--data", str(tmp_path / "t.csv"), "--label-column", "kind",
                     "--epochs", "2", "--batch-size", "32", "--latent-dim", "2", "--hidden", "16",
                     "--output", str(tmp_path / "models"), "--name", "table", "--no-progress",
                     "--checkpoint", str(tmp_path / "t.pt")])
    assert rc == 0
    m = read_manifest(tmp_path / "models" / "table" / "1")
    assert m.likelihood == "gaussian" and m.decoder_logvar is not None
    assert m.feature_names == ["a", "b", "c"] and m.preprocessing.kind == "standardize"
    assert m.preprocessing.shift[0] == pytest.approx(100, abs=2)


def test_resume_continues_from_the_checkpoint(tmp_path):
    common = ["--epochs", "3", "--hidden", "16", "--latent-dim", "2", "--no-progress", "--name", "r"]
    assert train_main([*common, "--output", str(tmp_path / "a"), "--checkpoint", str(tmp_path / "a.pt")]) == 0
    # The same run interrupted after one epoch, then resumed, ends at the same weights.
    short = [a if a != "3" else "1" for a in common]
    assert train_main([*short, "--output", str(tmp_path / "b"), "--checkpoint", str(tmp_path / "b.pt")]) == 0
    assert train_main([*common, "--output", str(tmp_path / "c"), "--checkpoint", str(tmp_path / "b.pt"),
                       "--resume"]) == 0
    a = read_manifest(tmp_path / "a" / "r" / "1")
    c = read_manifest(tmp_path / "c" / "r" / "1")
    assert c.training["epochs_run"] == 3
    assert c.metrics["val_neg_elbo"] == pytest.approx(a.metrics["val_neg_elbo"], rel=1e-5)
    assert a.files["weights.safetensors"] == c.files["weights.safetensors"]
