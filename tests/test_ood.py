"""Out-of-distribution inputs for an MNIST model: the plain ELBO ranks simple inputs as *more* normal
than MNIST itself (Nalisnick et al. 2019); the complexity score (Serra et al. 2020) must not. Measured
on the MNIST test set against blank, constant, blurred, upscaled 8x8 and inverted images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from bench.ood import simple_inputs
from tests.conftest import SHARED
from training.anomaly import ServedScorer
from training.cli import main as train_main
from training.data import load_mnist

MNIST = SHARED / "data" / "mnist"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not MNIST.is_dir(), reason="../shared/data/mnist is not present")]


def auroc_by_kind(tmp_path: Path) -> dict[tuple[str, str], float]:
    assert train_main(["--dataset", "mnist", "--data", str(MNIST), "--hidden", "400", "--latent-dim", "20",
                       "--epochs", "2", "--output", str(tmp_path), "--name", "mnist", "--no-progress",
                       "--checkpoint", str(tmp_path / "ck.pt")]) == 0
    scorer = ServedScorer.load(tmp_path / "mnist" / "1")
    test = load_mnist(MNIST).x_val
    normal, others = test[1000:3000], simple_inputs(test)
    out = {}
    for score in ("elbo", "complexity"):
        base = scorer(normal, score=score)  # type: ignore[arg-type]
        for kind, x in others.items():
            s = scorer(np.clip(x, 0, 255).astype(np.float32), score=score)  # type: ignore[arg-type]
            out[score, kind] = roc_auc_score(np.r_[np.zeros(len(base)), np.ones(len(s))], np.r_[base, s])
    return out


def test_the_complexity_score_flags_simple_inputs_where_the_elbo_fails(tmp_path):
    auroc = auroc_by_kind(tmp_path)
    print({f"{s}/{k}": round(v, 3) for (s, k), v in auroc.items()})
    assert auroc["elbo", "blank"] < 0.05  # the known failure: a blank image looks the most normal of all
    for kind in ("blank", "constant", "blurred", "digits 8x8 upscaled", "inverted"):
        assert auroc["complexity", kind] >= 0.95, kind
