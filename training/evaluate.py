"""Score a dataset split with an exported model folder: negative ELBO and importance-weighted NLL.

Runs the exported graphs through the service's own runtime and scoring code, so the figures
describe what the service serves, not the eager model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from service.manifest import GRAPH_FILES, read_manifest
from service.runtime import Runtime, load_graph
from service.scoring import sample_latents, scores
from training.data import load_dataset

MAX_DECODER_ROWS = 32_768  # rows x samples decoded at once


def evaluate(model_dir: Path, *, dataset: str | None = None, data: str | None = None, split: str = "val",
             samples: int = 1000, runtime: Runtime = "onnx", seed: int = 0, progress: bool = True,
             threads: int = 0) -> dict[str, Any]:
    manifest = read_manifest(model_dir)
    recorded = manifest.training.get("data", {})
    name = dataset or recorded.get("dataset")
    path = data if data is not None else recorded.get("path")
    if name is None:
        raise ValueError("the manifest records no dataset; pass --dataset")
    ds = load_dataset(name, path, likelihood=manifest.likelihood, seed=recorded.get("seed", 0),
                      val_fraction=recorded.get("val_fraction", 0.15), label_column=recorded.get("label_column"))
    if ds.input_dim != manifest.input_dim:
        raise ValueError(f"dataset rows have {ds.input_dim} features, the model takes {manifest.input_dim}")
    raw = {"val": ds.x_val, "test": ds.x_val, "train": ds.x_train}.get(split)
    if raw is None:
        raise ValueError(f"unknown split {split!r}; choose train, val or test")
    shift, scale = manifest.preprocessing.arrays()
    x = ((raw - shift) / scale).astype(np.float32)
    encoder = load_graph(model_dir / GRAPH_FILES["encoder", runtime], runtime, threads=threads)
    decoder = load_graph(model_dir / GRAPH_FILES["decoder", runtime], runtime, threads=threads)
    # Independent noise per row: a dataset mean needs it (the service's shared noise is for per-row
    # reproducibility, and one shared draw would bias the mean).
    rng = np.random.default_rng(seed)
    chunk = max(1, MAX_DECODER_ROWS // samples)
    iw, rec, kl = [], [], []
    for start in tqdm(range(0, len(x), chunk), desc=f"scoring {split} (K={samples})", disable=not progress,
                      unit="chunk"):
        xb = x[start : start + chunk]
        mean, logvar = encoder(xb)
        eps = rng.standard_normal((len(xb), samples, manifest.latent_dim)).astype(np.float32)
        out = decoder(sample_latents(mean, logvar, eps))[0]
        s, r, k = scores(xb, mean, logvar, eps, out, manifest.likelihood, manifest.decoder_logvar)
        iw.append(s)
        rec.append(r)
        kl.append(k)
    reconstruction, kl_mean = float(np.concatenate(rec).mean()), float(np.concatenate(kl).mean())
    result = {
        "model": manifest.name, "version": manifest.version, "runtime": runtime, "dataset": name,
        "split": split, "rows": len(x), "samples": samples,
        "negative_elbo": reconstruction + kl_mean,  # averaged over the K samples of every row
        "reconstruction": reconstruction, "kl": kl_mean,
    }
    if samples > 1:
        result["iw_nll"] = float(np.concatenate(iw).mean())
    return result
