"""The work behind each endpoint: plain functions over a LoadedModel and numpy arrays.

Inputs arrive already validated, in the caller's data space; outputs go back in data space.
Randomness is drawn per request from its own seed, outside the graphs, so results never depend
on what else shares a batch.
"""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np

from service.manifest import Calibration, ScoreName
from service.repository import LoadedModel
from service.scoring import binarize, sample_latents, served_score

Payload = dict[str, Any]


def _seed(seed: int | None) -> int:
    return secrets.randbits(63) if seed is None else seed


def _header(model: LoadedModel) -> Payload:
    return {"model": model.name, "version": model.version}


async def _encode(model: LoadedModel, x: np.ndarray, sample: bool, seed: int | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
    mean, logvar = await model.encoder(model.to_model_space(x))
    if not sample:
        return mean, logvar, mean, None
    used = _seed(seed)
    eps = np.random.default_rng(used).standard_normal(mean.shape, dtype=np.float32)
    return mean, logvar, mean + np.exp(0.5 * logvar) * eps, used


async def _decode(model: LoadedModel, z: np.ndarray) -> np.ndarray:
    (out,) = await model.decoder(z)
    return model.to_data_space(out)


async def encode(model: LoadedModel, *, x: np.ndarray, sample: bool, seed: int | None) -> Payload:
    mean, logvar, z, used = await _encode(model, x, sample, seed)
    return {**_header(model), "mean": mean, "logvar": logvar, "z": z, "seed": used}


async def decode(model: LoadedModel, *, z: np.ndarray) -> Payload:
    return {**_header(model), "outputs": await _decode(model, z)}


async def reconstruct(model: LoadedModel, *, x: np.ndarray, sample: bool, seed: int | None) -> Payload:
    _, _, z, used = await _encode(model, x, sample, seed)
    return {**_header(model), "outputs": await _decode(model, z), "latents": z, "seed": used}


async def sample(model: LoadedModel, *, n: int, seed: int | None, temperature: float) -> Payload:
    used = _seed(seed)
    z = temperature * np.random.default_rng(used).standard_normal((n, model.latent_dim), dtype=np.float32)
    return {**_header(model), "outputs": await _decode(model, z), "latents": z, "seed": used}


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Spherical interpolation of vectors a, b [L] at t [S] -> [S, L]; linear when they are parallel."""
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return lerp(a, b, t)
    omega = np.arccos(np.clip(np.dot(a / na, b / nb), -1.0, 1.0))
    if np.sin(omega) < 1e-6:
        return lerp(a, b, t)
    w_a = np.sin((1 - t) * omega) / np.sin(omega)
    w_b = np.sin(t * omega) / np.sin(omega)
    return (w_a[:, None] * a + w_b[:, None] * b).astype(np.float32)


def lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    return ((1 - t)[:, None] * a + t[:, None] * b).astype(np.float32)


async def interpolate(model: LoadedModel, *, start: np.ndarray | None, end: np.ndarray | None,
                      start_latent: np.ndarray | None, end_latent: np.ndarray | None, steps: int,
                      method: str) -> Payload:
    """Endpoints given in data space are encoded to their means; latents are used as given."""
    if start is not None and end is not None:
        mean, _ = await model.encoder(model.to_model_space(np.concatenate([start, end])))
        a, b = mean[0], mean[1]
    else:
        assert start_latent is not None and end_latent is not None
        a, b = start_latent[0], end_latent[0]
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)
    z = slerp(a, b, t) if method == "slerp" else lerp(a, b, t)
    return {**_header(model), "t": t, "latents": z, "outputs": await _decode(model, z)}


async def anomaly_score(model: LoadedModel, *, x: np.ndarray, score: ScoreName, samples: int,
                        calibration: Calibration, threshold: float | None) -> Payload:
    """Per-row scores, higher = more anomalous, placed among the calibration rows of that score."""
    xm = model.to_model_space(x)
    if score == "complexity":
        xm = binarize(xm)
    mean, logvar = await model.encoder(xm)
    eps = model.noise(samples)
    (out,) = await model.decoder(sample_latents(mean, logvar, eps))
    m = model.manifest
    values, reconstruction, kl = served_score(score, xm, mean, logvar, eps, out, m.likelihood, m.decoder_logvar)
    used = calibration.threshold if threshold is None else threshold
    return {
        **_header(model), "score": values, "reconstruction": reconstruction, "kl": kl,
        "percentile": calibration.percentile(values), "is_anomaly": values > used, "threshold": used,
        "samples": samples, "score_name": score,
    }
