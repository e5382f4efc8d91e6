"""The seven operations, each as its parameter model and its work on a parsed `Call`.

Both ways in, the native endpoints (`routes.py`) and the Open Inference Protocol (`v2.py`), parse
a request into a `Call` and run the same `Operation`, so they share validation, limits, batching
and metrics. Nothing here knows which protocol a call came through.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel

from service import inference, schemas
from service.call import Call
from service.deps import AppState
from service.errors import InvalidInput
from service.manifest import MARGINAL_SCORES, score_asked
from service.scoring import supports_complexity

Payload = dict[str, Any]
Work = Callable[[Call, AppState], Awaitable[Payload]]


@dataclass(frozen=True, slots=True)
class Operation:
    name: str  # the native path without its slash, and the v2 model suffix
    params: type[BaseModel]
    run: Work


async def _encode(call: Call, state: AppState) -> Payload:
    x = call.rows("inputs")
    return await inference.encode(call.model, x=x, sample=call.params.sample, seed=call.params.seed,
                                  labels=call.labels(len(x), inferred=True))


async def _decode(call: Call, state: AppState) -> Payload:
    z = call.latents("latents")
    return await inference.decode(call.model, z=z, labels=call.labels(len(z)))


async def _reconstruct(call: Call, state: AppState) -> Payload:
    x = call.rows("inputs")
    return await inference.reconstruct(call.model, x=x, sample=call.params.sample, seed=call.params.seed,
                                       labels=call.labels(len(x), inferred=True))


async def _sample(call: Call, state: AppState) -> Payload:
    p = call.params
    if call.npy is not None:
        raise InvalidInput("/sample takes no array: send its fields as JSON, or as query parameters with no "
                           "body (Accept: application/x-npz still answers .npz)")
    call.check_range("n", p.n, call.settings.max_rows, "VAE_MAX_ROWS")
    return await inference.sample(call.model, n=p.n, seed=p.seed, temperature=p.temperature,
                                  labels=call.labels(p.n, inferred=True))


def _interpolation_ends(call: Call) -> dict[str, np.ndarray | None]:
    if call.npy is not None:
        field = "latents" if call.params.latent else "inputs"
        both = call.latents(field) if call.params.latent else call.rows(field)
        if len(both) != 2:
            raise InvalidInput(f"an .npy body for /interpolate holds 2 rows (start, end); got {len(both)}",
                               field=field)
        if call.params.latent:
            return {"start": None, "end": None, "start_latent": both[:1], "end_latent": both[1:]}
        return {"start": both[:1], "end": both[1:], "start_latent": None, "end_latent": None}
    ends = {"start": call.row("start", latent=False), "end": call.row("end", latent=False),
            "start_latent": call.row("start_latent", latent=True), "end_latent": call.row("end_latent", latent=True)}
    data_pair = ends["start"] is not None and ends["end"] is not None
    latent_pair = ends["start_latent"] is not None and ends["end_latent"] is not None
    if data_pair == latent_pair:
        given = [k for k, v in ends.items() if v is not None]
        raise InvalidInput(f"give either start and end, or start_latent and end_latent; got {given or 'none'}",
                           field="start")
    return ends


async def _interpolate(call: Call, state: AppState) -> Payload:
    p = call.params
    call.check_range("steps", p.steps, call.settings.max_steps, "VAE_MAX_STEPS")
    ends = _interpolation_ends(call)
    labels = call.labels(1, inferred=ends["start"] is not None)  # data ends: the start row's class can be inferred
    return await inference.interpolate(call.model, steps=p.steps, method=p.method, **ends,
                                       label=None if labels is None else int(labels[0]))


async def _anomaly_score(call: Call, state: AppState) -> Payload:
    p = call.params
    s = call.settings
    model = call.model
    marginal = model.semi_supervised and p.label is None and p.labels is None
    score = score_asked(p.score, p.samples, "elbo" if marginal else model.manifest.default_score)
    calibration = model.manifest.calibration_for(score, marginal)
    if calibration is None and marginal:
        raise InvalidInput(f"without a label, model {model.name} v{model.version} scores -log p(x) with the label "
                           f"marginalised: {', '.join(MARGINAL_SCORES)}; {score!r} needs a label (label or labels)",
                           field="score")
    if calibration is None:
        image_model = supports_complexity(model.manifest.likelihood, model.manifest.input_shape)
        why = ("it is for Bernoulli image models" if score in ("complexity", "typicality") and not image_model
               else "its export predates the formula served now; export the model again")
        raise InvalidInput(f"model {model.name} v{model.version} has no {score!r} score ({why}); it serves "
                           f"{', '.join(['elbo', *model.manifest.calibrations])}", field="score")
    samples = p.samples or calibration.samples
    call.check_range("samples", samples, s.max_samples, "VAE_MAX_SAMPLES")
    x = call.rows("inputs")
    copies = model.num_classes if marginal else 1  # a marginalised label: every row decodes once per class
    call.check_range("samples", len(x) * samples * copies, s.max_decode_rows,
                     "rows x samples x classes (the label is marginalised), VAE_MAX_DECODE_ROWS" if marginal
                     else "rows x samples, VAE_MAX_DECODE_ROWS")
    result = await inference.anomaly_score(model, x=x, score=score, samples=samples, calibration=calibration,
                                           threshold=p.threshold, labels=call.labels(len(x), inferred=True),
                                           explain=p.explain,
                                           pass_values=s.max_pass_values, gone=call.gone)
    labels = (model.name, str(model.version))
    state.metrics.scored.labels(*labels).inc(len(x))
    state.metrics.anomalies.labels(*labels).inc(int(result["is_anomaly"].sum()))
    score_hist, percentile_hist, drift_gauge = state.metrics.anomaly(model.name, model.version, score)
    for value, percentile in zip(result["score"].tolist(), result["percentile"].tolist(), strict=True):
        score_hist.observe(value)
        percentile_hist.observe(percentile)
    drift = model.drift.get(score)
    if drift is not None and samples == calibration.samples:
        drift_gauge.set(drift.observe(result["score"]))
    return result


async def _classify(call: Call, state: AppState) -> Payload:
    model = call.model
    if not model.semi_supervised:
        raise InvalidInput(f"model {model.name} v{model.version} has no classifier: /classify is for semi-supervised "
                           "models (vae-train --semi-supervised)", field="model")
    return await inference.classify(model, x=call.rows("inputs"))


OPERATIONS: dict[str, Operation] = {op.name: op for op in (
    Operation("encode", schemas.EncodeParams, _encode),
    Operation("decode", schemas.DecodeParams, _decode),
    Operation("reconstruct", schemas.ReconstructParams, _reconstruct),
    Operation("sample", schemas.SampleParams, _sample),
    Operation("interpolate", schemas.InterpolateParams, _interpolate),
    Operation("anomaly-score", schemas.AnomalyParams, _anomaly_score),
    Operation("classify", schemas.ClassifyParams, _classify),
)}


# The operations a model answers (what v2 lists as `<model>.<operation>`), by whether it is semi-supervised:
# /classify only where the model has a classifier. Built once: v2 and gRPC infer look it up per request.
_SERVED = {True: tuple(OPERATIONS.values()),
           False: tuple(op for op in OPERATIONS.values() if op.name != "classify")}


def served_by(semi_supervised: bool) -> tuple[Operation, ...]:
    return _SERVED[semi_supervised]
