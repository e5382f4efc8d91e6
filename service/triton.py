"""Triton's HTTP extensions to the v2 protocol, as Triton spells them: model configuration,
the repository index and statistics (`../shared/specs/triton-extensions/`).

Perf Analyzer reads `GET /v2/models/{name}/config` before anything else, and tritonclient's
`get_model_config`, `get_model_repository_index` and `get_inference_statistics` call these paths.
The configuration describes each v2 model (`<model>.<operation>`) in Triton's ModelConfig JSON: the
operations that take a batch of rows have `max_batch_size` VAE_MAX_ROWS with each tensor's `dims`
without the batch dimension (one value per row is `dims [1]`, reshaped to `[]`, Triton's idiom);
sample and interpolate have `max_batch_size` 0 and their full shapes. Loading and unloading follow
the model folder (VAE_RELOAD_INTERVAL, POST /admin/reload), as Triton's poll mode does, so explicit
load and unload answer 400 as Triton's do in that mode.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service import codec
from service.deps import AppState, State
from service.errors import InvalidInput, NotAllowed
from service.operations import Operation, served_by
from service.pipeline import read_body
from service.repository import LoadedModel, Repository
from service.settings import Settings
from service.statistics import BATCHED_OPERATIONS
from service.v2 import INPUTS, OUTPUTS, resolve

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2: Triton's extensions"])

DATA_TYPES = {"FP32": "TYPE_FP32", "FP64": "TYPE_FP64", "BOOL": "TYPE_BOOL"}
BACKENDS = {"onnx": "onnxruntime", "torch": "pytorch"}


def _json(body: Any) -> Response:
    return Response(codec.encode_json(body), media_type=codec.JSON)


def _dims(model: LoadedModel, kind: str, batched: bool) -> list[int]:
    width = {"data": [model.manifest.input_dim], "latent": [model.latent_dim], "one": [],
             "class": [model.num_classes]}[kind]
    if batched:
        return width or [1]
    return [-1, *width]


def model_config(model: LoadedModel, op: Operation, settings: Settings) -> dict[str, Any]:
    """Triton's ModelConfig JSON for one v2 model version."""
    batched = op.name in BATCHED_OPERATIONS
    inputs = []
    for name in INPUTS[op.name]:
        kind = "data" if name == "inputs" else "latent"
        spec: dict[str, Any] = {"name": name, "data_type": "TYPE_FP32", "format": "FORMAT_NONE",
                                "dims": _dims(model, kind, batched)}
        if op.name == "interpolate":  # two rows, start and end, of one of the two
            spec["dims"] = [2, _dims(model, kind, True)[0]]
            spec["optional"] = True
        inputs.append(spec)
    outputs = []
    for name, (kind, datatype) in OUTPUTS[op.name].items():
        spec = {"name": name, "data_type": DATA_TYPES[datatype], "dims": _dims(model, kind, batched)}
        if batched and kind == "one":
            spec["reshape"] = {"shape": []}
        outputs.append(spec)
    config: dict[str, Any] = {
        "name": f"{model.name}.{op.name}", "platform": "vaeserve",
        "backend": BACKENDS.get(model.runtime, model.runtime),
        "version_policy": {"specific": {"versions": [model.version]}},
        "max_batch_size": settings.max_rows if batched else 0,
        "input": inputs, "output": outputs,
        "instance_group": [{"name": f"{model.name}.{op.name}", "count": settings.inference_threads,
                            "kind": "KIND_GPU" if model.device.startswith("cuda") else "KIND_CPU"}],
        "parameters": {"operation": {"string_value": op.name},
                       "input_shape": {"string_value": orjson.dumps(model.manifest.input_shape).decode()},
                       "classes": {"string_value": orjson.dumps(model.manifest.classes).decode()}},
    }
    if batched:
        config["dynamic_batching"] = {"max_queue_delay_microseconds": int(settings.max_batch_delay_ms * 1000),
                                      "preferred_batch_size": [settings.max_batch_size]}
    return config


async def model_stats(state: AppState, name: str | None, version: str | None) -> list[dict[str, Any]]:
    """Triton's `model_stats` for every loaded v2 model version (`name` None), every version of one
    (`version` None), or one version; a version that has served nothing reports zeros."""
    repo = await state.loaded_repository()
    if name is None:
        chosen = [(model, v, op.name) for model, versions in sorted(repo.models.items()) for v in sorted(versions)
                  for op in served_by(versions[v].semi_supervised)]
    else:
        model, op, versions = await resolve(state, name, version)
        chosen = [(model.name, v, op.name) for v in ([model.version] if version is not None else versions)]
    return [state.statistics.get(*key).to_dict(f"{key[0]}.{key[2]}", key[1]) for key in chosen]


@router.get("/models/stats", summary="Statistics of every loaded v2 model version (Triton's statistics extension)")
async def all_stats(state: State) -> Response:
    return _json({"model_stats": await model_stats(state, None, None)})


@router.get("/models/{name}/stats", summary="Statistics of every loaded version of one v2 model")
async def name_stats(name: str, state: State) -> Response:
    return _json({"model_stats": await model_stats(state, name, None)})


@router.get("/models/{name}/versions/{version}/stats", summary="Statistics of one v2 model version")
async def version_stats(name: str, version: str, state: State) -> Response:
    return _json({"model_stats": await model_stats(state, name, version)})


@router.get("/models/{name}/config", summary="Triton's model configuration of a v2 model (latest version)")
async def config_latest(name: str, state: State) -> Response:
    model, op, _ = await resolve(state, name, None)
    return _json(model_config(model, op, state.settings))


@router.get("/models/{name}/versions/{version}/config", summary="Triton's model configuration of one version")
async def config_version(name: str, version: str, state: State) -> Response:
    model, op, _ = await resolve(state, name, version)
    return _json(model_config(model, op, state.settings))


def index_entries(repo: Repository, ready: bool) -> list[dict[str, str]]:
    """Every v2 model version: READY, or (unless `ready`) UNAVAILABLE with the reason it was refused."""
    entries = [{"name": f"{name}.{op.name}", "version": str(version), "state": "READY", "reason": ""}
               for name, versions in sorted(repo.models.items()) for version in sorted(versions)
               for op in served_by(versions[version].semi_supervised)]
    if not ready:
        for key, reason in sorted(repo.failures.items()):
            name, version = key.split("/")
            entries += [{"name": f"{name}.{op.name}", "version": version, "state": "UNAVAILABLE", "reason": reason}
                        for op in served_by(False)]
        entries.sort(key=lambda e: (e["name"], int(e["version"])))
    return entries


@router.post("/repository/index", summary="Every v2 model version in the repository, loaded or refused, and its state")
async def repository_index(request: Request, state: State) -> Response:
    ready = codec.parse_json(await read_body(request, state)).get("ready", False)
    if not isinstance(ready, bool):
        raise InvalidInput(f"ready must be true or false, got {ready!r}", field="ready")
    return _json(index_entries(await state.loaded_repository(), ready))


def _no_explicit_control(action: str) -> NotAllowed:
    return NotAllowed(f"explicit model {action} is not allowed: vaeserve loads and unloads versions as their folders "
                        "appear and vanish in VAE_MODEL_DIR (checked every VAE_RELOAD_INTERVAL seconds, or at once "
                        "with POST /admin/reload)", field="model_name")


@router.post("/repository/models/{name}/load", summary="Refused: versions follow the model folder (400)",
             responses={400: {"description": "explicit load is not allowed"}})
async def load_model(name: str) -> Response:
    raise _no_explicit_control("load")


@router.post("/repository/models/{name}/unload", summary="Refused: versions follow the model folder (400)",
             responses={400: {"description": "explicit unload is not allowed"}})
async def unload_model(name: str) -> Response:
    raise _no_explicit_control("unload")
