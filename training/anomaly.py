"""Anomaly detection measured as a pipeline would see it: labelled rows scored through a model
folder's exported graphs exactly as the service scores them (its preprocessing, its fixed scoring
noise, its calibrated threshold), and the shared benchmark protocol beside IsolationForest.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.folder import open_graphs
from service.manifest import Calibration, Manifest, ScoreName, score_asked
from service.runtime import Runtime
from service.scoring import score_with_graphs
from training.data import DataError, check_finite, read_csv_table


def read_labelled(path: Path, *, label_column: str | None = None, labels: Path | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(X float64 [N, D], y int [N] of 0/1) from a CSV with a label column, an .npy with a labels
    file, or an .npz holding `X` and `y`."""
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as npz:
            if not {"X", "y"} <= set(npz.files):
                raise DataError(f"{path}: an .npz for anomaly evaluation holds X and y (has {npz.files})")
            x, y = npz["X"], npz["y"]
    elif path.suffix == ".csv":
        if label_column is None:
            raise DataError(f"{path}: name the label column (--label-column)")
        x, raw, _ = read_csv_table(path, label_column)
        assert raw is not None
        y = _as_binary(raw, f"{path}, column {label_column!r}")
    else:
        if labels is None:
            raise DataError(f"{path}: an .npy of features needs --labels FILE.npy (0 = normal, 1 = anomaly)")
        x, y = np.load(path, allow_pickle=False), np.load(labels, allow_pickle=False)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise DataError(f"{path}: expected a non-empty table [rows, features], got shape {list(x.shape)}")
    check_finite(x, str(path))
    y = _as_binary(np.asarray(y), f"{path} labels")
    if len(y) != len(x):
        raise DataError(f"{path}: {len(x)} rows but {len(y)} labels")
    return x, y


def _as_binary(y: np.ndarray, where: str) -> np.ndarray:
    values = set(np.unique(y).tolist())
    as_numbers = {float(v) if isinstance(v, int | float) or str(v).replace(".", "", 1).isdigit() else v
                  for v in values}
    if not as_numbers <= {0.0, 1.0}:
        shown = sorted(map(str, values))[:6]
        raise DataError(f"{where}: labels must be 0 (normal) or 1 (anomaly), got {shown}")
    return np.asarray([float(v) for v in y.ravel()], dtype=np.float64).astype(np.int64)


@dataclass
class ServedScorer:
    """A model folder's graphs, scoring raw rows as the service does."""

    manifest: Manifest
    encoder: Any
    decoder: Any

    @classmethod
    def load(cls, model_dir: Path, runtime: Runtime = "onnx", threads: int = 0) -> ServedScorer:
        manifest, encoder, decoder = open_graphs(model_dir, runtime, threads=threads)
        if manifest.classes:
            raise ValueError(f"{model_dir} is a conditional model: its scores need each row's label, so score it "
                             "through the service (POST /anomaly-score with labels)")
        return cls(manifest, encoder, decoder)

    def __call__(self, x: np.ndarray, samples: int | None = None, score: ScoreName = "elbo") -> np.ndarray:
        """Per-row scores (higher = more anomalous) with the score's calibrated K (unless given) and noise."""
        m = self.manifest
        calibration = self.calibration(score)
        shift, scale = m.preprocessing.arrays()
        xm = ((np.asarray(x, dtype=np.float32) - shift) / scale).astype(np.float32)
        return score_with_graphs(self.encoder, self.decoder, xm, score=score, samples=samples or calibration.samples,
                                 seed=calibration.seed, latent_dim=m.latent_dim, likelihood=m.likelihood,
                                 decoder_logvar=m.decoder_logvar)

    def calibration(self, score: ScoreName) -> Calibration:
        calibration = self.manifest.calibration_for(score)
        if calibration is None:
            raise DataError(f"model {self.manifest.name} v{self.manifest.version} has no {score!r} score")
        return calibration


def detection_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC and AUPRC of the scores; precision, recall and F1 of `score > threshold`."""
    from sklearn.metrics import average_precision_score, precision_recall_fscore_support, roc_auc_score

    if len(np.unique(y)) < 2:
        raise DataError("the labels hold one class only; AUROC needs normal and anomalous rows")
    flagged = score > threshold
    precision, recall, f1, _ = precision_recall_fscore_support(y, flagged, average="binary", zero_division=0)
    return {"auroc": float(roc_auc_score(y, score)), "auprc": float(average_precision_score(y, score)),
            "precision": float(precision), "recall": float(recall), "f1": float(f1),
            "flagged": int(flagged.sum()), "rows": len(y), "anomalies": int(y.sum()), "threshold": threshold}


def evaluate_labelled(model_dir: Path, path: Path, *, label_column: str | None = None, labels: Path | None = None,
                      runtime: Runtime = "onnx") -> dict[str, Any]:
    x, y = read_labelled(path, label_column=label_column, labels=labels)
    scorer = ServedScorer.load(model_dir, runtime)
    m = scorer.manifest
    if x.shape[1] != m.input_dim:
        raise DataError(f"{path}: rows have {x.shape[1]} features, the model takes {m.input_dim}")
    result = detection_metrics(y, scorer(x), m.calibration.threshold)
    return {"model": m.name, "version": m.version, "runtime": runtime, "data": str(path),
            "score": m.calibration.score, "samples": m.calibration.samples,
            "threshold_level": m.calibration.threshold_level, **result}


def _train_default(x_train: np.ndarray, root: Path, name: str, seed: int, extra: list[str]) -> Path:
    """`vae-train --dataset npy` with the defaults (plus `extra`), quietly; returns the model folder."""
    from training.cli import main as train_main

    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{name}.npy"
    np.save(data, x_train.astype(np.float64))
    with contextlib.redirect_stdout(io.StringIO()):
        rc = train_main(["--dataset", "npy", "--data", str(data), "--output", str(root / "models"), "--name", name,
                         "--seed", str(seed), "--no-progress", "--checkpoint", str(root / f"{name}.pt"), *extra])
    if rc != 0:
        raise RuntimeError(f"training on {name} failed (exit {rc})")
    return root / "models" / name / "1"


def benchmark(data_dir: Path, *, seeds: tuple[int, ...] = (1, 2, 3), extra: list[str] | None = None,
              score: ScoreName | None = None, samples: int | None = None, progress: bool = True) -> dict[str, Any]:
    """The shared protocol on every `*.npz` (X, y) in data_dir: per seed a 70/30 split stratified on y,
    training on the training split as it is (anomalies included, labels unused) with the defaults,
    test rows scored as served; IsolationForest(random_state=seed) on the same split, in the same run.
    `score` and `samples` are chosen as POST /anomaly-score chooses them: elbo by default, iwae when only
    samples > 1 is given, each with its calibrated K unless `samples` says otherwise."""
    from sklearn.ensemble import IsolationForest
    from sklearn.model_selection import train_test_split
    from tqdm import tqdm

    chosen = score_asked(score, samples)
    files = sorted(data_dir.glob("*.npz"))
    if not files:
        raise DataError(f"{data_dir}: no .npz files (each holding X and y)")
    started = time.time()
    sets: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vae-bench-anomaly-") as tmp:
        for path in tqdm(files, desc="data sets", disable=not progress):
            x, y = read_labelled(path)
            runs = []
            for seed in seeds:
                x_train, x_test, _, y_test = train_test_split(x, y, test_size=0.3, stratify=y, random_state=seed)
                t0 = time.time()
                folder = _train_default(x_train, Path(tmp) / f"s{seed}", path.stem.replace("_", "-"), seed,
                                        extra or [])
                scorer = ServedScorer.load(folder)
                calibration = scorer.calibration(chosen)
                vae = detection_metrics(y_test, scorer(x_test, samples, chosen), calibration.threshold)
                vae_seconds = time.time() - t0
                forest = IsolationForest(random_state=seed).fit(x_train)
                iforest = detection_metrics(y_test, -forest.score_samples(x_test), float("inf"))
                runs.append({"seed": seed, "vae": vae, "iforest": iforest, "vae_seconds": round(vae_seconds, 2)})
            sets[path.stem] = _summary(runs, x.shape)
    wins = sum(s["vae_auroc_mean"] >= s["iforest_auroc_mean"] for s in sets.values())
    return {"data": str(data_dir), "seeds": list(seeds), "extra_args": extra or [], "score": chosen, "samples": samples,
            "sets": sets, "wins": wins,
            "total": len(sets), "seconds": round(time.time() - started, 1)}


def _summary(runs: list[dict[str, Any]], shape: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"rows": shape[0], "features": shape[1], "runs": runs}
    for who in ("vae", "iforest"):
        for metric in ("auroc", "auprc"):
            values = np.array([r[who][metric] for r in runs])
            out[f"{who}_{metric}_mean"], out[f"{who}_{metric}_std"] = float(values.mean()), float(values.std())
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["| data set | rows x features | VAE AUROC | IsolationForest AUROC | VAE AUPRC | IsolationForest AUPRC |"
             " VAE >= IF |", "|---|---|---|---|---|---|---|"]
    for name, s in result["sets"].items():
        lines.append(f"| {name} | {s['rows']} x {s['features']} | {s['vae_auroc_mean']:.3f} ± {s['vae_auroc_std']:.3f}"
                     f" | {s['iforest_auroc_mean']:.3f} ± {s['iforest_auroc_std']:.3f} | {s['vae_auprc_mean']:.3f} ± "
                     f"{s['vae_auprc_std']:.3f} | {s['iforest_auprc_mean']:.3f} ± {s['iforest_auprc_std']:.3f} | "
                     f"{'yes' if s['vae_auroc_mean'] >= s['iforest_auroc_mean'] else 'no'} |")
    lines.append("")
    seeds = ", ".join(map(str, result["seeds"]))
    scored = f"`{result.get('score', 'elbo')}`" + (f", K = {result['samples']}" if result.get("samples") else "")
    lines.append(f"VAE at or above IsolationForest on {result['wins']} of {result['total']} sets (mean AUROC over "
                 f"seeds {seeds}; VAE score {scored}); run time {result['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def write_report(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H%M")
    json_path, md_path = out / f"anomaly_{stamp}.json", out / f"anomaly_{stamp}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    return json_path, md_path
