"""The Open Inference Protocol over gRPC: the real tritonclient.grpc against a real server, every
operation equal to the native API, Triton's extensions equal to their HTTP answers, a gRPC and an
HTTP request sharing one forward pass, keys, status codes and health."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from bench.server import Server, free_port
from service.auth import hash_key
from tests.service_helpers import DEFAULT_MODEL, Gate, digits_rows, serving
from tests.test_v2 import OPS, assert_same_outputs, native

tg = pytest.importorskip("tritonclient.grpc")
tga = pytest.importorskip("tritonclient.grpc.aio")
from tritonclient.grpc import model_config_pb2, service_pb2  # noqa: E402

PROTOS = Path(__file__).parents[1] / "service" / "protos"


@pytest.fixture(scope="module")
def server(shipped_server: Server) -> Server:
    return shipped_server


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator:
    c = tg.InferenceServerClient(server.grpc_address)
    yield c
    c.close()


def test_health_metadata_and_triton_extensions_answer_as_over_http(server, client):
    import tritonclient.http as th

    http = th.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits.encode") and not client.is_model_ready("digits.encode", "9")
    assert json_format.MessageToDict(client.get_server_metadata()) == http.get_server_metadata()
    for name in ("digits.encode", "digits.anomaly-score", "digits.interpolate", "digits.sample"):
        ours, theirs = client.get_model_metadata(name), http.get_model_metadata(name)
        assert [(t.name, t.datatype, list(t.shape)) for t in [*ours.inputs, *ours.outputs]] == \
            [(t["name"], t["datatype"], t["shape"]) for t in theirs.get("inputs", []) + theirs["outputs"]]
        # The same configuration, read into Triton's own ModelConfig message from both protocols.
        expected = json_format.ParseDict(http.get_model_config(name), model_config_pb2.ModelConfig())
        assert client.get_model_config(name).config == expected, name
    index = client.get_model_repository_index()
    assert {(m.name, m.version, m.state) for m in index.models} == {
        (e["name"], e["version"], e["state"]) for e in http.get_model_repository_index()}
    http.close()


@pytest.mark.parametrize("op", list(OPS))
def test_every_operation_matches_the_native_api(server, client, op):
    tensors, parameters, body = OPS[op]
    inputs = []
    for name, array in tensors.items():
        tensor = tg.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array.astype(np.float32))
        inputs.append(tensor)
    expected = native(server, op, body)
    result = client.infer(f"digits.{op}", inputs, parameters=parameters or None)
    response = result.get_response()
    assert response.model_name == f"digits.{op}" and response.model_version == "1"
    assert_same_outputs(result, expected, [k for k, v in expected.items() if v.ndim > 0])
    if "seed" in expected:
        assert response.parameters["seed"].int64_param == int(expected["seed"])


def test_typed_contents_requested_outputs_and_statistics(client):
    x = digits_rows(4, start=30)
    before = client.get_inference_statistics("digits.reconstruct", "1").model_stats[0]
    request = service_pb2.ModelInferRequest(model_name="digits.reconstruct")
    tensor = request.inputs.add(name="inputs", datatype="FP32", shape=[4, 64])
    tensor.contents.fp32_contents.extend(x.ravel().tolist())
    request.outputs.add(name="latents")
    response = client._client_stub.ModelInfer(request)
    assert [o.name for o in response.outputs] == ["latents"] and list(response.outputs[0].shape) == [4, 8]
    after = client.get_inference_statistics("digits.reconstruct", "1").model_stats[0]
    assert after.inference_count - before.inference_count == 4
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1


BAD = [  # (description, inputs, model, status, message fragment)
    ("wrong row width", [("inputs", np.zeros((1, 63), np.float32))], "digits.encode", "INVALID_ARGUMENT", "64 values"),
    ("NaN", [("inputs", np.full((1, 64), np.nan, np.float32))], "digits.encode", "INVALID_ARGUMENT", "NaN"),
    ("unknown input", [("x", np.zeros((1, 64), np.float32))], "digits.encode", "INVALID_ARGUMENT", "not an input"),
    ("missing input", [], "digits.encode", "INVALID_ARGUMENT", "needs the input 'inputs'"),
    ("unknown model", [("inputs", np.zeros((1, 64), np.float32))], "nope.encode", "NOT_FOUND", "'nope' is not loaded"),
    ("unknown operation", [("inputs", np.zeros((1, 64), np.float32))], "digits.fly", "NOT_FOUND",
     "<model>.<operation>"),
]


@pytest.mark.parametrize("description,inputs,model,status,message", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_their_status_code(client, description, inputs, model, status, message):
    tensors = []
    for name, array in inputs:
        tensor = tg.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    with pytest.raises(tg.InferenceServerException) as caught:
        client.infer(model, tensors)
    assert caught.value.status() == f"StatusCode.{status}" and message in caught.value.message()


def test_unknown_datatype_and_a_bad_parameter(client):
    request = service_pb2.ModelInferRequest(model_name="digits.encode")
    request.inputs.add(name="inputs", datatype="INT64", shape=[1, 64]).contents.int64_contents.extend([0] * 64)
    with pytest.raises(grpc.RpcError) as caught:
        client._client_stub.ModelInfer(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "datatype 'INT64'" in caught.value.details()
    tensor = tg.InferInput("inputs", [1, 64], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 64), np.float32))
    with pytest.raises(tg.InferenceServerException, match="nope"):
        client.infer("digits.encode", [tensor], parameters={"nope": 1})


def test_health_check_serves(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService"):
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    shutil.copytree(DEFAULT_MODEL, tmp_path / "digits" / "1")
    return tmp_path


@pytest.mark.anyio
async def test_a_grpc_and_an_http_request_share_a_forward_pass(repo):
    rows = digits_rows(9, start=40)
    port = free_port()
    async with serving(repo, grpc_port=port, reload_interval=0) as (app, http):
        encoder = app.state.vae.repository.get(None, None).encoder
        gate = Gate(encoder.fn)
        encoder.fn = gate
        first = asyncio.create_task(http.post("/encode", json={"inputs": rows[:1].tolist()}))
        await asyncio.to_thread(gate.entered.wait, 10)
        client = tga.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = tga.InferInput("inputs", [4, 64], "FP32")
        tensor.set_data_from_numpy(rows[1:5])
        over_grpc = asyncio.create_task(client.infer("digits.encode", [tensor]))
        over_http = asyncio.create_task(http.post("/encode", json={"inputs": rows[5:9].tolist()}))
        await asyncio.sleep(0.3)  # both queue behind the held pass
        gate.open.set()
        await first
        result, answer = await over_grpc, await over_http
        await client.close()
        stats = app.state.vae.statistics.get("digits", 1, "encode")
    assert gate.rows == 9 and stats.execution_count == 2 and stats.inference_count == 9  # held pass, then one of 8
    reference, _ = gate.fn(app.state.vae.repository.get(None, None).to_model_space(rows))
    np.testing.assert_allclose(result.as_numpy("mean"), reference[1:5], atol=1e-5)
    np.testing.assert_allclose(np.asarray(answer.json()["mean"]), reference[5:9], atol=1e-5)


@pytest.mark.anyio
async def test_keys_overload_and_size_map_to_grpc_codes(repo, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"{hash_key('s3cret')} pipeline\n")
    port = free_port()
    async with serving(repo, grpc_port=port, reload_interval=0, api_keys_file=keys, max_rows=8, max_queue_rows=8,
                       max_body_bytes=64 * 1024) as (app, _):
        client = tga.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = tga.InferInput("inputs", [8, 64], "FP32")
        tensor.set_data_from_numpy(digits_rows(8))
        with pytest.raises(tg.InferenceServerException) as caught:
            await client.infer("digits.encode", [tensor])
        assert caught.value.status() == "StatusCode.UNAUTHENTICATED" and "x-api-key" in caught.value.message()
        for headers in ({"authorization": "Bearer s3cret"}, {"x-api-key": "s3cret"}):
            assert (await client.infer("digits.encode", [tensor], headers=headers)).as_numpy("mean").shape == (8, 8)
        encoder = app.state.vae.repository.get(None, None).encoder
        gate = Gate(encoder.fn)
        encoder.fn = gate
        held = asyncio.create_task(client.infer("digits.encode", [tensor], headers={"x-api-key": "s3cret"}))
        await asyncio.to_thread(gate.entered.wait, 10)
        queued = asyncio.create_task(client.infer("digits.encode", [tensor], headers={"x-api-key": "s3cret"}))
        await asyncio.sleep(0.2)
        with pytest.raises(tg.InferenceServerException) as caught:  # 8 rows queued, the limit
            await client.infer("digits.encode", [tensor], headers={"x-api-key": "s3cret"})
        assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED" and "retry later" in caught.value.message()
        await _assert_retry_info(port)
        gate.open.set()
        await asyncio.gather(held, queued)
        big = tga.InferInput("inputs", [8, 64 * 64], "FP32")  # 128 KiB: over the 64 KiB body limit
        big.set_data_from_numpy(np.zeros((8, 64 * 64), np.float32))
        with pytest.raises(tg.InferenceServerException) as caught:
            await client.infer("digits.encode", [big], headers={"x-api-key": "s3cret"})
        assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        await client.close()


@pytest.mark.anyio
async def test_a_call_its_client_cancels_is_counted_as_cancelled_not_as_a_server_error(repo):
    port = free_port()
    async with serving(repo, grpc_port=port, reload_interval=0) as (app, http):
        encoder = app.state.vae.repository.get(None, None).encoder
        gate = Gate(encoder.fn)
        encoder.fn = gate
        client = tga.InferenceServerClient(f"127.0.0.1:{port}")
        tensor = tga.InferInput("inputs", [1, 64], "FP32")
        tensor.set_data_from_numpy(digits_rows(1))
        with pytest.raises(tg.InferenceServerException) as caught:
            await client.infer("digits.encode", [tensor], client_timeout=0.5)
        assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        gate.open.set()
        await asyncio.sleep(0.2)
        await client.close()
        metrics = (await http.get("/metrics")).text
        stats = app.state.vae.statistics.get("digits", 1, "encode")
    assert 'endpoint="grpc/encode",model="digits",status="499",version="1"} 1.0' in metrics
    assert 'endpoint="grpc/encode",model="digits",status="500"' not in metrics
    assert stats.phases["fail"].count == 1 and stats.phases["success"].count == 0


async def _assert_retry_info(port: int) -> None:
    """An overloaded ModelInfer carries google.rpc.RetryInfo in its status details, as the rich error
    model puts it (grpc-status-details-bin), with the server's Retry-After as its delay."""
    from google.rpc import error_details_pb2, status_pb2
    from tritonclient.grpc import service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="digits.encode")
    tensor = request.inputs.add(name="inputs", datatype="FP32", shape=[8, 64])
    request.raw_input_contents.append(digits_rows(8).tobytes())
    assert tensor.name == "inputs"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                request, metadata=(("x-api-key", "s3cret"),))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(caught.value.trailing_metadata() or ())
    rich = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    info = error_details_pb2.RetryInfo()
    assert rich.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and rich.details[0].Unpack(info)
    assert info.retry_delay.seconds == int(trailing["retry-after"]) >= 1


def test_the_extension_messages_have_tritons_field_numbers():
    """triton_extensions.proto is written from Triton's documents; tritonclient's compiled protos are
    Triton's own, so every field must have the same number and type there."""
    from service.grpc_api import MESSAGES

    def check(ours, theirs) -> None:
        for field in ours.fields:
            other = theirs.fields_by_name[field.name]
            assert (field.number, field.type) == (other.number, other.type), f"{ours.full_name}.{field.name}"
            if field.enum_type is not None:
                for value in field.enum_type.values:
                    assert other.enum_type.values_by_name[value.name].number == value.number, value.name
            if field.message_type is not None and not field.message_type.GetOptions().map_entry:
                check(field.message_type, other.message_type)

    ours = {name: cls for name, cls in MESSAGES.items() if cls.DESCRIPTOR.file.name == "triton_extensions.proto"}
    assert len(ours) >= 15
    for name, cls in ours.items():
        theirs = getattr(service_pb2, name, None) or getattr(model_config_pb2, name)
        check(cls.DESCRIPTOR, theirs.DESCRIPTOR)


def test_the_compiled_descriptors_match_the_protos(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    out = tmp_path / "inference.binpb"
    assert protoc.main(["protoc", f"-I{PROTOS}", "--include_imports", f"--descriptor_set_out={out}",
                        str(PROTOS / "open_inference_grpc.proto"), str(PROTOS / "triton_extensions.proto")]) == 0
    assert out.read_bytes() == (PROTOS / "inference.binpb").read_bytes(), "run make protos"


def test_sigterm_lets_a_grpc_call_in_flight_finish(tmp_path):
    import signal
    import threading

    env = {"VAE_RELOAD_INTERVAL": "0", "VAE_MAX_DECODE_ROWS": "1000000", "VAE_MAX_QUEUE_ROWS": "1000000"}
    server = Server(model_dir=DEFAULT_MODEL.parents[1], env=env, log=tmp_path / "server.log")
    assert server.proc is not None
    client = tg.InferenceServerClient(server.grpc_address)
    tensor = tg.InferInput("inputs", [200, 64], "FP32")
    tensor.set_data_from_numpy(digits_rows(200))
    outcome: list[object] = []

    def slow_call() -> None:  # ~a second of decoding: 200 rows x 1,000 samples
        try:
            outcome.append(client.infer("digits.anomaly-score", [tensor], parameters={"samples": 1000}))
        except tg.InferenceServerException as e:
            outcome.append(e)

    caller = threading.Thread(target=slow_call)
    caller.start()
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    caller.join(60)
    code = server.proc.wait(60)
    server.stop()
    client.close()
    assert code in (0, -signal.SIGTERM)
    assert len(outcome) == 1 and not isinstance(outcome[0], Exception), outcome
    assert outcome[0].as_numpy("score").shape == (200,)
