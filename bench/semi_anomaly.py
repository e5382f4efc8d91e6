"""Does a semi-supervised VAE, told a few of the training anomalies, beat the unsupervised score?

ADBench's semi-supervised setting on the shared tables: the protocol's split (training.anomaly), then
`share` of the training anomalies labelled 1 and the same share of the training normals labelled 0 (M2
learns each class from labelled rows of it), every other row unlabelled. The semi-supervised model's
score is q(anomaly | x) from its exported encoder graph, what /classify answers; beside it a random
forest fitted on the labelled rows alone (what the labels give without the VAE), the unsupervised
default (`vae-train --dataset npy`, the elbo score as served) and IsolationForest, on the same test rows.
No target: the figures decide whether to document it as a use.

    python -m bench.semi_anomaly --data ../shared/data/adbench [--sets 6_cardio,38_thyroid] [--seeds 1]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.folder import read_manifest
from training.anomaly import (
    LABEL_COLUMN,
    ServedScorer,
    baseline_scores,
    detection_metrics,
    protocol_split,
    read_labelled,
)
from training.run import train

SHARE = 0.05
DETECTORS = ("semi_supervised", "labelled_only", "unsupervised", "iforest")


def partial_labels(y: np.ndarray, share: float, seed: int) -> np.ndarray:
    """-1 (unlabelled) for every row but `share` of each class (at least one), which keep their 0/1."""
    rng = np.random.default_rng(seed)
    out = np.full(len(y), -1, dtype=np.int64)
    for c in (0, 1):
        rows = np.flatnonzero(y == c)
        keep = rng.choice(rows, max(1, math.ceil(share * len(rows))), replace=False)
        out[keep] = c
    return out


def anomaly_probability(folder: Path, x: np.ndarray) -> np.ndarray:
    """q(y = 1 | x) through the exported ONNX encoder (its third output), as /classify computes it."""
    m = read_manifest(folder)
    shift, scale = m.preprocessing.arrays()
    xm = ((x - shift) / scale).astype(np.float32)
    session = ort.InferenceSession(str(folder / "encoder.onnx"), providers=["CPUExecutionProvider"])
    probabilities = session.run(None, {"x": np.concatenate([xm, np.zeros((len(x), 2), np.float32)], axis=1)})[2]
    assert m.classes is not None
    return probabilities[:, m.classes.index("1")].astype(np.float64)


def labelled_only(x_train: np.ndarray, labels: np.ndarray, x_test: np.ndarray, seed: int) -> np.ndarray:
    """What the labels alone give: a random forest on the labelled rows (classes balanced)."""
    from sklearn.ensemble import RandomForestClassifier

    known = labels >= 0
    forest = RandomForestClassifier(n_estimators=200, class_weight="balanced", random_state=seed)
    return forest.fit(x_train[known], labels[known]).predict_proba(x_test)[:, 1]


def one_run(path: Path, seed: int, share: float, work: Path) -> dict[str, Any]:
    x, y, _ = read_labelled(path, label_column=LABEL_COLUMN if path.suffix == ".parquet" else None)
    x_train, x_test, y_train, y_test = protocol_split(x, y, seed)
    np.save(work / "x.npy", x_train)
    labels = partial_labels(y_train, share, seed)
    np.save(work / "y.npy", labels)
    common = ["--dataset", "npy", "--data", str(work / "x.npy"), "--output", str(work / "models"), "--seed", str(seed),
              "--no-progress"]
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        semi = train([*common, "--name", "semi", "--checkpoint", str(work / "semi.pt"), "--semi-supervised",
                      "--labels", str(work / "y.npy")])
        plain = train([*common, "--name", "plain", "--checkpoint", str(work / "plain.pt")])
    scorer = ServedScorer.load(plain, threads=1)
    run = {
        "seed": seed, "labelled_anomalies": int(max(1, math.ceil(share * (y_train == 1).sum()))),
        "semi_supervised": detection_metrics(y_test, anomaly_probability(semi, x_test), 0.5),
        "labelled_only": detection_metrics(y_test, labelled_only(x_train, labels, x_test, seed), 0.5),
        "unsupervised": detection_metrics(y_test, scorer(x_test, None, "elbo"), scorer.calibration("elbo").threshold),
        "iforest": detection_metrics(y_test, baseline_scores("iforest", x_train, x_test, seed), float("inf")),
        "seconds": round(time.time() - t0, 1),
    }
    shutil.rmtree(work / "models", ignore_errors=True)
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.semi_anomaly", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a folder of ADBench .npz tables")
    p.add_argument("--sets", help="comma-separated set names (file stems); default: every table")
    p.add_argument("--seeds", default="1", help="comma-separated seeds of the protocol")
    p.add_argument("--share", type=float, default=SHARE, help="share of each class's training rows labelled")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    files = sorted(args.data.glob("*.npz"))
    if args.sets:
        files = [f for f in files if f.stem in args.sets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    print("| set | labelled anomalies | semi-supervised q(anomaly \\| x) | random forest, labelled rows | "
          "unsupervised elbo | IsolationForest |")
    print("| --- | --- | --- | --- | --- | --- |")
    for f in files:
        runs = []
        for seed in seeds:
            with tempfile.TemporaryDirectory(prefix="semi-anomaly-") as tmp:
                runs.append(one_run(f, seed, args.share, Path(tmp)))
        results[f.stem] = runs
        mean = {k: float(np.mean([r[k]["auroc"] for r in runs])) for k in DETECTORS}
        print(f"| {f.stem} | {runs[0]['labelled_anomalies']} | " + " | ".join(f"{mean[k]:.3f}" for k in DETECTORS)
              + " |", flush=True)
    overall = {k: float(np.mean([np.mean([r[k]["auroc"] for r in runs]) for runs in results.values()]))
               for k in DETECTORS}
    wins = sum(np.mean([r["semi_supervised"]["auroc"] for r in runs]) >= np.mean([r["unsupervised"]["auroc"]
                                                                                  for r in runs])
               for runs in results.values())
    forest_wins = sum(np.mean([r["semi_supervised"]["auroc"] for r in runs])
                      >= np.mean([r["labelled_only"]["auroc"] for r in runs]) for runs in results.values())
    print(f"| mean AUROC ({len(results)} sets) | | " + " | ".join(f"{overall[k]:.3f}" for k in DETECTORS) + " |")
    print(f"semi-supervised at or above the unsupervised score on {wins} of {len(results)} sets, "
          f"at or above the forest on the labelled rows on {forest_wins}")
    if args.out:
        args.out.write_text(json.dumps({"share": args.share, "seeds": seeds, "sets": results, "mean_auroc": overall,
                                        "semi_at_or_above_unsupervised": int(wins),
                                        "semi_at_or_above_labelled_only": int(forest_wins)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
