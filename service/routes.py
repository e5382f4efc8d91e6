"""The routers: thin wrappers that name each endpoint's parameters and its work."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.responses import Response

from service import schemas
from service.codec import ARROW, JSON, NPY, NPZ, PNG, encode_json
from service.deps import AppState, State, add_head
from service.errors import NotReady
from service.operations import OPERATIONS, Operation
from service.pipeline import serve
from service.repository import LoadedModel

router = APIRouter()
Endpoint = Callable[[Request, AppState], Awaitable[Response]]

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
        content[ARROW] = {"schema": {"type": "string", "format": "binary", "description": "the same rows as an Arrow "
                                     "IPC stream: a numeric column per feature (matched to the model's names), or "
                                     "one fixed-size-list column of rows"}}
    binary = {"type": "string", "format": "binary"}
    npz: dict[str, Any] = {NPZ: {"schema": {**binary, "description": "one array per field"}},
                           ARROW: {"schema": {**binary, "description": "one record batch: a column per field "
                                              "(rows of 2-D fields as fixed-size lists, per-row labels as "
                                              "strings), scalars as metadata"}}}
    if "columns" in request_model.model_fields:
        npz[PNG] = {"schema": {"type": "string", "format": "binary",
                               "description": "image models: the outputs as one picture (README: Pictures)"}}
    return {
        "openapi_extra": {"requestBody": {"required": False, "content": content}},
        "responses": {200: {"model": response_model, "content": npz}, **ERRORS},
        "response_class": Response,
    }


def _native(op: Operation, request_model: type[BaseModel], response_model: type[BaseModel], summary: str,
            npy: str | None) -> Endpoint:
    """Register `op` at POST /<name>; the function is what /docs documents and `VAEApp` calls."""

    async def endpoint(request: Request, state: State) -> Response:
        return await serve(request, state, op)

    endpoint.__name__ = op.name.replace("-", "_")
    router.post(f"/{op.name}", summary=summary, **_doc(request_model, response_model, npy))(endpoint)
    return endpoint


_ops = OPERATIONS
ARRAY_ENDPOINTS: dict[str, Endpoint] = {f"/{op.name}": _native(op, *doc) for op, doc in (
    (_ops["encode"], (schemas.EncodeRequest, schemas.EncodeResponse, "Rows -> posterior mean, log-variance and z",
                      "inputs [N, D]; other fields as query")),
    (_ops["decode"], (schemas.DecodeRequest, schemas.DecodeResponse, "Latents -> outputs in data space",
                      "latents [N, L]")),
    (_ops["reconstruct"], (schemas.ReconstructRequest, schemas.ReconstructResponse, "Rows -> encode -> decode",
                           "inputs [N, D]")),
    (_ops["sample"], (schemas.SampleParams, schemas.SampleResponse,
                      "Draw from the prior and decode; the same seed gives the same samples", None)),
    (_ops["interpolate"], (schemas.InterpolateRequest, schemas.InterpolateResponse,
                           "A path between two points, decoded",
                           "2 rows (start, end); query latent=true if they are latents")),
    (_ops["anomaly-score"], (schemas.AnomalyRequest, schemas.AnomalyResponse,
                             "Per-row anomaly scores (nats) against the model's calibration", "inputs [N, D]")),
    (_ops["classify"], (schemas.ClassifyRequest, schemas.ClassifyResponse,
                        "Semi-supervised models: each row's class and q(y|x)", "inputs [N, D]")),
)}


def _info(model: LoadedModel, versions: list[int]) -> dict[str, Any]:
    m = model.manifest
    cal = m.calibration
    return {
        "name": m.name, "version": m.version, "versions": versions, "input_shape": m.input_shape,
        "input_dim": m.input_dim, "latent_dim": m.latent_dim, "likelihood": m.likelihood,
        "feature_names": m.feature_names, "classes": m.classes, "semi_supervised": m.semi_supervised,
        "runtime": model.runtime, "device": model.device,
        "runtime_timings_us": model.runtime_timings,
        "calibration": {"score": cal.score, "samples": cal.samples, "n_rows": cal.n_rows,
                        "threshold": cal.threshold, "threshold_level": cal.threshold_level,
                        "levels": cal.levels, "values": cal.values},
        "scores": {name: {"samples": c.samples, "threshold": c.threshold, "threshold_level": c.threshold_level}
                   for name, c in {"elbo": cal, **m.calibrations}.items()},
        "default_score": m.default_score,
        "marginal_scores": {name: {"samples": c.samples, "threshold": c.threshold, "threshold_level": c.threshold_level}
                            for name, c in m.marginal_calibrations.items()},
        "metrics": m.metrics, "created_at": m.created_at.isoformat(), "training_command": m.training.get("command"),
    }


@router.get("/models", summary="Loaded models and their versions; refused versions with the reason")
async def list_models(state: State) -> Response:
    repo = await state.loaded_repository()
    s = state.settings
    body = {
        "default": s.default_model,
        "limits": {"max_rows": s.max_rows, "max_samples": s.max_samples, "max_decode_rows": s.max_decode_rows,
                   "max_steps": s.max_steps, "max_body_bytes": s.max_body_bytes},
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


@router.post("/admin/reload", summary="Look for new and vanished model versions now (needs a key when keys are on)")
async def reload_models(state: State) -> Response:
    repo = await state.loaded_repository()
    report = await repo.reload()
    body = {"loaded": report.loaded, "unloaded": report.unloaded, "refused": report.refused,
            "models": {name: sorted(v) for name, v in sorted(repo.models.items())}}
    return Response(encode_json(body), media_type=JSON)


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


add_head(router, "/health/live", "/health/ready")
