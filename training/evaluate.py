"""Score a dataset split with an exported model folder: negative ELBO and importance-weighted NLL.

Runs the exported graphs through the service's own runtime and scoring code, so the figures
describe what the service serves, not the eager model. A model trained with `--binarize dynamic`
is scored on a fixed stochastic binarisation of the split (x ~ Bernoulli(grey level), seeded), as
in Burda et al. 2015. A conditional model's -log p(x) is the label marginalised out,
p(x) = sum_y p(y) p(x | y) with p(y) the training labels' frequencies: an honest figure beside
unconditional models, not the easier -log p(x | y), which is reported too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from service.folder import open_graphs
from service.manifest import Manifest
from service.runtime import Runtime
from service.scoring import log_likelihood, sample_latents, scores, with_label
from training.data import Dataset, load_dataset

MAX_DECODER_ROWS = 32_768  # rows x samples decoded at once


def recorded_dataset(manifest: Manifest, dataset: str | None = None, data: str | None = None) -> Dataset:
    """The data a model was trained on, split as it was, from what its manifest records (or overrides)."""
    recorded = manifest.training.get("data", {})
    name = dataset or recorded.get("dataset")
    path = data if data is not None else recorded.get("path")
    if name is None:
        raise ValueError("the manifest records no dataset; pass --dataset")
    ds = load_dataset(name, path, likelihood=manifest.likelihood, seed=recorded.get("seed", 0),
                      val_fraction=recorded.get("val_fraction", 0.15), label_column=recorded.get("label_column"),
                      labels=recorded.get("labels"), drop=tuple(recorded.get("left_out", ())),
                      header=recorded.get("header", True))
    if ds.input_dim != manifest.input_dim:
        raise ValueError(f"dataset rows have {ds.input_dim} features, the model takes {manifest.input_dim}")
    return ds


def evaluate(model_dir: Path, *, dataset: str | None = None, data: str | None = None, split: str = "val",
             samples: int = 1000, runtime: Runtime = "onnx", seed: int = 0, progress: bool = True,
             threads: int = 0) -> dict[str, Any]:
    manifest, encoder, decoder = open_graphs(model_dir, runtime, threads=threads)
    ds = recorded_dataset(manifest, dataset, data)
    name = ds.name
    raw = {"val": ds.x_val, "test": ds.x_val, "train": ds.x_train}.get(split)
    if raw is None:
        raise ValueError(f"unknown split {split!r}; choose train, val or test")
    shift, scale = manifest.preprocessing.arrays()
    x = ((raw - shift) / scale).astype(np.float32)
    binarized = manifest.training.get("config", {}).get("binarize") == "dynamic"
    if binarized:
        x = (np.random.default_rng(seed + 1).random(x.shape, dtype=np.float32) < x).astype(np.float32)
    header = {"model": manifest.name, "version": manifest.version, "runtime": runtime, "dataset": name,
              "split": split, "rows": len(x), "samples": samples, "binarized": binarized}
    if manifest.classes:
        labels_raw = {"val": ds.y_val, "test": ds.y_val, "train": ds.y_train}[split]
        if labels_raw is None or ds.y_train is None:
            raise ValueError("a conditional model is evaluated on labelled data; this split has no labels")
        index = {c: i for i, c in enumerate(manifest.classes)}
        prior = np.bincount([index[str(v)] for v in ds.y_train], minlength=len(index)) / len(ds.y_train)
        labels = np.array([index[str(v)] for v in labels_raw], dtype=np.int64)
        return {**header, **evaluate_conditional(encoder, decoder, x, labels, prior, manifest.latent_dim,
                                                 samples=samples, seed=seed, progress=progress,
                                                 likelihood=manifest.likelihood,
                                                 decoder_logvar=manifest.decoder_logvar)}
    # Independent noise per row: a dataset mean needs it (the service's shared noise is for per-row
    # reproducibility, and one shared draw would bias the mean).
    rng = np.random.default_rng(seed)
    chunk = max(1, MAX_DECODER_ROWS // samples)
    iw, rec, kl = [], [], []
    for start in tqdm(range(0, len(x), chunk), desc=f"scoring {split} (K={samples})", disable=not progress or None,
                      unit="chunk"):
        xb = x[start : start + chunk]
        mean, logvar, *_ = encoder(xb)
        eps = rng.standard_normal((len(xb), samples, manifest.latent_dim)).astype(np.float32)
        out = decoder(sample_latents(mean, logvar, eps))[0]
        s, r, k = scores(xb, mean, logvar, eps, out, manifest.likelihood, manifest.decoder_logvar)
        iw.append(s)
        rec.append(r)
        kl.append(k)
    reconstruction, kl_mean = float(np.concatenate(rec).mean()), float(np.concatenate(kl).mean())
    result = {
        **header,
        "negative_elbo": reconstruction + kl_mean,  # averaged over the K samples of every row
        "reconstruction": reconstruction, "kl": kl_mean,
    }
    if samples > 1:
        result["iw_nll"] = float(np.concatenate(iw).mean())
    return result


PILOT_SAMPLES = 8
PROPOSAL_FLOOR = 0.01  # share of the label proposal spread evenly, so no class has zero probability


def _log_mean_exp(a: np.ndarray, axis: int) -> np.ndarray:
    top = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(top, axis) + np.log(np.mean(np.exp(a - top), axis=axis))


def _log_weights(decoder: Any, xb: np.ndarray, mean: np.ndarray, logvar: np.ndarray, rows: np.ndarray,
                 classes: np.ndarray, eps: np.ndarray, likelihood: str, decoder_logvar: Any) -> np.ndarray:
    """log p(x, z | y) - log q(z | x, y) for z = mean + std * eps, one per (row, class, eps) entry;
    mean, logvar: [N, C, L], the encoder's for every row and class."""
    m, lv = mean[rows, classes], logvar[rows, classes]
    z = (m + np.exp(0.5 * lv) * eps).astype(np.float32)
    (out,) = decoder(with_label(z, classes, mean.shape[1]))
    log_px = log_likelihood(xb[rows], out, likelihood, decoder_logvar)
    log_pz = -0.5 * np.sum(np.log(2 * np.pi) + z.astype(np.float64) ** 2, axis=1)
    log_qz = -0.5 * np.sum(np.log(2 * np.pi) + lv + eps.astype(np.float64) ** 2, axis=1)
    return log_px + log_pz - log_qz


def evaluate_conditional(encoder: Any, decoder: Any, x: np.ndarray, labels: np.ndarray, prior: np.ndarray,
                         latent_dim: int, *, samples: int, seed: int, progress: bool, likelihood: str = "bernoulli",
                         decoder_logvar: Any = None) -> dict[str, Any]:
    """-log p(x) with the label marginalised out, by importance sampling (y, z) jointly.

    The proposal is q(y | x) q(z | x, y): q(y | x) from a pilot estimate of p(y) p(x | y) with
    PILOT_SAMPLES per class (independent noise, so the estimate stays unbiased for p(x)), mixed with
    a uniform floor; q(z | x, y) is the encoder's. K samples in all per row, as for an unconditional model.
    Also -log p(x | y) for the row's own label, from the samples drawn with that label.
    """
    n_classes = len(prior)
    log_prior = np.log(np.maximum(prior, 1e-300))
    rng = np.random.default_rng(seed)
    chunk = max(1, MAX_DECODER_ROWS // max(samples, PILOT_SAMPLES * n_classes))
    marginal, given, elbo = [], [], []
    for start in tqdm(range(0, len(x), chunk), desc=f"scoring (K={samples}, labels marginalised)",
                      disable=not progress or None, unit="chunk"):
        xb = x[start : start + chunk]
        yb = labels[start : start + chunk]
        n = len(xb)
        every = np.repeat(np.arange(n_classes)[None], n, axis=0).ravel()  # row i, class c at i * C + c
        mean, logvar, *_ = encoder(with_label(np.repeat(xb, n_classes, axis=0), every, n_classes))
        mean, logvar = mean.reshape(n, n_classes, -1), logvar.reshape(n, n_classes, -1)

        pilot_rows = np.repeat(np.arange(n), n_classes * PILOT_SAMPLES)
        pilot_classes = np.tile(np.repeat(np.arange(n_classes), PILOT_SAMPLES), n)
        eps = rng.standard_normal((len(pilot_rows), latent_dim)).astype(np.float32)
        lw = _log_weights(decoder, xb, mean, logvar, pilot_rows, pilot_classes, eps, likelihood, decoder_logvar)
        pilot = _log_mean_exp(lw.reshape(n, n_classes, PILOT_SAMPLES), 2)
        joint = pilot + log_prior
        q = np.exp(joint - joint.max(axis=1, keepdims=True))
        q = (1 - PROPOSAL_FLOOR) * q / q.sum(axis=1, keepdims=True) + PROPOSAL_FLOOR / n_classes

        rows = np.repeat(np.arange(n), samples)
        classes = (rng.random((n, samples))[..., None] > np.cumsum(q, axis=1)[:, None, :]).sum(axis=2).ravel()
        classes = np.minimum(classes, n_classes - 1)
        eps = rng.standard_normal((len(rows), latent_dim)).astype(np.float32)
        lw = _log_weights(decoder, xb, mean, logvar, rows, classes, eps, likelihood, decoder_logvar).reshape(n, samples)
        log_q_y = np.log(q[rows, classes]).reshape(n, samples)
        marginal.append(-_log_mean_exp(lw + log_prior[classes].reshape(n, samples) - log_q_y, 1))
        own = classes.reshape(n, samples) == yb[:, None]
        count = own.sum(axis=1)
        top = np.max(np.where(own, lw, lw.min()), axis=1)
        mean_w = np.sum(np.where(own, np.exp(lw - top[:, None]), 0.0), axis=1) / np.maximum(count, 1)
        with np.errstate(divide="ignore"):
            given.append(np.where(count > 0, -(top + np.log(mean_w)), np.nan))
        elbo.append(-np.sum(np.where(own, lw, 0.0), axis=1) / np.maximum(count, 1))
    given_all = np.concatenate(given)
    return {
        "iw_nll": float(np.concatenate(marginal).mean()),
        "iw_nll_given_label": float(np.nanmean(given_all)),
        "rows_with_own_label_samples": int(np.isfinite(given_all).sum()),
        "negative_elbo_given_label": float(np.nanmean(np.where(np.isfinite(given_all), np.concatenate(elbo), np.nan))),
        "classes": len(prior),
    }
