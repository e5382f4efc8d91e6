"""The routers: thin wrappers that name each endpoint's parameters and its work."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from service import inference, schemas
from service.codec import JSON, NPY, NPZ, encode_json
from service.deps import State
from service.errors import InvalidInput, NotReady
from service.pipeline import Call, serve
from service.repository import LoadedModel

router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": schemas.ErrorBody, "description": text}
    for code, text in {
        400: "malformed body", 404: "unknown model or version", 413: "body or row count over its limit",
        415: "unsupported Content-Type", 422: "invalid input: the message names the field",
        500: "the batch this request was in failed", 503: "overloaded or not ready (Retry-After)",
        504: "timed out (VAE_REQUEST_TIMEOUT)",
    }.items()
}


def _doc(request_model: type[BaseModel], response_model: type[BaseModel], npy: str | None) -> dict[str, Any]:
    content: dict[str, Any] = {JSON: {"schema": request_model.model_json_schema()}}
    if npy:
        content[NPY] = {"schema": {"type": "string", "format": "binary", "description": npy}}
    npz = {NPZ: {"schema": {"type": "string", "format": "binary", "description": "one array per field"}}}
    return {
        "openapi_extra": {"requestBody": {"required": False, "content": content}},
        "responses": {200: {"model": response_model, "content": npz}, **ERRORS},
        "response_class": Response,
    }


@router.post("/encode", summary="Rows -> posterior mean, log-variance and z",
             **_doc(schemas.EncodeRequest, schemas.EncodeResponse, "inputs [N, D]; other fields as query"))
async def encode(request: Request, state: State) -> Response:
    async def run(call: Call) -> dict[str, Any]:
        return await inference.encode(call.model, x=call.rows("inputs"), sample=call.params.sample,
                                      seed=call.params.seed)
    return await serve(request, state, "encode", schemas.EncodeParams, run)


@router.post("/decode", summary="Latents -> outputs in data space",
             **_doc(schemas.DecodeRequest, schemas.DecodeResponse, "latents [N, L]"))
async def decode(request: Request, state: State) -> Response:
    async def run(call: Call) -> dict[str, Any]:
        return await inference.decode(call.model, z=call.latents("latents"))
    return await serve(request, state, "decode", schemas.DecodeParams, run)


@router.post("/reconstruct", summary="Rows -> encode -> decode",
             **_doc(schemas.ReconstructRequest, schemas.ReconstructResponse, "inputs [N, D]"))
async def reconstruct(request: Request, state: State) -> Response:
    async def run(call: Call) -> dict[str, Any]:
        return await inference.reconstruct(call.model, x=call.rows("inputs"), sample=call.params.sample,
                                           seed=call.params.seed)
    return await serve(request, state, "reconstruct", schemas.ReconstructParams, run)


@router.post("/sample", summary="Draw from the prior and decode; the same seed gives the same samples",
             **_doc(schemas.SampleParams, schemas.SampleResponse, None))
async def sample(request: Request, state: State) -> Response:
    async def run(call: Call) -> dict[str, Any]:
        p = call.params
        if call.npy is not None:
            raise InvalidInput("/sample takes no array: send its fields as JSON, or as query parameters with no "
                               "body (Accept: application/x-npz still answers .npz)")
        call.check_range("n", p.n, call.settings.max_rows, "VAE_MAX_ROWS")
        return await inference.sample(call.model, n=p.n, seed=p.seed, temperature=p.temperature)
    return await serve(request, state, "sample", schemas.SampleParams, run)


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


@router.post("/interpolate", summary="A path between two points, decoded",
             **_doc(schemas.InterpolateRequest, schemas.InterpolateResponse,
                    "2 rows (start, end); query latent=true if they are latents"))
async def interpolate(request: Request, state: State) -> Response:
    async def run(call: Call) -> dict[str, Any]:
        p = call.params
        call.check_range("steps", p.steps, call.settings.max_steps, "VAE_MAX_STEPS")
        ends = _interpolation_ends(call)
        return await inference.interpolate(call.model, steps=p.steps, method=p.method, **ends)
    return await serve(request, state, "interpolate", schemas.InterpolateParams, run)


@router.post("/anomaly-score", summary="Per-row anomaly scores (nats) against the model's calibration",
             **_doc(schemas.AnomalyRequest, schemas.AnomalyResponse, "inputs [N, D]"))
async def anomaly_score(request: Request, state: State) -> Response:
    async def run(call: Call) -> dict[str, Any]:
        p = call.params
        s = call.settings
        call.check_range("samples", p.samples, s.max_samples, "VAE_MAX_SAMPLES")
        x = call.rows("inputs")
        call.check_range("samples", len(x) * p.samples, s.max_decode_rows, "rows x samples, VAE_MAX_DECODE_ROWS")
        result = await inference.anomaly_score(call.model, x=x, samples=p.samples, threshold=p.threshold)
        labels = (call.model.name, str(call.model.version))
        state.metrics.scored.labels(*labels).inc(len(x))
        state.metrics.anomalies.labels(*labels).inc(int(result["is_anomaly"].sum()))
        return result
    return await serve(request, state, "anomaly-score", schemas.AnomalyParams, run)


ARRAY_ENDPOINTS = {"/encode": encode, "/decode": decode, "/reconstruct": reconstruct, "/sample": sample,
                   "/interpolate": interpolate, "/anomaly-score": anomaly_score}


def _info(model: LoadedModel, versions: list[int]) -> dict[str, Any]:
    m = model.manifest
    cal = m.calibration
    return {
        "name": m.name, "version": m.version, "versions": versions, "input_shape": m.input_shape,
        "input_dim": m.input_dim, "latent_dim": m.latent_dim, "likelihood": m.likelihood,
        "feature_names": m.feature_names, "runtime": model.runtime, "device": model.device,
        "runtime_timings_us": model.runtime_timings,
        "calibration": {"score": cal.score, "samples": cal.samples, "n_rows": cal.n_rows,
                        "threshold": cal.threshold, "threshold_level": cal.threshold_level,
                        "levels": cal.levels, "values": cal.values},
        "metrics": m.metrics, "created_at": m.created_at.isoformat(), "training_command": m.training.get("command"),
    }


@router.get("/models", summary="Loaded models and their versions; refused versions with the reason")
async def list_models(state: State) -> Response:
    repo = await state.loaded_repository()
    body = {
        "default": state.settings.default_model,
        "models": [{"name": name, "versions": sorted(v), "latest": max(v)} for name, v in sorted(repo.models.items())],
        "refused": repo.failures,
    }
    return Response(encode_json(body), media_type=JSON)


@router.get("/models/{name}", response_model=schemas.ModelVersionInfo, responses=ERRORS,
            summary="What a caller needs to know about a model (version: latest unless given)")
async def model_info(name: str, state: State, version: int | None = None) -> Response:
    repo = await state.loaded_repository()
    model = repo.get(name, version)
    return Response(encode_json(_info(model, sorted(repo.models[model.name]))), media_type=JSON)


@router.get("/health/live", summary="The process is up")
async def live() -> Response:
    return Response(b'{"status":"live"}', media_type=JSON)


@router.get("/health/ready", summary="200 once the default model is loaded, 503 before",
            responses={503: {"model": schemas.ErrorBody}})
async def ready(state: State) -> Response:
    repo = state.repository
    if repo is None:
        raise NotReady(state.load_error or "models are still loading")
    if not repo.default_loaded:
        raise NotReady(f"the default model {state.settings.default_model!r} is not loaded (VAE_DEFAULT_MODEL); "
                       "GET /models lists refused versions and why")
    return Response(b'{"status":"ready"}', media_type=JSON)
