"""Training on contaminated tables: `--refit` trains again without the rows a first fit scores worst."""

from __future__ import annotations

import json

import numpy as np
import torch

from training.cli import main as train_main
from training.config import ModelConfig, TrainConfig
from training.data import load_dataset
from training.train import train, without_worst


def contaminated(tmp_path, n_normal: int = 950, n_anomalies: int = 50):
    """A 4-feature table: normal rows around 0, and a tight cluster of anomalies 6 standard deviations out."""
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, (n_normal, 4)), rng.normal(6, 0.3, (n_anomalies, 4))])
    path = tmp_path / "t.npy"
    np.save(path, x[rng.permutation(len(x))])
    return path


def test_the_second_fit_leaves_out_the_worst_rows_of_both_splits(tmp_path):
    data = load_dataset("npy", contaminated(tmp_path), likelihood="gaussian", seed=0, val_fraction=0.15)
    cfg = ModelConfig(input_shape=(4,), latent_dim=2, hidden=(32,), likelihood="gaussian", per_feature_logvar=True)
    first = train(data, cfg, TrainConfig(epochs=5, seed=0), device=torch.device("cpu"), progress=False)
    kept, info = without_worst(first.model, data, 0.1, seed=0, device=torch.device("cpu"))

    rows = len(data.x_train) + len(data.x_val)
    left_out = info["train_rows_left_out"] + info["val_rows_left_out"]
    assert left_out == rows - len(kept.x_train) - len(kept.x_val) and abs(left_out - 0.1 * rows) <= 1
    assert info["val_rows_left_out"] > 0 and info["train_rows_left_out"] > 0
    # Every planted anomaly was among them, and the scaling is fitted again on the rows kept.
    assert (kept.x_train.mean(axis=1) < 3).all() and (kept.x_val.mean(axis=1) < 3).all()
    assert data.preprocessing.shift.mean() > 0.2 and abs(kept.preprocessing.shift.mean()) < 0.1
    assert kept.preprocessing.scale.mean() < data.preprocessing.scale.mean()


def test_tables_refit_by_default_and_the_manifest_records_it(tmp_path, capsys):
    path = contaminated(tmp_path)
    assert train_main(["--dataset", "npy", "--data", str(path), "--epochs", "3", "--output", str(tmp_path / "m"),
                       "--name", "t", "--no-progress", "--checkpoint", str(tmp_path / "ck.pt")]) == 0
    assert "the first fit (1 epoch) scores worst" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "m" / "t" / "1" / "model.json").read_text())
    refit = manifest["training"]["refit"]
    # The first fit is a quarter of the epochs (at least one); its checkpoint holds that many.
    assert refit["first_fit_epochs"] == 1 and len(torch.load(tmp_path / "ck.pt")["history"]) == 1
    assert len(torch.load(tmp_path / "refit-ck.pt")["history"]) == 3
    assert manifest["training"]["config"]["refit"] == refit["share"] == 0.1
    assert manifest["training"]["config"]["beta"] == 4.0  # the table default KL weight
    assert manifest["training"]["data"]["train_rows"] + refit["train_rows_left_out"] == 850
    assert (tmp_path / "refit-ck.pt").exists()

    assert train_main(["--dataset", "npy", "--data", str(path), "--epochs", "1", "--refit", "0",
                       "--output", str(tmp_path / "m"), "--name", "t", "--no-progress",
                       "--checkpoint", str(tmp_path / "ck0.pt")]) == 0
    second = json.loads((tmp_path / "m" / "t" / "2" / "model.json").read_text())["training"]
    assert second["refit"] is None and second["config"]["beta"] == 4.0
    assert train_main(["--dataset", "npy", "--data", str(path), "--refit", "1", "--output", str(tmp_path / "m"),
                       "--no-progress"]) == 2
    assert "--refit must be in [0, 1), got 1.0" in capsys.readouterr().err
    assert train_main(["--dataset", "npy", "--data", str(path), "--beta", "-1", "--output", str(tmp_path / "m"),
                       "--no-progress"]) == 2
    assert "--beta must be >= 0, got -1.0" in capsys.readouterr().err


def test_the_first_fit_is_a_quarter_of_the_epochs_unless_given(tmp_path, capsys):
    assert TrainConfig(epochs=20).first_fit() == TrainConfig(epochs=5)
    assert TrainConfig(epochs=20, refit=0.1, first_fit_epochs=7).first_fit().epochs == 7
    assert TrainConfig(epochs=2, refit=0.1).first_fit().epochs == 1
    assert train_main(["--dataset", "npy", "--data", str(contaminated(tmp_path)), "--epochs", "3",
                       "--first-fit-epochs", "2", "--output", str(tmp_path / "m"), "--no-progress",
                       "--checkpoint", str(tmp_path / "ck.pt")]) == 0
    assert len(torch.load(tmp_path / "ck.pt")["history"]) == 2
    assert train_main(["--dataset", "digits", "--first-fit-epochs", "2", "--output", str(tmp_path / "m"),
                       "--no-progress"]) == 2
    assert "this run has no refit" in capsys.readouterr().err


def test_images_keep_a_kl_weight_of_one(tiny_model):
    assert json.loads((tiny_model / "model.json").read_text())["training"]["config"]["beta"] == 1.0


def test_a_table_smaller_than_a_batch_trains_in_batches_of_an_eighth(tmp_path):
    path = contaminated(tmp_path, n_normal=95, n_anomalies=5)
    assert train_main(["--dataset", "npy", "--data", str(path), "--epochs", "1", "--output", str(tmp_path / "m"),
                       "--name", "t", "--no-progress", "--checkpoint", str(tmp_path / "ck.pt")]) == 0
    training = json.loads((tmp_path / "m" / "t" / "1" / "model.json").read_text())["training"]
    assert training["config"]["batch_size"] == 11  # 85 training rows in 8 steps per epoch
    assert train_main(["--dataset", "npy", "--data", str(path), "--batch-size", "86", "--output", str(tmp_path / "m"),
                       "--no-progress"]) == 2
