"""The Open Inference Protocol (KServe's v2 REST protocol, as Triton and MLServer speak it).

An adapter at the edge: every model version offers one v2 model per operation, named
`<model>.<operation>` (`digits.encode`, `digits.anomaly-score`, ...), whose request is parsed into the
same `Call` and run by the same `Operation` as the native endpoints, through the same batchers (a v2
and a native request can share a batch). Tensors come as JSON `data` or, with the binary tensor data
extension, as raw little-endian bytes after a JSON header of `Inference-Header-Content-Length` bytes.
Request `parameters` are the native endpoint's fields (`seed`, `samples`, `n`, `label`, ...; per-row
`labels` comma-separated, as parameters are scalars); scalar results (`seed`, `threshold`) and the
labels of samples come back as response `parameters`. Errors answer `{"error": "..."}`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from service import codec
from service.call import Call
from service.deps import AppState, State, add_head
from service.errors import InvalidInput, MalformedBody, ModelNotFound, NotReady, quoted
from service.operations import OPERATIONS, Operation, Payload, served_by
from service.pipeline import handle, read_body, validate_params
from service.repository import LoadedModel, Repository

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol v2"])

# binary_tensor_data here; the rest in triton.py.
SERVER = {"name": "vaeserve", "version": "0.1.0",
          "extensions": ["binary_tensor_data", "model_configuration", "model_repository", "statistics"]}
HEADER_LENGTH = "inference-header-content-length"
INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")
# Request parameters that belong to the protocol (tritonclient sends them), not to the operation.
PROTOCOL_PARAMETERS = frozenset({"binary_data_output", "priority", "timeout"})

# The tensors each operation takes and gives: name -> what its rows are ("data": the model's input
# rows, "latent": latent vectors, "one": one value per row or step). Interpolation takes either
# `inputs` or `latents`, two rows: start and end.
INPUTS: dict[str, tuple[str, ...]] = {
    "encode": ("inputs",), "decode": ("latents",), "reconstruct": ("inputs",), "sample": (),
    "interpolate": ("inputs", "latents"), "anomaly-score": ("inputs",), "classify": ("inputs",),
}
OUTPUTS: dict[str, dict[str, tuple[str, str]]] = {
    "encode": {"mean": ("latent", "FP32"), "logvar": ("latent", "FP32"), "z": ("latent", "FP32")},
    "decode": {"outputs": ("data", "FP32")},
    "reconstruct": {"outputs": ("data", "FP32"), "latents": ("latent", "FP32")},
    "sample": {"outputs": ("data", "FP32"), "latents": ("latent", "FP32")},
    "interpolate": {"t": ("one", "FP32"), "latents": ("latent", "FP32"), "outputs": ("data", "FP32")},
    # Scores are computed in float64 and served as such, so v2 and native answers agree exactly.
    "anomaly-score": {"score": ("one", "FP64"), "reconstruction": ("one", "FP64"), "kl": ("one", "FP64"),
                      "percentile": ("one", "FP64"), "is_anomaly": ("one", "BOOL"),
                      "explanation": ("data", "FP64")},  # only with the parameter explain: true
    "classify": {"probabilities": ("class", "FP32")},  # the labels come back as the parameter `labels`
}
DATATYPES = {np.dtype(np.float32): "FP32", np.dtype(np.float64): "FP64", np.dtype(np.bool_): "BOOL"}


def split_name(name: str) -> tuple[str, Operation]:
    """`digits.anomaly-score` -> ("digits", the anomaly-score operation)."""
    model, _, op = name.rpartition(".")
    if not model or op not in OPERATIONS:
        raise ModelNotFound(f"v2 model {quoted(name)}: v2 models are named <model>.<operation>, with operation one of "
                            f"{', '.join(OPERATIONS)} (e.g. digits.encode)", field="model_name")
    return model, OPERATIONS[op]


def parse_version(version: str | None) -> int | None:
    if version is None:
        return None
    number = codec.ascii_int(version)
    if number is None or number < 1:
        raise ModelNotFound(f"model version {quoted(version)} is not a positive integer (ASCII digits)",
                            field="model_version")
    return number


def _width(model: LoadedModel, kind: str) -> list[int]:
    return {"data": [-1, model.manifest.input_dim], "latent": [-1, model.latent_dim], "one": [-1],
            "class": [-1, model.num_classes]}[kind]


def metadata(model: LoadedModel, op: Operation, versions: list[int]) -> dict[str, Any]:
    inputs = [{"name": name, "datatype": "FP32",
               "shape": [2, model.manifest.input_dim if name == "inputs" else model.latent_dim]
               if op.name == "interpolate" else _width(model, "data" if name == "inputs" else "latent")}
              for name in INPUTS[op.name]]
    outputs = [{"name": name, "datatype": datatype, "shape": _width(model, kind)}
               for name, (kind, datatype) in OUTPUTS[op.name].items()]
    return {"name": f"{model.name}.{op.name}", "versions": [str(v) for v in versions], "platform": "vaeserve",
            "inputs": inputs, "outputs": outputs,
            "parameters": {"operation": op.name, "input_shape": model.manifest.input_shape,
                           "classes": model.manifest.classes}}


def check_datatype(name: str, datatype: Any, where: str) -> None:
    """Inputs are FP32 (what the graphs take), whichever protocol brings them."""
    if datatype != "FP32":
        raise InvalidInput(f"input {quoted(name)} has datatype {quoted(datatype)}; this server takes FP32",
                           field=f"{where}.datatype")


def add_input(tensors: dict[str, np.ndarray], name: str, array: np.ndarray, model: str, op: Operation,
              where: str) -> None:
    """One input tensor into `tensors`: an input the operation takes, given once."""
    if name not in INPUTS[op.name]:
        takes = ", ".join(INPUTS[op.name]) or "none (its fields are parameters)"
        raise InvalidInput(f"{quoted(name)} is not an input of {model}; its inputs: {takes}", field=where)
    if name in tensors:
        raise InvalidInput(f"input {quoted(name)} is given twice", field=where)
    tensors[name] = array


def check_output(name: Any, model: str, op: Operation, where: str) -> str:
    """A requested output's name, once it is known to be one of the operation's outputs."""
    if not isinstance(name, str) or name not in OUTPUTS[op.name]:
        raise InvalidInput(f"{quoted(name)} is not an output of {model}; its outputs: {', '.join(OUTPUTS[op.name])}",
                           field=where)
    return name


def output_tensors(payload: Payload, wanted: Container[str] | None
                   ) -> tuple[dict[str, Any], list[tuple[str, str, np.ndarray]]]:
    """A payload as v2 answers it: (response parameters from its scalars and names, [(output, datatype,
    array)] for the arrays `wanted` holds, all when None)."""
    parameters: dict[str, Any] = {}
    tensors = []
    for key, value in payload.items():
        if key in ("model", "version") or value is None:
            continue
        if not isinstance(value, np.ndarray):
            parameters[key] = value
            continue
        if wanted is not None and key not in wanted:
            continue
        datatype = DATATYPES.get(value.dtype)
        if datatype is None:
            value, datatype = value.astype(np.float32), "FP32"
        tensors.append((key, datatype, value))
    return parameters, tensors


def _dict(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{where} must be a JSON object, got {type(value).__name__}", field=where)
    return value


@dataclass(slots=True)
class InferRequest:
    """The protocol-level parts of a v2 request, kept for building its response."""

    name: str
    id: str | None = None
    binary_output: bool = False
    outputs: dict[str, bool] | None = None  # requested output -> binary; None = all
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


def _tensor(spec: Any, i: int, binary: bytes, offset: int) -> tuple[str, np.ndarray, int]:
    """One request input -> (name, array, new offset into the binary section)."""
    where = f"inputs[{i}]"
    spec = _dict(spec, where)
    name, datatype, shape = spec.get("name"), spec.get("datatype"), spec.get("shape")
    if not isinstance(name, str):
        raise InvalidInput(f"{where}.name must be a string", field=f"{where}.name")
    check_datatype(name, datatype, where)
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise InvalidInput(f"input {quoted(name)}: shape must be a list of non-negative integers, got {quoted(shape)}",
                           field=f"{where}.shape")
    codec.check_shape(shape, f"input {quoted(name)}", f"{where}.shape")
    count = math.prod(shape)
    size = _dict(spec.get("parameters") or {}, f"{where}.parameters").get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size != count * 4:
            raise MalformedBody(f"input {quoted(name)}: binary_data_size is {quoted(size)}, but shape {shape} of FP32 "
                                f"takes {count * 4} bytes")
        if offset + size > len(binary):
            raise MalformedBody(f"input {quoted(name)}: the binary section holds {len(binary) - offset} more bytes; "
                                f"binary_data_size says {size}")
        array = np.frombuffer(binary, dtype="<f4", count=count, offset=offset).reshape(shape)
        return name, array, offset + size
    if "data" not in spec:
        raise InvalidInput(f"input {quoted(name)} has neither data nor parameters.binary_data_size",
                           field=f"{where}.data")
    data = spec["data"]
    flat = codec.to_array(data if isinstance(data, list) and data else [data], f"{where}.data", maybe_bools=True)
    if flat.size != count:
        raise InvalidInput(f"input {quoted(name)}: data holds {flat.size} values; shape {shape} needs {count}",
                           field=f"{where}.data")
    return name, flat.reshape(shape), offset


def parse_infer(body: bytes, header_length: str | None, name: str, op: Operation,
                count: Callable[[bytes], None] | None = None) -> tuple[InferRequest, dict]:
    """The request body -> its protocol parts and the operation's parameters (still unvalidated);
    `count` checks a large JSON header's values before it is parsed."""
    if header_length is None:
        if not body.strip():
            raise MalformedBody(f"the body is empty; {name} takes a JSON object with inputs (a list of tensors: "
                                "name, datatype, shape, data)")
        header, binary = body, b""
    else:
        length = codec.ascii_int(header_length)
        if length is None or length > len(body):
            raise MalformedBody(f"Inference-Header-Content-Length is {quoted(header_length)}; it must be a number of "
                                f"bytes (ASCII digits) no larger than the body's {len(body)}")
        header, binary = body[:length], body[length:]
    if count is not None and len(header) > codec.LARGE_BODY:
        count(header)
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as e:
        where = "body" if header_length is None else "inference header (its Inference-Header-Content-Length bytes)"
        raise MalformedBody(f"malformed JSON in the {where}: {e}") from None
    doc = _dict(doc, "body")
    request = InferRequest(name=name, id=doc.get("id") if isinstance(doc.get("id"), str) else None)
    params = dict(_dict(doc.get("parameters") or {}, "parameters"))
    request.binary_output = bool(params.get("binary_data_output", False))
    for key in PROTOCOL_PARAMETERS & params.keys():
        del params[key]
    for key in ("model", "version"):
        if key in params:
            raise InvalidInput(f"parameters.{key}: the model and version come from the path", field=f"parameters.{key}")
    inputs = doc.get("inputs", [])
    if not isinstance(inputs, list):
        raise InvalidInput("inputs must be a list of tensors", field="inputs")
    offset = 0
    for i, spec in enumerate(inputs):
        tensor_name, array, offset = _tensor(spec, i, binary, offset)
        add_input(request.tensors, tensor_name, array, name, op, f"inputs[{i}]")
    if offset != len(binary):
        raise MalformedBody(f"the binary section has {len(binary)} bytes; the inputs' binary_data_size add up to "
                            f"{offset}")
    wanted = doc.get("outputs")
    if wanted is not None:
        if not isinstance(wanted, list):
            raise InvalidInput("outputs must be a list", field="outputs")
        request.outputs = {}
        for i, out in enumerate(wanted):
            out = _dict(out, f"outputs[{i}]")
            out_name = check_output(out.get("name"), name, op, f"outputs[{i}].name")
            out_params = _dict(out.get("parameters") or {}, f"outputs[{i}].parameters")
            request.outputs[out_name] = bool(out_params.get("binary_data", request.binary_output))
    return request, params


def tensor_fields(request: InferRequest, op: Operation) -> dict[str, Any]:
    """The v2 tensors as the native fields the operation reads."""
    tensors = request.tensors
    if op.name == "interpolate":
        given = [n for n in ("inputs", "latents") if n in tensors]
        if len(given) != 1:
            raise InvalidInput(f"{request.name} takes one input, inputs or latents (2 rows: start, end); got "
                               f"{given or 'none'}", field="inputs")
        ends = tensors[given[0]]
        if ends.ndim < 1 or len(ends) != 2:
            raise InvalidInput(f"input {quoted(given[0])} must hold 2 rows (start, end); got shape {list(ends.shape)}",
                               field="inputs")
        keys = ("start", "end") if given[0] == "inputs" else ("start_latent", "end_latent")
        return {keys[0]: ends[0:1], keys[1]: ends[1:2]}
    for required in INPUTS[op.name]:
        if required not in tensors:
            raise InvalidInput(f"{request.name} needs the input {required!r}", field="inputs")
    return tensors


def render(request: InferRequest, call: Call, payload: Payload) -> Response:
    """Arrays become output tensors (those requested); scalars and names become response parameters."""
    outputs: list[dict[str, Any]] = []
    blobs: list[Any] = []
    parameters, tensors = output_tensors(payload, request.outputs)
    for key, datatype, value in tensors:
        binary = request.binary_output if request.outputs is None else request.outputs[key]
        tensor: dict[str, Any] = {"name": key, "datatype": datatype, "shape": list(value.shape)}
        if binary:
            data = np.ascontiguousarray(value)
            tensor["parameters"] = {"binary_data_size": data.nbytes}
            blobs.append(data.data)
        else:
            tensor["data"] = value.ravel()
        outputs.append(tensor)
    doc: dict[str, Any] = {"model_name": request.name, "model_version": str(call.model.version), "outputs": outputs}
    if request.id is not None:
        doc["id"] = request.id
    if parameters:
        doc["parameters"] = parameters
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return Response(header, media_type=codec.JSON)
    return Response(b"".join([header, *blobs]), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


async def infer(request: Request, state: AppState, name: str, version: str | None) -> Response:
    """POST /v2/models/{name}[/versions/{version}]/infer."""
    model_name, op = split_name(name)
    number = parse_version(version)
    parsed: list[InferRequest] = []

    async def parse_call() -> Call:
        repository = await state.loaded_repository()
        body = await read_body(request, state)
        infer_request, params = parse_infer(
            body, request.headers.get(HEADER_LENGTH), name, op,
            lambda header: codec.check_json_values(header, state.settings.max_rows, repository.widest_row()))
        parsed.append(infer_request)
        validated = validate_params(op.params, {**params, "model": model_name, "version": number}, strict=True)
        model = served_model(repository, model_name, number, op)
        return Call(params=validated, model=model, arrays=tensor_fields(infer_request, op), npy=None,
                    settings=state.settings, maybe_bools=False, gone=request.is_disconnected)

    return await handle(state, f"v2/{op.name}", op, parse_call,
                        lambda call, payload: render(parsed[0], call, payload))


def _json(body: Any) -> Response:
    return Response(codec.encode_json(body), media_type=codec.JSON)


@router.get("", summary="Server metadata")
async def server_metadata() -> Response:
    return _json(SERVER)


@router.get("/", summary="Server metadata (the protocol's spelling, with the slash)")
async def server_metadata_slash() -> Response:
    return _json(SERVER)


@router.get("/health/live", summary="The process is up")
async def live() -> Response:
    return _json({"live": True})


@router.get("/health/ready", summary="200 once the default model is loaded, 503 before",
            responses={503: {"description": "not ready"}})
async def ready(state: State) -> Response:
    repo = state.repository
    if repo is None or not repo.default_loaded:
        raise NotReady(state.load_error or f"the default model {state.settings.default_model!r} is not loaded "
                       "(VAE_DEFAULT_MODEL)")
    return _json({"ready": True})


async def resolve(state: AppState, name: str, version: str | None) -> tuple[LoadedModel, Operation, list[int]]:
    model_name, op = split_name(name)
    repo = await state.loaded_repository()
    model = served_model(repo, model_name, parse_version(version), op)
    return model, op, sorted(repo.models[model.name])


def served_model(repo: Repository, model_name: str, version: int | None, op: Operation) -> LoadedModel:
    """The model version behind a v2 model `<model_name>.<op>`: not found, as v2 lists it, when that model
    does not serve the operation (`<model>.classify` of a model without a classifier)."""
    model = repo.get(model_name, version)
    if op not in served_by(model.semi_supervised):
        raise ModelNotFound(f"v2 model {quoted(model_name + '.' + op.name)}: {model.name} v{model.version} has no "
                            f"classifier, so no {op.name} operation (semi-supervised models have one)",
                            field="model_name")
    return model


@router.get("/models/{name}", summary="Model metadata: inputs and outputs (name, datatype, shape)")
async def model_metadata(name: str, state: State) -> Response:
    model, op, versions = await resolve(state, name, None)
    return _json(metadata(model, op, versions))


@router.get("/models/{name}/versions/{version}", summary="Model metadata for one version")
async def version_metadata(name: str, version: str, state: State) -> Response:
    model, op, versions = await resolve(state, name, version)
    return _json(metadata(model, op, versions))


@router.get("/models/{name}/ready", summary="200 when the model is loaded")
async def model_ready(name: str, state: State) -> Response:
    await resolve(state, name, None)
    return _json({"name": name, "ready": True})


@router.get("/models/{name}/versions/{version}/ready", summary="200 when that version is loaded")
async def version_ready(name: str, version: str, state: State) -> Response:
    await resolve(state, name, version)
    return _json({"name": name, "ready": True})


_INFER_DOC: dict[str, Any] = {
    "openapi_extra": {"requestBody": {"required": True, "content": {
        codec.JSON: {"schema": {"type": "object", "properties": {
            "id": {"type": "string"}, "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": {"type": "object"}},
            "outputs": {"type": "array", "items": {"type": "object"}}}}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                "description": "JSON header, then tensors (binary extension)"}},
    }}},
    "responses": {200: {"description": "outputs (JSON, or binary after Inference-Header-Content-Length)"},
                  400: {"description": "malformed body"}, 404: {"description": "unknown model or operation"},
                  422: {"description": "invalid input"}, 503: {"description": "overloaded"}},
    "response_class": Response,
}


@router.post("/models/{name}/infer", summary="Run <model>.<operation> (latest version)", **_INFER_DOC)
async def infer_latest(name: str, request: Request, state: State) -> Response:
    return await infer(request, state, name, None)


@router.post("/models/{name}/versions/{version}/infer", summary="Run <model>.<operation> at a version",
             **_INFER_DOC)
async def infer_version(name: str, version: str, request: Request, state: State) -> Response:
    return await infer(request, state, name, version)


add_head(router, "/v2/health/live", "/v2/health/ready")
