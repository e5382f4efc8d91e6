"""`vae-train check-samples MODEL_DIR`: are a conditional model's samples of the class asked for?

A classifier (scikit-learn's MLP, the same settings for every dataset) is trained on the model's
own training rows, checked on its validation rows, then asked to label samples drawn through the
exported graphs for each class, as `POST /sample` draws them (z ~ N(0, I), the label one-hot).
The classifier is a judge built for the check and thrown away; nothing of it is shipped.

The judge's fit ends by early stopping (its held-out score stops improving), not by an iteration cap:
where a cap ends it is a matter of floating-point detail, so it differs between CPUs. Should the cap
still be reached, the report says so (`classifier_converged`) and the check goes on, judged by the
classifier's measured validation accuracy.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from service.folder import open_graphs
from service.scoring import with_label
from training.evaluate import recorded_dataset

CLASSIFIER_ROWS = 20_000  # training rows the judge sees at most (MNIST: a third, ~97 % accurate)
MAX_ITER = 300  # a cap well past where early stopping ends the fit (MNIST: ~50 epochs, digits: ~40)


def check_samples(model_dir: Path, *, per_class: int = 100, seed: int = 0, dataset: str | None = None,
                  data: str | None = None) -> dict[str, Any]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    manifest, _, decoder = open_graphs(model_dir)
    if not manifest.classes:
        raise ValueError(f"{model_dir} is not a conditional model (its manifest lists no classes)")
    ds = recorded_dataset(manifest, dataset, data)
    if ds.y_train is None or ds.y_val is None:
        raise ValueError("the model's dataset has no labels to train a classifier on")
    shift, scale = manifest.preprocessing.arrays()
    rng = np.random.default_rng(seed)
    rows = rng.permutation(len(ds.x_train))[:CLASSIFIER_ROWS]

    def features(x: np.ndarray) -> np.ndarray:
        return ((x - shift) / scale).astype(np.float32)

    judge = MLPClassifier(hidden_layer_sizes=(256,), max_iter=MAX_ITER, early_stopping=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported below as classifier_converged
        judge.fit(features(ds.x_train[rows]), np.array([str(v) for v in ds.y_train[rows]]))
    judge_accuracy = float(judge.score(features(ds.x_val), np.array([str(v) for v in ds.y_val])))
    per_class_hits: dict[str, float] = {}
    for index, name in enumerate(manifest.classes):
        z = rng.standard_normal((per_class, manifest.latent_dim)).astype(np.float32)
        labels = np.full(per_class, index, dtype=np.int64)
        (out,) = decoder(with_label(z, labels, manifest.num_classes))
        per_class_hits[name] = float(np.mean(judge.predict(out) == name))
    return {"model": manifest.name, "version": manifest.version, "samples_per_class": per_class,
            "classifier": "sklearn MLPClassifier(256), trained on the model's training rows",
            "classifier_validation_accuracy": judge_accuracy, "classifier_converged": judge.n_iter_ < MAX_ITER,
            "accuracy": float(np.mean(list(per_class_hits.values()))), "per_class": per_class_hits}
