"""Runs one exported graph (TorchScript or ONNX) on a float32 array; knows nothing about HTTP.

A graph is built from a file's bytes (the service's: read once and verified, see service.folder) or
from a path (training's own checks of what it has just written).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

Runtime = Literal["onnx", "torchscript"]
Source = bytes | Path
RUNTIMES: tuple[Runtime, ...] = ("onnx", "torchscript")


class Graph(Protocol):
    """x [N, D_in] float32 -> outputs, each [N, ...] float32 numpy."""

    runtime: Runtime
    device: str

    def __call__(self, x: np.ndarray) -> list[np.ndarray]: ...


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


class OnnxGraph:
    runtime: Runtime = "onnx"

    def __init__(self, source: Source, device: str = "cpu", threads: int = 1):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
            providers.insert(0, "CUDAExecutionProvider")
        self.device = device
        model = source if isinstance(source, bytes) else str(source)
        self.session = ort.InferenceSession(model, sess_options=options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return self.session.run(self.output_names, {self.input_name: x})


class TorchScriptGraph:
    runtime: Runtime = "torchscript"

    def __init__(self, source: Source, device: str = "cpu", threads: int = 1):
        import torch

        if device == "cpu" and threads > 0:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.module = torch.jit.load(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                                     map_location=device).eval()

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        torch = self.torch
        with torch.inference_mode():
            out = self.module(torch.from_numpy(x).to(self.device))
        outs = out if isinstance(out, tuple | list) else (out,)
        return [o.cpu().numpy() for o in outs]


def load_graph(source: Source, runtime: Runtime, device: str = "cpu", threads: int = 1) -> Graph:
    if runtime == "onnx":
        return OnnxGraph(source, device, threads)
    if runtime == "torchscript":
        return TorchScriptGraph(source, device, threads)
    raise ValueError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
