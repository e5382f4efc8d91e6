"""Export a trained VAE into a versioned model folder: graphs, weights, verified parity, manifest."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from service.manifest import (
    CALIBRATED_SAMPLES,
    CURRENT_FORMULA,
    DECODER_ONNX,
    DECODER_TS,
    ENCODER_ONNX,
    ENCODER_TS,
    GRAPH_FILES,
    MANIFEST_FILE,
    MARGINAL_SCORES,
    NAME_PATTERN,
    PARITY_TOLERANCE,
    SCHEMA_VERSION,
    WEIGHTS_FILE,
    Calibration,
    Manifest,
    ParityCheck,
    ScoreName,
    Typicality,
    sha256_of,
)
from service.runtime import load_graph
from service.scoring import (
    TYPICALITY_STATISTICS,
    graph_passes,
    score_with_graphs,
    scores,
    supports_complexity,
    typicality_statistics,
    with_label,
)
from service.signing import SIGNATURE_FILE, load_private_key, sign_folder
from training.data import Dataset
from training.model import VAE

PARITY_BATCHES = (1, 64)
CALIBRATION_LEVELS = np.linspace(0.0, 1.0, 201)
CALIBRATION_SEED = 0
THRESHOLD_LEVEL = 0.99
TYPICALITY_SAMPLES = CALIBRATED_SAMPLES["typicality"]
TYPICALITY_ROWS = 10_000  # training rows its reference is fitted on
ONNX_OPSET = 18


class ExportError(RuntimeError):
    """An export that must not be written: a graph disagrees with the eager model."""


def next_version(model_root: Path) -> int:
    versions = [int(p.name) for p in model_root.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def _quiet() -> contextlib.ExitStack:
    """The exporters print progress and warn about their own internals; keep the CLI readable."""
    stack = contextlib.ExitStack()
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    stack.callback(onnx_log.setLevel, level)
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _export_graph(module: nn.Module, example: torch.Tensor, folder: Path, ts_name: str, onnx_name: str,
                  input_name: str, output_names: list[str]) -> None:
    module = module.eval()
    with _quiet(), torch.no_grad():
        torch.jit.trace(module, example).save(str(folder / ts_name))
        torch.onnx.export(
            module, (example,), str(folder / onnx_name), input_names=[input_name], output_names=output_names,
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1 << 20)},), dynamo=True,
            external_data=False, opset_version=ONNX_OPSET, verbose=False,
        )


def decoder_logvar(model: VAE) -> float | list[float] | None:
    """The Gaussian decoder's log-variance as the manifest stores it: one number, or one per feature."""
    if model.cfg.likelihood != "gaussian":
        return None
    values = model.decoder_logvar.detach().cpu().double().tolist()
    return values if model.cfg.per_feature_logvar else float(values[0])


def _labelled(rows: np.ndarray, labels: np.ndarray | None, num_classes: int) -> np.ndarray:
    """Graph input rows: [rows | one-hot label] for a conditional model."""
    return with_label(rows, None if labels is None else labels[: len(rows)], num_classes)


def check_parity(folder: Path, model: VAE, x_val: np.ndarray, y_val: np.ndarray | None = None) -> list[ParityCheck]:
    """Each exported graph against the eager model, on validation rows and random inputs, batches 1 and 64
    (conditional: validation rows with their labels, random rows with random labels)."""
    rng = np.random.default_rng(0)
    cfg = model.cfg
    c = cfg.num_classes
    random_y = rng.integers(0, c, 64) if c else None
    val_x = _labelled(x_val[:64], y_val, c)
    with torch.no_grad():
        val_latents = model.encoder(torch.from_numpy(val_x))[0].numpy()
    random_x = (rng.random((64, cfg.input_dim)) if cfg.likelihood == "bernoulli"
                else rng.standard_normal((64, cfg.input_dim))).astype(np.float32)
    inputs = {
        "encoder": {"validation": val_x, "random": _labelled(random_x, random_y, c)},
        "decoder": {"validation": _labelled(val_latents, y_val, c),
                    "random": _labelled(rng.standard_normal((64, cfg.latent_dim)).astype(np.float32), random_y, c)},
    }
    eager = {"encoder": model.exported_encoder(), "decoder": model.output_head()}
    checks = []
    for (graph_name, runtime), file in GRAPH_FILES.items():
        graph = load_graph(folder / file, runtime)
        for kind, data in inputs[graph_name].items():
            for batch in PARITY_BATCHES:
                xb = np.ascontiguousarray(data[:batch])
                if len(xb) < batch:  # fewer validation rows than the batch: tile them
                    xb = np.ascontiguousarray(np.resize(data, (batch, data.shape[1])))
                with torch.no_grad():
                    ref = eager[graph_name](torch.from_numpy(xb))
                refs = ref if isinstance(ref, tuple) else (ref,)
                got = graph(xb)
                diff = max(float(np.max(np.abs(g - r.numpy()))) for g, r in zip(got, refs, strict=True))
                if not diff <= PARITY_TOLERANCE:
                    raise ExportError(f"{file} ({runtime}) differs from the eager model by {diff:.3g} "
                                      f"on {kind} inputs at batch {batch} (tolerance {PARITY_TOLERANCE})")
                checks.append(ParityCheck.model_validate({"graph": graph_name, "runtime": runtime, "inputs": kind,
                                                          "batch_size": batch, "max_abs_diff": diff}))
    return checks


def _graph_args(folder: Path, model: VAE) -> dict[str, Any]:
    """The exported ONNX graphs the service runs and the model facts scoring needs."""
    return {"encoder": load_graph(folder / ENCODER_ONNX, "onnx"), "decoder": load_graph(folder / DECODER_ONNX, "onnx"),
            "latent_dim": model.cfg.latent_dim, "num_classes": model.cfg.num_classes}


def calibrate(folder: Path, model: VAE, x_val: np.ndarray, score: ScoreName = "elbo", samples: int = 1,
              y_val: np.ndarray | None = None, reference: Typicality | None = None,
              marginal: bool = False) -> Calibration:
    """Quantiles of held-out rows' scores, computed with the exported ONNX graphs the service runs,
    with the same fixed noise the service scores with (a conditional model: with the rows' labels;
    `marginal`: a semi-supervised model's label-marginal score, labels unused)."""
    values_all = score_with_graphs(**_graph_args(folder, model), x=x_val, score=score, samples=samples,
                                   seed=CALIBRATION_SEED, likelihood=model.cfg.likelihood,
                                   decoder_logvar=decoder_logvar(model), labels=None if marginal else y_val,
                                   reference=reference, marginal=marginal)
    values = np.maximum.accumulate(np.quantile(values_all, CALIBRATION_LEVELS))
    return Calibration(score=CURRENT_FORMULA[score],
                       samples=samples, seed=CALIBRATION_SEED, n_rows=len(values_all),
                       levels=CALIBRATION_LEVELS.tolist(), values=values.tolist(), threshold_level=THRESHOLD_LEVEL,
                       threshold=float(np.quantile(values_all, THRESHOLD_LEVEL)))


def typicality_rows(n: int) -> np.ndarray:
    """Which of n training rows the typicality reference is fitted on: all, or a fixed draw of TYPICALITY_ROWS."""
    if n <= TYPICALITY_ROWS:
        return np.arange(n)
    return np.sort(np.random.default_rng(CALIBRATION_SEED).choice(n, TYPICALITY_ROWS, replace=False))


def fit_typicality(folder: Path, model: VAE, x_fit: np.ndarray, y_fit: np.ndarray | None = None) -> Typicality:
    """The typicality score's reference: the statistics of training rows x_fit (model space), through the
    exported graphs with the service's noise at K = TYPICALITY_SAMPLES."""
    stats, log_elbo = [], []
    for xb, mean, logvar, eps, decoded in graph_passes(**_graph_args(folder, model), x=x_fit,
                                                       samples=TYPICALITY_SAMPLES, seed=CALIBRATION_SEED,
                                                       labels=y_fit):
        _, reconstruction, kl = scores(xb, mean, logvar, eps, decoded, model.cfg.likelihood, decoder_logvar(model))
        s, e = typicality_statistics(xb, decoded, reconstruction, kl)
        stats.append(s)
        log_elbo.append(e)
    a, e = np.concatenate(stats), np.concatenate(log_elbo)
    covariance = np.cov(a.T) + 1e-9 * np.eye(a.shape[1])  # a constant statistic must not make it singular
    return Typicality(statistics=list(TYPICALITY_STATISTICS), samples=TYPICALITY_SAMPLES, seed=CALIBRATION_SEED,
                      n_rows=len(a), mean=a.mean(axis=0).tolist(), precision=np.linalg.inv(covariance).tolist(),
                      elbo_mean=float(e.mean()), elbo_std=float(max(e.std(), 1e-9)))


def calibrate_all(folder: Path, model: VAE, x_val: np.ndarray, y_val: np.ndarray | None = None,
                  x_fit: np.ndarray | None = None, y_fit: np.ndarray | None = None,
                  report: Callable[[str], None] | None = None
                  ) -> tuple[Calibration, dict[ScoreName, Calibration], Typicality | None]:
    """The default score's calibration, every other score this model serves, and (image models, given
    training rows `x_fit`) the typicality score's reference."""
    say = report or (lambda _: None)
    image_model = supports_complexity(model.cfg.likelihood, list(model.cfg.input_shape))
    others: dict[ScoreName, Calibration] = {}
    names: tuple[ScoreName, ...] = ("iwae", "complexity") if image_model else ("iwae",)
    for score in names:
        k = CALIBRATED_SAMPLES[score]
        say(f"calibrating the {score} score on {len(x_val)} held-out rows (K={k})")
        others[score] = calibrate(folder, model, x_val, score, k, y_val)
    reference = None
    if image_model and x_fit is not None:
        say(f"fitting the typicality score on {len(x_fit)} training rows")
        reference = fit_typicality(folder, model, x_fit, y_fit)
        others["typicality"] = calibrate(folder, model, x_val, "typicality", TYPICALITY_SAMPLES, y_val, reference)
    return calibrate(folder, model, x_val, y_val=y_val), others, reference


def marginal_calibrations(folder: Path, model: VAE, x_val: np.ndarray,
                          report: Callable[[str], None] | None = None) -> dict[ScoreName, Calibration]:
    """A semi-supervised model's label-marginal scores, calibrated on the held-out rows without their labels."""
    if not model.cfg.semi_supervised:
        return {}
    say = report or (lambda _: None)
    out: dict[ScoreName, Calibration] = {}
    for score in MARGINAL_SCORES:
        k = CALIBRATED_SAMPLES[score]
        say(f"calibrating the label-marginal {score} score on {len(x_val)} held-out rows (K={k})")
        out[score] = calibrate(folder, model, x_val, score, k, marginal=True)
    return out


def with_inferred_labels(model: VAE, x: np.ndarray, labels: np.ndarray | None) -> np.ndarray | None:
    """Class indices with a semi-supervised model's unlabelled rows (-1) given q(y|x)'s most likely class:
    what the service infers for a row sent without a label."""
    if labels is None or not model.cfg.semi_supervised or (labels >= 0).all():
        return labels
    with torch.no_grad():
        guess = model.classifier(torch.from_numpy(x)).argmax(dim=1).numpy()
    return np.where(labels >= 0, labels, guess)


def claim_new_model(output: Path, base: str) -> Path:
    """Create `output/<base>` (or `<base>-2`, `-3`, ... when taken) and return it: a model of its own.

    mkdir is the claim, so two runs at once never end up as two versions of one model."""
    for n in range(1, 10_000):
        name = base if n == 1 else f"{base[:60]}-{n}"
        try:
            (output / name).mkdir()
            return output / name
        except FileExistsError:
            continue
    raise ExportError(f"{output}: no free model name {base}-N; pass --name")


def export_model(model: VAE, data: Dataset, *, name: str, output: Path, training: dict[str, Any],
                 metrics: dict[str, float], sign: Path | None = None, new_model: bool = False,
                 report: Callable[[str], None] | None = None) -> tuple[Path, Manifest]:
    """Write `output/name/<next version>/` atomically; never touches an existing version.

    `new_model`: `name` is only a base: the export becomes version 1 of a model no one else has
    (`claim_new_model`), never another version of an existing one.
    `sign`: an Ed25519 private key (PEM); the folder then carries `model.sig` from the start.
    `report`: called with a line as each stage starts (the calibrations take most of the time).
    """
    import re

    say = report or (lambda _: None)
    key = load_private_key(sign) if sign is not None else None
    if not re.match(NAME_PATTERN, name):
        raise ExportError(f"model name {name!r} must match {NAME_PATTERN}")
    model = model.cpu().eval()
    output.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=output))  # "." folders are never served
    try:
        x_val = data.preprocessing.apply(data.x_val)
        semi = model.cfg.semi_supervised
        y_val = with_inferred_labels(model, x_val, data.label_index_val if model.cfg.conditional else None)
        c = model.cfg.num_classes
        example = torch.from_numpy(_labelled(x_val[:8], y_val, c))
        say("exporting the encoder and decoder to TorchScript and ONNX")
        _export_graph(model.exported_encoder(), example, work, ENCODER_TS, ENCODER_ONNX, "x",
                      ["mean", "logvar", *(["probabilities"] if semi else [])])
        with torch.no_grad():
            z_example = torch.from_numpy(_labelled(model.encoder(example)[0].numpy(), y_val, c))
        _export_graph(model.output_head(), z_example, work, DECODER_TS, DECODER_ONNX, "z", ["x_mean"])
        save_file({k: v.contiguous() for k, v in model.weights().items()}, str(work / WEIGHTS_FILE))
        say("checking both runtimes against the eager model")
        parity = check_parity(work, model, x_val, y_val)
        keep = typicality_rows(len(data.x_train))
        x_fit = data.preprocessing.apply(data.x_train[keep])
        y_fit = data.label_index_train[keep] if model.cfg.conditional and data.label_index_train is not None else None
        y_fit = with_inferred_labels(model, x_fit, y_fit)
        calibration, calibrations, typicality = calibrate_all(work, model, x_val, y_val, x_fit, y_fit, report=say)
        marginal = marginal_calibrations(work, model, x_val, report=say)
        files = {f.name: sha256_of(f) for f in sorted(work.iterdir()) if f.is_file()}
        for f in work.iterdir():  # mkdtemp made these private; a model folder is read by other users
            f.chmod(0o644)
        work.chmod(0o755)
        cfg = model.cfg
        root = claim_new_model(output, name) if new_model else output / name
        root.mkdir(exist_ok=True)
        name = root.name
        while True:  # claim the next free version number; rename fails if a concurrent run took it
            version = next_version(root)
            manifest = Manifest.model_validate({
                "schema_version": SCHEMA_VERSION, "name": name, "version": version,
                "created_at": datetime.now(UTC), "input_shape": list(cfg.input_shape),
                "latent_dim": cfg.latent_dim, "likelihood": cfg.likelihood,
                "decoder_logvar": decoder_logvar(model),
                "preprocessing": data.preprocessing.to_dict(), "feature_names": data.feature_names,
                "classes": data.classes if model.cfg.conditional else None, "semi_supervised": semi,
                "architecture": cfg.to_dict(), "training": training, "metrics": metrics, "parity": parity,
                "calibration": calibration, "calibrations": calibrations, "typicality": typicality,
                "marginal_calibrations": marginal, "files": files,
            })
            (work / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
            if key is not None:
                sign_folder(work, key)
                (work / SIGNATURE_FILE).chmod(0o644)
            target = root / str(version)
            try:
                os.rename(work, target)
            except OSError:
                if target.exists():
                    continue
                raise
            return target, manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)
