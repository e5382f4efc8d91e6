"""Training on a CUDA GPU (`--device cuda`): the same runs as on CPU, with the export checked on CPU."""

from __future__ import annotations

import json

import numpy as np
import pytest

from service.runtime import cuda_available
from tests.test_refit import contaminated
from training.anomaly import ServedScorer
from training.cli import main as train_main

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU on this machine")]


def test_a_table_trains_and_refits_on_cuda(tmp_path):
    path = contaminated(tmp_path)
    assert train_main(["--dataset", "npy", "--data", str(path), "--epochs", "5", "--device", "cuda",
                       "--output", str(tmp_path / "m"), "--name", "t", "--no-progress"]) == 0
    folder = tmp_path / "m" / "t" / "1"
    manifest = json.loads((folder / "model.json").read_text())
    assert manifest["training"]["device"] == "cuda"
    assert manifest["training"]["refit"]["train_rows_left_out"] > 0
    # The graphs exported from the GPU model run on CPU and rank the planted cluster above the normal rows.
    x = np.load(path)
    scores = ServedScorer.load(folder)(x.astype(np.float32))
    planted = x.mean(axis=1) > 3
    assert scores[planted].min() > np.quantile(scores[~planted], 0.9)


def test_a_conv_model_trains_on_cuda_with_dynamic_binarisation(tmp_path):
    assert train_main(["--dataset", "digits", "--arch", "conv", "--hidden", "8,16", "--latent-dim", "4",
                       "--binarize", "dynamic", "--epochs", "2", "--device", "cuda",
                       "--output", str(tmp_path / "m"), "--name", "c", "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "m" / "c" / "1" / "model.json").read_text())
    assert manifest["training"]["device"] == "cuda" and manifest["training"]["best_epoch"] >= 1
