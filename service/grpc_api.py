"""The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`), on VAE_GRPC_PORT.

Another edge of the same service: it runs on the app's event loop, so its requests go through the
same `pipeline.handle`, operations, validation, limits, batchers (a gRPC and an HTTP request can
share a forward pass), metrics (`endpoint="grpc/encode"`, ...) and Triton statistics as the HTTP
paths. Keys come as gRPC metadata (`authorization: Bearer <key>` or `x-api-key`); errors map to gRPC
status codes in `errors.grpc_error`. Inputs come as `raw_input_contents` or typed `fp32_contents`;
outputs always go back as `raw_output_contents`, as Triton sends them.

The messages are built from the protocol's published `.proto` and Triton's extensions
(`protos/`, compiled into `protos/inference.binpb` by `make protos`) in a descriptor pool of their
own, so a process that also imports `tritonclient.grpc` (whose messages share the `inference`
package) loads both without a clash. Health is `grpc.health.v1`: SERVING once the default model is
loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service import codec, triton, v2
from service.auth import KeyRing, presented_key
from service.call import Call
from service.deps import AppState
from service.errors import InvalidInput, MalformedBody, ServiceError, Unauthorized, grpc_error, quoted
from service.operations import Operation, Payload
from service.pipeline import handle, validate_params
from service.repository import LoadedModel

log = logging.getLogger("vaeserve")

SERVICE = "inference.GRPCInferenceService"
UNAUTHORIZED = "a valid API key is required: send the metadata authorization: Bearer <key>, or x-api-key: <key>"
DESCRIPTORS = Path(__file__).parent / "protos" / "inference.binpb"


def _message_classes() -> dict[str, type[Message]]:
    pool = descriptor_pool.DescriptorPool()
    for proto in descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTORS.read_bytes()).file:
        pool.Add(proto)
    names = [m for f in ("open_inference_grpc.proto", "triton_extensions.proto")
             for m in pool.FindFileByName(f).message_types_by_name]
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}")) for name in names}


MESSAGES = _message_classes()


def _new(kind: str, /, **fields: Any) -> Any:
    return MESSAGES[kind](**fields)


def _parameter(value: Any) -> Any:
    """A Python scalar (or a list, joined with commas as v2 REST parameters are) -> InferParameter."""
    if isinstance(value, bool | np.bool_):
        return _new("InferParameter", bool_param=bool(value))
    if isinstance(value, int | np.integer):
        return _new("InferParameter", int64_param=int(value))
    if isinstance(value, float | np.floating):
        return _new("InferParameter", double_param=float(value))
    if isinstance(value, list | tuple):
        return _new("InferParameter", string_param=",".join(map(str, value)))
    return _new("InferParameter", string_param=str(value))


def _parameters(params: Any) -> dict[str, Any]:
    """InferParameter map -> the native fields (protocol parameters dropped)."""
    out: dict[str, Any] = {}
    for key, p in params.items():
        if key in v2.PROTOCOL_PARAMETERS:
            continue
        choice = p.WhichOneof("parameter_choice")
        if choice is None:
            raise InvalidInput(f"parameter {quoted(key)} has no value", field=f"parameters.{key}")
        out[key] = getattr(p, choice)
    return out


def _tensors(request: Any, op: Operation) -> dict[str, np.ndarray]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise MalformedBody(f"raw_input_contents holds {len(raw)} tensors for {len(request.inputs)} inputs; give one "
                            "per input, or none and typed contents")
    tensors: dict[str, np.ndarray] = {}
    for i, spec in enumerate(request.inputs):
        where = f"inputs[{i}]"
        v2.check_datatype(spec.name, spec.datatype, where)
        shape = list(spec.shape)
        if any(d < 0 for d in shape):
            raise InvalidInput(f"input {quoted(spec.name)}: shape must be non-negative, got {shape}",
                               field=f"{where}.shape")
        codec.check_shape(shape, f"input {quoted(spec.name)}", f"{where}.shape")
        count = int(np.prod(shape)) if shape else 1
        if raw:
            if len(raw[i]) != count * 4:
                raise MalformedBody(f"input {quoted(spec.name)}: raw_input_contents[{i}] holds {len(raw[i])} bytes; "
                                    f"shape {shape} of FP32 takes {count * 4}")
            array = np.frombuffer(raw[i], dtype="<f4").reshape(shape)
        else:
            values = spec.contents.fp32_contents
            if len(values) != count:
                raise InvalidInput(f"input {quoted(spec.name)}: contents.fp32_contents holds {len(values)} values; "
                                   f"shape {shape} needs {count}", field=f"{where}.contents")
            array = np.asarray(values, dtype=np.float32).reshape(shape)
        v2.add_input(tensors, spec.name, array, request.model_name, op, where)
    return tensors


def _wanted(request: Any, op: Operation) -> set[str]:
    """The outputs asked for (none named: all)."""
    for i, out in enumerate(request.outputs):
        v2.check_output(out.name, request.model_name, op, f"outputs[{i}].name")
    return {o.name for o in request.outputs}


def _render(request: Any, wanted: set[str], call: Call, payload: Payload) -> Any:
    response = _new("ModelInferResponse", model_name=request.model_name, model_version=str(call.model.version),
                    id=request.id)
    parameters, tensors = v2.output_tensors(payload, wanted or None)
    for key, value in parameters.items():
        response.parameters[key].CopyFrom(_parameter(value))
    for key, datatype, value in tensors:
        response.outputs.add(name=key, datatype=datatype, shape=list(value.shape))
        response.raw_output_contents.append(np.ascontiguousarray(value).tobytes())
    return response


class Servicer:
    """The RPCs, each a coroutine (request, context) -> response on the app's event loop."""

    def __init__(self, state: AppState, keys: KeyRing | None):
        self.state = state
        self.keys = keys

    def _authorise(self, context: grpc.aio.ServicerContext, endpoint: str) -> None:
        if self.keys is None:
            return
        metadata = [(k.encode("latin-1"), v.encode("latin-1") if isinstance(v, str) else v)
                    for k, v in (context.invocation_metadata() or ())]
        if self.keys.check(presented_key(metadata)) is None:
            self.state.metrics.record_request(("-", "-"), endpoint, 401, 0.0)
            raise Unauthorized(UNAUTHORIZED)

    async def _model(self, name: str, version: str) -> tuple[LoadedModel, Operation, list[int]]:
        return await v2.resolve(self.state, name, version or None)

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - the protocol's names
        return _new("ServerLiveResponse", live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        repo = self.state.repository
        return _new("ServerReadyResponse", ready=repo is not None and repo.default_loaded)

    async def ModelReady(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._authorise(context, "grpc")
        try:
            await self._model(request.name, request.version)
        except ServiceError:  # an unknown model or version, or still loading: not ready, as over HTTP
            return _new("ModelReadyResponse", ready=False)
        return _new("ModelReadyResponse", ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._authorise(context, "grpc")
        return _new("ServerMetadataResponse", **v2.SERVER)

    async def ModelMetadata(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._authorise(context, "grpc")
        model, op, versions = await self._model(request.name, request.version)
        meta = v2.metadata(model, op, versions)
        response = _new("ModelMetadataResponse", name=meta["name"], versions=meta["versions"],
                        platform=meta["platform"])
        for kind in ("inputs", "outputs"):
            for t in meta[kind]:
                getattr(response, kind).add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        return response

    async def ModelConfig(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._authorise(context, "grpc")
        model, op, _ = await self._model(request.name, request.version)
        config = json_format.ParseDict(triton.model_config(model, op, self.state.settings), _new("ModelConfig"))
        return _new("ModelConfigResponse", config=config)

    async def ModelStatistics(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._authorise(context, "grpc")
        docs = await triton.model_stats(self.state, request.name or None, request.version or None)
        return json_format.ParseDict({"model_stats": docs}, _new("ModelStatisticsResponse"), ignore_unknown_fields=True)

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        self._authorise(context, "grpc")
        repo = await self.state.loaded_repository()
        response = _new("RepositoryIndexResponse")
        for entry in triton.index_entries(repo, request.ready):
            response.models.add(**entry)
        return response

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        model_name, op = v2.split_name(request.model_name)
        self._authorise(context, f"grpc/{op.name}")
        number = v2.parse_version(request.model_version or None)
        state = self.state
        wanted: set[str] = set()

        async def parse_call() -> Call:
            repository = await state.loaded_repository()
            params = _parameters(request.parameters)
            for key in ("model", "version"):
                if key in params:
                    raise InvalidInput(f"parameters.{key}: the model and version come from the request",
                                       field=f"parameters.{key}")
            tensors = _tensors(request, op)
            wanted.update(_wanted(request, op))
            validated = validate_params(op.params, {**params, "model": model_name, "version": number}, strict=True)
            model = v2.served_model(repository, model_name, number, op)
            arrays = v2.tensor_fields(v2.InferRequest(name=request.model_name, tensors=tensors), op)

            async def gone() -> bool:
                return context.cancelled()

            return Call(params=validated, model=model, arrays=arrays, npy=None, settings=state.settings,
                        maybe_bools=False, gone=gone)

        return await handle(state, f"grpc/{op.name}", op, parse_call,
                            lambda call, payload: _render(request, wanted, call, payload))


def retry_metadata(status: grpc.StatusCode, message: str, seconds: int) -> tuple[tuple[str, str | bytes], ...]:
    """Trailing metadata of a call to retry later: google.rpc.Status with a RetryInfo detail (gRPC's
    rich error model, which grpcio-status and Google's client libraries read) and a plain `retry-after`."""
    from google.protobuf import any_pb2, duration_pb2
    from google.rpc import error_details_pb2, status_pb2

    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds)))
    rich = status_pb2.Status(code=status.value[0], message=message, details=[detail])
    return (("grpc-status-details-bin", rich.SerializeToString()), ("retry-after", str(seconds)))


def _unary(servicer: Servicer, name: str, retry_after: int) -> grpc.RpcMethodHandler:
    method: Callable[[Any, Any], Awaitable[Any]] = getattr(servicer, name)

    async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(request, context)
        except Exception as exc:  # noqa: BLE001 - every error is answered with its status code
            code, message, retry = grpc_error(exc)
            status = getattr(grpc.StatusCode, code)
            await context.abort(status, message, retry_metadata(status, message, retry_after) if retry else ())

    request_type, response_type = RPCS[name]
    return grpc.unary_unary_rpc_method_handler(run, request_deserializer=MESSAGES[request_type].FromString,
                                               response_serializer=lambda m: m.SerializeToString())


RPCS = {  # rpc -> (request message, response message)
    "ServerLive": ("ServerLiveRequest", "ServerLiveResponse"),
    "ServerReady": ("ServerReadyRequest", "ServerReadyResponse"),
    "ModelReady": ("ModelReadyRequest", "ModelReadyResponse"),
    "ServerMetadata": ("ServerMetadataRequest", "ServerMetadataResponse"),
    "ModelMetadata": ("ModelMetadataRequest", "ModelMetadataResponse"),
    "ModelInfer": ("ModelInferRequest", "ModelInferResponse"),
    "ModelConfig": ("ModelConfigRequest", "ModelConfigResponse"),
    "ModelStatistics": ("ModelStatisticsRequest", "ModelStatisticsResponse"),
    "RepositoryIndex": ("RepositoryIndexRequest", "RepositoryIndexResponse"),
}


def _credentials(state: AppState) -> grpc.ServerCredentials | None:
    s = state.settings
    if s.tls_cert is None or s.tls_key is None:
        return None
    root = s.tls_client_ca.read_bytes() if s.tls_client_ca is not None else None
    return grpc.ssl_server_credentials([(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
                                       root_certificates=root, require_client_auth=root is not None)


class GrpcServer:
    """The gRPC server's life: started with the app, marked SERVING once the default model loads,
    drained like HTTP at shutdown."""

    def __init__(self, state: AppState, keys: KeyRing | None):
        s = state.settings
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", s.max_body_bytes),
                                               ("grpc.max_send_message_length", -1)])
        servicer = Servicer(state, keys)
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
            SERVICE, {name: _unary(servicer, name, s.retry_after) for name in RPCS})])
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        address = f"{s.host}:{s.grpc_port}"
        credentials = _credentials(state)
        self.port = (self.server.add_secure_port(address, credentials) if credentials is not None
                     else self.server.add_insecure_port(address))
        if not self.port:
            raise OSError(f"gRPC could not listen on {address} (VAE_GRPC_PORT)")

    async def start(self) -> None:
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("gRPC (Open Inference Protocol) on port %d", self.port)

    async def serving(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE, status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

