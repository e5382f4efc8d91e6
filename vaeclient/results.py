"""Typed results: numpy arrays, one row per input row (or sample, or step)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Result:
    model: str
    version: int


@dataclass(frozen=True)
class EncodeResult(Result):
    mean: np.ndarray  # [N, L]
    logvar: np.ndarray  # [N, L]
    z: np.ndarray  # [N, L]: the mean, or a draw from q(z|x) when sample=True
    seed: int | None


@dataclass(frozen=True)
class DecodeResult(Result):
    outputs: np.ndarray  # [N, D], data space


@dataclass(frozen=True)
class ReconstructResult(Result):
    outputs: np.ndarray  # [N, D]
    latents: np.ndarray  # [N, L]
    seed: int | None


@dataclass(frozen=True)
class SampleResult(Result):
    outputs: np.ndarray  # [n, D]
    latents: np.ndarray  # [n, L]
    seed: int


@dataclass(frozen=True)
class InterpolateResult(Result):
    t: np.ndarray  # [S]
    latents: np.ndarray  # [S, L]
    outputs: np.ndarray  # [S, D]


@dataclass(frozen=True)
class AnomalyResult(Result):
    score: np.ndarray  # [N], nats; higher = more anomalous
    reconstruction: np.ndarray
    kl: np.ndarray
    percentile: np.ndarray  # 0-100 among the model's held-out rows
    is_anomaly: np.ndarray  # bool [N]
    threshold: float
    samples: int
    score_name: str  # elbo, iwae, complexity or typicality
    explanation: np.ndarray | None = None  # with explain=True: [N, D] nats per feature, summing to reconstruction
    feature_names: list[str] | None = None  # with explain=True: the model's column names, when it has them


@dataclass(frozen=True)
class ClassifyResult(Result):
    labels: list[str]  # [N]: each row's most likely class (semi-supervised models)
    probabilities: np.ndarray  # [N, C]: q(y|x), classes in the order GET /models/{name} lists them
