"""Anomaly scores from exported-graph outputs, in numpy (shared by the service and by export).

Vocabulary (pyod's): a higher score is more anomalous. The score is the negative ELBO in nats per
row or, with K > 1 samples, the importance-weighted estimate of -log p(x). Noise comes from one
fixed seed shared by every row (common random numbers), so a row always gets the same score,
whatever else is in its request or batch.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from scipy.special import erfcx, log_ndtr

from service.manifest import CURRENT_FORMULA, Typicality

LOG_2PI = math.log(2.0 * math.pi)
LN2 = math.log(2.0)
PROB_EPS = 1e-7  # decoders export probabilities; clip so log(0) cannot occur
# Posterior log-variances are held to +-LOGVAR_BOUND before use. Rows like the data give |logvar| well
# under 20; a row millions of standard deviations out can give one whose exp() overflows, and the
# most anomalous row of all would score NaN and go unflagged.
LOGVAR_BOUND = 30.0
# What a score that still overflows is reported as: the largest float, so it ranks and flags as the most
# anomalous (JSON has no infinity).
SCORE_CEILING = float(np.finfo(np.float64).max)


def common_noise(samples: int, latent_dim: int, seed: int) -> np.ndarray:
    """eps ~ N(0, I), [K, L], float32: the same for every row scored with this seed."""
    return np.random.default_rng(seed).standard_normal((samples, latent_dim)).astype(np.float32)


def one_hot(labels: np.ndarray, num_classes: int, repeat: int = 1) -> np.ndarray:
    """Class indices [N] -> float32 one-hot [N * repeat, C], each row repeated `repeat` times in place
    (as `sample_latents` lays out K samples per row)."""
    out = np.zeros((len(labels) * repeat, num_classes), dtype=np.float32)
    out[np.arange(len(out)), np.repeat(labels, repeat)] = 1.0
    return out


def with_label(rows: np.ndarray, labels: np.ndarray | None, num_classes: int, repeat: int = 1) -> np.ndarray:
    """A conditional model's graph input [rows | one-hot label], each of the labels [N] repeated `repeat`
    times to match rows [N * repeat, ...]; the rows as they are when there are no labels."""
    if labels is None:
        return rows
    return np.concatenate([rows, one_hot(labels, num_classes, repeat)], axis=1)


def every_label(rows: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [N, ...] once per class, row i's class c at i * C + c, and those classes [N * C]: a
    semi-supervised model's label-marginal score runs each row under every label."""
    return np.repeat(rows, num_classes, axis=0), np.tile(np.arange(num_classes), len(rows))


def label_marginal(values: np.ndarray, reconstruction: np.ndarray, kl: np.ndarray, num_classes: int,
                   explained: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Per-(row, class) scores in nats [N * C] (as `every_label` lays them out) -> the label-marginal score
    -log sum_y p(y) exp(-score_y) per row [N], with the uniform p(y) = 1/C the model was trained with; the
    reconstruction and KL terms (and an explanation [N * C, D]) averaged over the posterior over classes,
    p(y | x) proportional to exp(-score_y)."""
    s = values.reshape(-1, num_classes).astype(np.float64)
    top = (-s).max(axis=1, keepdims=True)
    log_sum = top[:, 0] + np.log(np.exp(-s - top).sum(axis=1))
    weights = np.exp(-s - log_sum[:, None])
    parts = [_finite(math.log(num_classes) - log_sum),
             (weights * reconstruction.reshape(-1, num_classes)).sum(axis=1),
             (weights * kl.reshape(-1, num_classes)).sum(axis=1)]
    if explained is not None:
        parts.append(np.einsum("nc,ncd->nd", weights, explained.reshape(len(s), num_classes, -1)))
    return tuple(parts)


def _per_row(eps: np.ndarray) -> np.ndarray:
    """Noise is [K, L] (shared by every row) or [N, K, L] (one draw per row)."""
    return eps[None] if eps.ndim == 2 else eps


def bounded(logvar: np.ndarray) -> np.ndarray:
    """The encoder's log-variance within +-LOGVAR_BOUND, float64."""
    return np.clip(logvar.astype(np.float64), -LOGVAR_BOUND, LOGVAR_BOUND)


def sample_latents(mean: np.ndarray, logvar: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """z [N*K, L]: row i's K samples are rows i*K .. i*K+K-1."""
    std = np.exp(0.5 * bounded(logvar))
    # A mean near float32's limit: z overflows to inf, its score to the ceiling.
    z = mean[:, None, :] + std[:, None, :] * _per_row(eps)
    return z.reshape(-1, mean.shape[1]).astype(np.float32)


def feature_log_likelihood(x: np.ndarray, output: np.ndarray, likelihood: str,
                           decoder_logvar: float | list[float] | None) -> np.ndarray:
    """log p(x_j | z) per feature, nats [M, D]; x [M, D], output [M, D] (probabilities or mean)."""
    x = x.astype(np.float64)
    out = output.astype(np.float64)
    if likelihood == "bernoulli":
        p = np.clip(out, PROB_EPS, 1.0 - PROB_EPS)
        return x * np.log(p) + (1.0 - x) * np.log1p(-p)
    assert decoder_logvar is not None
    lv = np.asarray(decoder_logvar, dtype=np.float64)  # a scalar, or one per feature [D]
    return -0.5 * (LOG_2PI + lv + (x - out) ** 2 * np.exp(-lv))


def log_likelihood(x: np.ndarray, output: np.ndarray, likelihood: str,
                   decoder_logvar: float | list[float] | None) -> np.ndarray:
    """log p(x | z) summed over features, nats [M]."""
    return np.sum(feature_log_likelihood(x, output, likelihood, decoder_logvar), axis=1)


def explanation(x: np.ndarray, output: np.ndarray, samples: int, likelihood: str,
                decoder_logvar: float | list[float] | None) -> np.ndarray:
    """Each feature's part of a row's reconstruction term, -log p(x_j | z) averaged over the K samples,
    nats [N, D]: a row's parts sum to its `reconstruction`; the KL term belongs to no feature.

    x [N, D] in model space, output [N*K, D] as in `scores`. Far from the data a part overflows; it is
    then the ceiling, like a score."""
    n = x.shape[0]
    parts = -feature_log_likelihood(np.repeat(x, samples, axis=0), output, likelihood, decoder_logvar)
    return _finite(parts.reshape(n, samples, -1).mean(axis=1))


def gaussian_kl(mean: np.ndarray, logvar: np.ndarray) -> np.ndarray:
    """KL(q(z|x) || N(0, I)) per row, nats."""
    mean = mean.astype(np.float64)
    logvar = bounded(logvar)
    return 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=1)


def scores(x: np.ndarray, mean: np.ndarray, logvar: np.ndarray, eps: np.ndarray, output: np.ndarray,
           likelihood: str, decoder_logvar: float | list[float] | None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, reconstruction, kl) per row, nats.

    x [N, D] in model space; `output` [N*K, D] is the decoder run on `sample_latents(mean, logvar, eps)`.
    reconstruction is -log p(x|z) averaged over the K samples; kl is analytic.
    """
    n, k = x.shape[0], eps.shape[-2]
    logvar = bounded(logvar)
    x_rep = np.repeat(x, k, axis=0)
    log_px = log_likelihood(x_rep, output, likelihood, decoder_logvar).reshape(n, k)
    kl = gaussian_kl(mean, logvar)
    reconstruction = -log_px.mean(axis=1)
    if k == 1:
        return reconstruction + kl, reconstruction, kl
    # Importance weights log p(x|z) + log p(z) - log q(z|x) with z = mean + std * eps.
    e = _per_row(eps).astype(np.float64)
    log_pz = -0.5 * np.sum(LOG_2PI + (mean[:, None, :] + np.exp(0.5 * logvar)[:, None, :] * e) ** 2, axis=2)
    log_qz = -0.5 * np.sum(LOG_2PI + logvar[:, None, :] + e**2, axis=2)
    log_w = log_px + log_pz - log_qz
    top = log_w.max(axis=1, keepdims=True)
    log_mean_w = top[:, 0] + np.log(np.mean(np.exp(log_w - top), axis=1))
    return -log_mean_w, reconstruction, kl


# The weight of the compressed length in the complexity score. Serra et al. subtract all of it (1.0); measured
# on MNIST (README), 1.0 also subtracts much of what makes an unseen digit class unlikely (held-out classes
# fall to a mean AUROC of 0.61 against the ELBO's 0.69), 0.25 no longer flags blank images, and 0.5 flags
# every kind of simple input and beats the ELBO on held-out classes.
COMPLEXITY_WEIGHT = 0.5


def compressed_bits(x: np.ndarray) -> np.ndarray:
    """Lossless compressed length, bits, of each row's shape: pixels above 0.5, bit-packed, zlib level 9.
    A compressor on grey levels would count smooth gradients as complex, which is what blurred inputs are."""
    packed = np.packbits(x > 0.5, axis=1)
    return np.array([8 * len(zlib.compress(row.tobytes(), 9)) for row in packed], dtype=np.float64)


# The per-row statistics the typicality score places among the training rows', in this order.
TYPICALITY_STATISTICS = ("reconstruction", "kl", "distance")


def typicality_statistics(x: np.ndarray, output: np.ndarray, reconstruction: np.ndarray, kl: np.ndarray
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(statistics [N, 3], log(1 + negative ELBO) [N]) of rows x [N, D] in model space, with `output`
    [N*K, D] as in `scores`. The statistics are log(1 + v) of the reconstruction term, the KL term and
    the Euclidean distance from x to the decoder's output averaged over the K samples (LPath's
    reconstruction distance: unlike the likelihood it does not reward dark, simple images)."""
    n = x.shape[0]
    diff = output.reshape(n, -1, x.shape[1]) - x[:, None, :].astype(np.float64)  # [N, K, D], no repeated copy of x
    distance = np.sqrt(np.einsum("nkd,nkd->nk", diff, diff)).mean(axis=1)
    values = np.stack([reconstruction, kl, distance], axis=1)
    return np.log1p(np.maximum(values, 0.0)), np.log1p(np.maximum(reconstruction + kl, 0.0))


def chi2_3_logsf(d2: np.ndarray) -> np.ndarray:
    """log P(chi-squared with 3 degrees of freedom >= d2), finite far into the tail (scipy's
    chi2.logsf is -inf past ~1e4): sf = exp(-u^2) (erfcx(u) + 2u/sqrt(pi)) with u = sqrt(d2 / 2)."""
    u = np.sqrt(np.maximum(d2, 0.0) / 2.0)
    return -(u**2) + np.log(erfcx(u) + 2.0 * u / math.sqrt(math.pi))


def typicality(statistics: np.ndarray, log_elbo: np.ndarray, reference: Typicality) -> np.ndarray:
    """The typicality score, nats of surprise (-log p) of the more surprising of two tests against the
    training rows: two-sided on the statistics (their squared Mahalanobis distance, read as chi-squared
    with 3 degrees of freedom) and one-sided on log(1 + negative ELBO) (a normal upper tail). The first
    flags inputs a likelihood finds too likely (blank, simple, another data set's easier images), the
    second keeps the ELBO's power on rows that are merely unlikely."""
    mean, precision = reference.arrays()
    d = statistics - mean
    d2 = np.einsum("ij,jk,ik->i", d, precision, d)
    z = (log_elbo - reference.elbo_mean) / reference.elbo_std
    return np.maximum(-chi2_3_logsf(d2), -log_ndtr(-z))


def served_score(score: str, x: np.ndarray, mean: np.ndarray, logvar: np.ndarray, eps: np.ndarray,
                 output: np.ndarray, likelihood: str, decoder_logvar: float | list[float] | None,
                 reference: Typicality | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score, reconstruction, kl) per row for a named score, higher = more anomalous.

    elbo: the negative ELBO (reconstruction averaged over the K samples, plus KL), nats.
    iwae: the importance-weighted -log p(x) over K samples, nats.
    complexity: -log2 p(x) - w * L(x), bits: the model's code length (the importance-weighted -log p(x), in
      bits) minus part (w = COMPLEXITY_WEIGHT) of a generic compressor's code length for the image's shape
      (Serra et al. 2020), so inputs that are merely simple (blank, constant) no longer look the most normal.
    typicality: `typicality` against the model's `reference` (fitted on its training rows at export), nats.
    """
    if score not in CURRENT_FORMULA:
        raise ValueError(f"unknown score {score!r}")
    # Overflow is expected far from the data (service/__init__.py quiets numpy's warning); see _finite.
    iw, reconstruction, kl = (_finite(a) for a in scores(x, mean, logvar, eps, output, likelihood, decoder_logvar))
    if score == "elbo":
        return _finite(reconstruction + kl), reconstruction, kl
    if score == "iwae":
        return iw, reconstruction, kl
    if score == "typicality":
        if reference is None:
            raise ValueError("the typicality score needs the model's typicality reference")
        return _finite(typicality(*typicality_statistics(x, output, reconstruction, kl), reference)), \
            reconstruction, kl
    return _finite(iw / LN2 - COMPLEXITY_WEIGHT * compressed_bits(x)), reconstruction, kl


def _finite(values: np.ndarray) -> np.ndarray:
    """Overflowed scores (inf, or NaN from inf - inf) as SCORE_CEILING: the most anomalous, not unflagged."""
    return np.nan_to_num(values, nan=SCORE_CEILING, posinf=SCORE_CEILING, neginf=-SCORE_CEILING)


def supports_complexity(likelihood: str, input_shape: list[int]) -> bool:
    """The complexity score is for Bernoulli image models (pixels in [0, 1], shape C x H x W)."""
    return likelihood == "bernoulli" and len(input_shape) == 3


def graph_passes(encoder: Callable[[np.ndarray], Sequence[np.ndarray]],
                 decoder: Callable[[np.ndarray], Sequence[np.ndarray]], x: np.ndarray, *, samples: int, seed: int,
                 latent_dim: int, chunk_values: int = 1 << 22, labels: np.ndarray | None = None, num_classes: int = 0,
                 marginal: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(x, mean, logvar, eps, decoded) per chunk of model-space rows x [N, D], as many rows at a time as
    decode (K samples each) to at most `chunk_values` values, with the fixed noise of `seed`: the encoder
    and decoder passes the service runs. The bound keeps a conv model's activations to a few hundred MB.
    `marginal`: each row under every label (`every_label`); x is then those repeated rows."""
    eps = common_noise(samples, latent_dim, seed)
    step = max(1, chunk_values // (samples * max(1, x.shape[1]) * (num_classes if marginal else 1)))
    for start in range(0, len(x), step):
        xb = x[start : start + step]
        yb = None if labels is None else labels[start : start + step]
        if marginal:
            xb, yb = every_label(xb, num_classes)
        mean, logvar, *_ = encoder(with_label(xb, yb, num_classes))
        (decoded,) = decoder(with_label(sample_latents(mean, logvar, eps), yb, num_classes, samples))
        yield xb, mean, logvar, eps, decoded


def score_with_graphs(encoder: Callable[[np.ndarray], Sequence[np.ndarray]],
                      decoder: Callable[[np.ndarray], Sequence[np.ndarray]], x: np.ndarray, *, score: str,
                      samples: int, seed: int, latent_dim: int, likelihood: str,
                      decoder_logvar: float | list[float] | None, chunk_values: int = 1 << 22,
                      labels: np.ndarray | None = None, num_classes: int = 0,
                      reference: Typicality | None = None, marginal: bool = False) -> np.ndarray:
    """Per-row scores of model-space rows x [N, D], run through exported graphs in one thread with the
    fixed noise of `seed`: what the service serves, for callers that hold the graphs themselves
    (export's calibration, offline evaluation and vae-score). `labels`: class indices [N] for a
    conditional model; `reference`: the typicality score's; `marginal`: a semi-supervised model's
    label-marginal score (elbo or iwae), no labels needed."""
    parts = []
    for xb, mean, logvar, eps, decoded in graph_passes(encoder, decoder, x, samples=samples, seed=seed,
                                                       latent_dim=latent_dim, chunk_values=chunk_values,
                                                       labels=labels, num_classes=num_classes, marginal=marginal):
        part = served_score(score, xb, mean, logvar, eps, decoded, likelihood, decoder_logvar, reference)
        parts.append(label_marginal(*part, num_classes)[0] if marginal else part[0])
    return np.concatenate(parts)
