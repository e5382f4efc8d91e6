"""What the benchmark sends: the models, the request bodies, and the workloads."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson

MNIST_NAME = "mnist-bench"


@dataclass(frozen=True)
class Workload:
    name: str
    path: str  # "{model}" is replaced by the model's name
    body: str  # a key of Bodies
    connections: int
    rows: int  # rows per request
    network: str  # whose batch-size histogram to read
    content_type: str = "application/json"
    accept: str = ""
    single_row: bool = False  # one of the "single-row /encode" cells

    @property
    def label(self) -> str:
        return f"{self.name} c={self.connections}"


WORKLOADS = (
    Workload("encode 1 row", "/encode", "row", 1, 1, "encoder", single_row=True),
    Workload("encode 1 row", "/encode", "row", 16, 1, "encoder", single_row=True),
    Workload("encode 1 row", "/encode", "row", 64, 1, "encoder", single_row=True),
    Workload("encode 64 rows JSON", "/encode", "rows64", 16, 64, "encoder"),
    Workload("encode 64 rows npy", "/encode", "npy64", 16, 64, "encoder", "application/x-npy", "application/x-npz"),
    Workload("encode 64 rows v2 binary", "/v2/models/{model}.encode/infer", "v2bin64", 16, 64, "encoder",
             "application/octet-stream"),
    # The Open Inference Protocol over gRPC (ModelInfer, raw tensors both ways), beside its HTTP cells.
    Workload("encode 1 row gRPC", "grpc:{model}.encode", "grpc1", 64, 1, "encoder"),
    Workload("encode 64 rows gRPC", "grpc:{model}.encode", "grpc64", 16, 64, "encoder"),
    Workload("anomaly-score 1 row", "/anomaly-score", "row", 16, 1, "decoder"),
    Workload("sample 1", "/sample", "sample", 16, 1, "decoder"),
)
BATCHING_OFF = tuple(w for w in WORKLOADS if w.single_row)


def request_headers(body: bytes) -> dict[str, str]:
    """Extra headers a body needs: a v2 binary body declares where its JSON header ends."""
    if body[:1] != b"{":
        return {}
    _, end = json.JSONDecoder().raw_decode(body.decode("latin-1"))
    return {"Inference-Header-Content-Length": str(end)} if end < len(body) else {}


def mnist_like_row() -> list[float]:
    """A deterministic anti-aliased ring, 28x28 in [0, 1], 4 decimals: the size and sparsity of an
    MNIST digit as JSON (~4.5 KB), the same input the peer servers are measured with."""
    y, x = np.mgrid[0:28, 0:28]
    d = np.sqrt(((y - 13.5) / 9.0) ** 2 + ((x - 13.5) / 6.5) ** 2)
    v = np.exp(-((np.abs(d - 1.0) * 7.5 / 1.15) ** 2))
    v = np.where(v < 0.02, 0.0, np.minimum(1.0, v * 1.05))
    return [round(float(a), 4) for a in v.ravel()]


def digits_row() -> list[float]:
    from sklearn.datasets import load_digits

    return [float(v) for v in load_digits().data[0]]


def grpc_body(model: str, rows: np.ndarray) -> bytes:
    """A serialised ModelInferRequest for `<model>.encode`: the rows as raw little-endian FP32."""
    from service.grpc_api import MESSAGES

    request = MESSAGES["ModelInferRequest"](model_name=f"{model}.encode")
    request.inputs.add(name="inputs", datatype="FP32", shape=list(rows.shape))
    request.raw_input_contents.append(rows.astype("<f4").tobytes())
    return request.SerializeToString()


def write_bodies(folder: Path, row: list[float], model: str) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [row] * 64
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(rows, dtype=np.float32))
    array = np.asarray(rows, dtype=np.float32)
    bodies = {
        "row": orjson.dumps({"inputs": [row]}),
        "rows64": orjson.dumps({"inputs": rows}),
        "npy64": buffer.getvalue(),
        # Open Inference Protocol v2, binary tensor extension both ways: the same rows and outputs as npy64.
        "v2bin64": orjson.dumps({"inputs": [{"name": "inputs", "shape": list(array.shape), "datatype": "FP32",
                                             "parameters": {"binary_data_size": array.nbytes}}],
                                 "parameters": {"binary_data_output": True}}) + array.tobytes(),
        "sample": orjson.dumps({"n": 1, "seed": 1}),
        "grpc1": grpc_body(model, array[:1]),
        "grpc64": grpc_body(model, array),
    }
    paths = {}
    for key, data in bodies.items():
        paths[key] = folder / f"{key}.body"
        paths[key].write_bytes(data)
    return paths


def export_mnist_sized(root: Path) -> Path:
    """An untrained 784-400-20 Bernoulli MLP VAE (the reference encoder's shape), exported as usual."""
    import torch

    from training.config import ModelConfig
    from training.data import Dataset, Preprocessing
    from training.export import export_model
    from training.model import VAE

    torch.manual_seed(0)
    model = VAE(ModelConfig(input_shape=(1, 28, 28), latent_dim=20, hidden=(400,), likelihood="bernoulli"))
    rng = np.random.default_rng(0)
    x = rng.random((256, 784), dtype=np.float32)
    data = Dataset(name="synthetic", source="bench", input_shape=(1, 28, 28), x_train=x, x_val=x,
                   preprocessing=Preprocessing("scale", np.zeros(1), np.ones(1)))
    folder, _ = export_model(model, data, name=MNIST_NAME, output=root,
                             training={"command": "bench: untrained weights", "data": {"dataset": "synthetic"}},
                             metrics={})
    return folder
