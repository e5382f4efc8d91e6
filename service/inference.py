"""The work behind each endpoint: plain functions over a LoadedModel and numpy arrays.

Inputs arrive already validated, in the caller's data space; outputs go back in data space.
Randomness is drawn per request from its own seed, outside the graphs, so results never depend
on what else shares a batch. A row so far outside the model's data that a step overflows float32 is
refused (422, naming the row) rather than answered with NaN, which JSON would carry as null; only
/anomaly-score answers such rows, as the most anomalous.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from service.batching import all_finite
from service.errors import ClientGone, InvalidInput
from service.manifest import Calibration, ScoreName, Typicality
from service.pools import run_in
from service.repository import LoadedModel
from service.scoring import every_label, explanation, label_marginal, sample_latents, served_score, with_label

Payload = dict[str, Any]


def _seed(seed: int | None) -> int:
    return secrets.randbits(63) if seed is None else seed


def _header(model: LoadedModel) -> Payload:
    return {"model": model.name, "version": model.version}


def _within_float32(values: np.ndarray, field: str, step: str, per_row: bool = True) -> np.ndarray:
    """values [N, ...]; a 422 when any is inf or NaN, naming the first such row of `field` when
    `per_row` (values[i] comes from field[i]), else the field."""
    if all_finite((values,)):
        return values
    ok = np.isfinite(values).reshape(len(values), -1).all(axis=1)  # (or finite values summed past float32)
    if not ok.all():
        where = f"{field}[{int(np.argmin(ok))}]" if per_row else field
        raise InvalidInput(f"{where} is too far outside this model's data: {step} overflows float32 (POST "
                           "/anomaly-score scores such rows as the most anomalous)", field=where)
    return values


async def _probabilities(model: LoadedModel, xm: np.ndarray, field: str = "inputs") -> np.ndarray:
    """q(y|x) [N, C] of a semi-supervised model's model-space rows: the encoder graph's third output,
    which reads x alone, so the label slot is left empty."""
    *_, probabilities = await model.encoder(np.concatenate([xm, np.zeros((len(xm), model.num_classes), np.float32)],
                                                           axis=1))
    return _within_float32(probabilities, field, "the classifier's output for it")


def _names(model: LoadedModel, codes: np.ndarray) -> list[str]:
    return [model.classes[i] for i in codes.tolist()]


async def _encode(model: LoadedModel, x: np.ndarray, sample: bool, seed: int | None, labels: np.ndarray | None,
                  field: str = "inputs") -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None, np.ndarray | None]:
    """(mean, logvar, z, seed used, labels inferred): a semi-supervised model given no labels encodes each
    row with q(y|x)'s most likely class, and says which."""
    xm = model.to_model_space(x)
    inferred = None
    if labels is None and model.semi_supervised:
        _within_float32(xm, field, "the model's scaling of it")
        labels = inferred = (await _probabilities(model, xm, field)).argmax(axis=1)
    outputs = await model.encoder(with_label(xm, labels, model.num_classes))
    mean, logvar = outputs[0], outputs[1]
    if not outputs.finite:  # the pass saw an inf or NaN: whose rows? (ours are checked before our outputs)
        _within_float32(xm, field, "the model's scaling of it")
        for out in (mean, logvar):
            _within_float32(out, field, "the encoder's output for it")
    if not sample:
        return mean, logvar, mean, None, inferred
    used = _seed(seed)
    eps = np.random.default_rng(used).standard_normal(mean.shape, dtype=np.float32)
    z = mean + np.exp(0.5 * logvar) * eps
    return mean, logvar, _within_float32(z, field, "its sampled latent"), used, inferred


async def _decode(model: LoadedModel, z: np.ndarray, labels: np.ndarray | None, field: str,
                  per_row: bool = True) -> np.ndarray:
    (out,) = await model.decoder(with_label(z, labels, model.num_classes))
    return _within_float32(model.to_data_space(out), field, "the decoder's output for it", per_row)


async def encode(model: LoadedModel, *, x: np.ndarray, sample: bool, seed: int | None,
                 labels: np.ndarray | None = None) -> Payload:
    mean, logvar, z, used, inferred = await _encode(model, x, sample, seed, labels)
    return {**_header(model), "mean": mean, "logvar": logvar, "z": z, "seed": used,
            **({} if inferred is None else {"labels": _names(model, inferred)})}


async def decode(model: LoadedModel, *, z: np.ndarray, labels: np.ndarray | None = None) -> Payload:
    return {**_header(model), "outputs": await _decode(model, z, labels, "latents")}


async def reconstruct(model: LoadedModel, *, x: np.ndarray, sample: bool, seed: int | None,
                      labels: np.ndarray | None = None) -> Payload:
    _, _, z, used, inferred = await _encode(model, x, sample, seed, labels)
    return {**_header(model), "outputs": await _decode(model, z, labels if inferred is None else inferred, "inputs"),
            "latents": z, "seed": used, **({} if inferred is None else {"labels": _names(model, inferred)})}


async def classify(model: LoadedModel, *, x: np.ndarray) -> Payload:
    """A semi-supervised model's q(y|x): each row's most likely class and every class's probability."""
    probabilities = await _probabilities(model, _within_float32(model.to_model_space(x), "inputs",
                                                                "the model's scaling of it"))
    return {**_header(model), "labels": _names(model, probabilities.argmax(axis=1)), "probabilities": probabilities}


async def sample(model: LoadedModel, *, n: int, seed: int | None, temperature: float,
                 labels: np.ndarray | None = None) -> Payload:
    """The same seed gives the same latents whatever the labels: a label changes only what is drawn. A
    semi-supervised model given no labels draws them from its uniform prior over classes (seeded too)."""
    used = _seed(seed)
    rng = np.random.default_rng(used)
    z = temperature * rng.standard_normal((n, model.latent_dim), dtype=np.float32)
    if labels is None and model.semi_supervised:
        labels = rng.integers(0, model.num_classes, n)
    outputs = await _decode(model, z, labels, "temperature", per_row=False)
    payload = {**_header(model), "outputs": outputs, "latents": z, "seed": used}
    if labels is not None:
        payload["labels"] = _names(model, labels)
    return payload


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
                      method: str, label: int | None = None) -> Payload:
    """Endpoints given in data space are encoded to their means; latents are used as given.
    A conditional model's path keeps one class (`label`, an index) from end to end; a semi-supervised
    model given none takes the start row's most likely class, and says which."""
    labels = None if label is None else np.full(steps, label, dtype=np.int64)
    inferred: dict[str, list[str]] = {}
    if start is not None and end is not None:
        field = "start, end"
        ends = _within_float32(model.to_model_space(np.concatenate([start, end])), field, "the model's scaling", False)
        if labels is None and model.semi_supervised:
            guess = int((await _probabilities(model, ends[:1], field)).argmax())
            labels = np.full(steps, guess, dtype=np.int64)
            inferred["labels"] = [model.classes[guess]]
        mean, *_ = await model.encoder(with_label(ends, None if labels is None else labels[:2], model.num_classes))
        a, b = _within_float32(mean, field, "the encoder's output", False)
    else:
        assert start_latent is not None and end_latent is not None
        field = "start_latent, end_latent"
        a, b = start_latent[0], end_latent[0]
    t = np.linspace(0.0, 1.0, steps, dtype=np.float32)
    z = slerp(a, b, t) if method == "slerp" else lerp(a, b, t)
    return {**_header(model), "t": t, "latents": z,
            "outputs": await _decode(model, z, labels, field, per_row=False), **inferred}


OFFLOAD_VALUES = 1 << 16  # decoded values in a pass above which its scores are computed off the event loop


def _score_pass(score: ScoreName, x: np.ndarray, mean: np.ndarray, logvar: np.ndarray, eps: np.ndarray,
                out: np.ndarray, likelihood: str, decoder_logvar: float | list[float] | None,
                reference: Typicality | None, explain: bool) -> tuple[np.ndarray, ...]:
    """(score, reconstruction, kl[, explanation]) of one pass's rows."""
    part = served_score(score, x, mean, logvar, eps, out, likelihood, decoder_logvar, reference)
    return (*part, explanation(x, out, eps.shape[-2], likelihood, decoder_logvar)) if explain else part


def rows_per_pass(samples: int, width: int, pass_values: int) -> int:
    """Rows whose K samples decode to at most `pass_values` values (at least one row)."""
    return max(1, pass_values // (samples * width))


async def anomaly_score(model: LoadedModel, *, x: np.ndarray, score: ScoreName, samples: int,
                        calibration: Calibration, threshold: float | None, labels: np.ndarray | None = None,
                        explain: bool = False, pass_values: int = 1 << 20,
                        gone: Callable[[], Awaitable[bool]] | None = None) -> Payload:
    """Per-row scores, higher = more anomalous, placed among the calibration rows of that score
    (a conditional model scores -log p(x | label); a semi-supervised one given no labels, -log p(x)
    with the label marginalised, against its marginal calibration); with `explain`, each feature's part of the
    reconstruction term (`scoring.explanation`), and the manifest's feature names.

    The rows go through the graphs a group at a time, each group's K samples decoding to at most
    `pass_values` values (VAE_MAX_PASS_VALUES): no forward pass holds an inference thread for long, other
    requests' passes run between them, and a request past its timeout, or whose client is `gone`, runs no
    further pass."""
    xm = model.to_model_space(x)
    eps = model.noise(samples)
    m = model.manifest
    marginal = labels is None and model.semi_supervised  # each row under every label (`label_marginal`)
    copies = model.num_classes if marginal else 1
    step = max(1, rows_per_pass(samples, m.input_dim, pass_values) // copies)
    parts: list[tuple[np.ndarray, ...]] = []
    for start in range(0, len(xm), step):
        if start and gone is not None and await gone():
            raise ClientGone(f"the client closed the connection after {start} of {len(xm)} rows were scored; "
                             "the rest were not")
        xb = xm[start : start + step]
        yb = None if labels is None else labels[start : start + step]
        if marginal:
            xb, yb = every_label(xb, model.num_classes)
        mean, logvar, *_ = await model.encoder(with_label(xb, yb, model.num_classes))
        (out,) = await model.decoder(with_label(sample_latents(mean, logvar, eps), yb, model.num_classes, samples))
        args = (score, xb, mean, logvar, eps, out, m.likelihood, m.decoder_logvar, m.typicality, explain)
        # A pass's arithmetic is float64 over every decoded value: tens of ms for a full pass, which the
        # event loop must not spend. numpy lets go of the GIL for it, so a worker thread frees the loop.
        part = await run_in(model.background, _score_pass, *args) if out.size > OFFLOAD_VALUES else _score_pass(*args)
        if marginal:
            part = label_marginal(part[0], part[1], part[2], model.num_classes, part[3] if explain else None)
        parts.append(part)
    values, reconstruction, kl, *explained = (np.concatenate(a) for a in zip(*parts, strict=True))
    used = calibration.threshold if threshold is None else threshold
    return {
        **_header(model), "score": values, "reconstruction": reconstruction, "kl": kl,
        "percentile": calibration.percentile(values), "is_anomaly": values > used, "threshold": used,
        "samples": samples, "score_name": score,
        **({"explanation": explained[0], "feature_names": m.feature_names} if explain else {}),
    }
