"""`vae-train check-samples MODEL_DIR`: are a conditional model's samples of the class asked for?

A classifier (scikit-learn's MLP, the same settings for every dataset) is trained on the model's
own training rows, checked on its validation rows, then asked to label samples drawn through the
exported graphs for each class, as `POST /sample` draws them (z ~ N(0, I), the label one-hot).
The classifier is a judge built for the check and thrown away; nothing of it is shipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from service.folder import open_graphs
from service.scoring import with_label
from training.evaluate import recorded_dataset

CLASSIFIER_ROWS = 20_000  # training rows the judge sees at most (MNIST: a third, ~98 % accurate)


def check_samples(model_dir: Path, *, per_class: int = 100, seed: int = 0, dataset: str | None = None,
                  data: str | None = None) -> dict[str, Any]:
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

    judge = MLPClassifier(hidden_layer_sizes=(256,), max_iter=40, early_stopping=True, random_state=seed)
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
            "classifier_validation_accuracy": judge_accuracy,
            "accuracy": float(np.mean(list(per_class_hits.values()))), "per_class": per_class_hits}
