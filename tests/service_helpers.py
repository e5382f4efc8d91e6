"""Shared helpers for the service tests: an in-process app, and the exported model run directly."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
from fastapi import FastAPI

from service.app import create_app
from service.folder import read_manifest
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "digits" / "1"


@asynccontextmanager
async def serving(model_dir: Path, **overrides: Any) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan running and its models loaded, and a client talking to it in-process."""
    app = create_app(Settings(model_dir=model_dir, **{"grpc_port": 0, **overrides}))  # gRPC only when asked
    async with app.router.lifespan_context(app):
        state = app.state.vae
        for _ in range(600):
            if state.repository is not None or state.load_error:
                break
            await asyncio.sleep(0.01)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            yield app, client


class Reference:
    """The exported ONNX graphs of a model folder, run directly, in the caller's data space."""

    def __init__(self, folder: Path = DEFAULT_MODEL):
        self.manifest = read_manifest(folder)
        self.encoder = ort.InferenceSession(str(folder / "encoder.onnx"))
        self.decoder = ort.InferenceSession(str(folder / "decoder.onnx"))
        shift, scale = self.manifest.preprocessing.arrays()
        self.shift, self.scale = shift, scale

    def encode(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        xm = ((np.asarray(x, dtype=np.float32) - self.shift) / self.scale).astype(np.float32)
        mean, logvar = self.encoder.run(None, {"x": xm})
        return mean, logvar

    def decode(self, z: np.ndarray) -> np.ndarray:
        (out,) = self.decoder.run(None, {"z": np.asarray(z, dtype=np.float32)})
        return out * self.scale + self.shift


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def digits_rows(n: int, start: int = 0) -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().data[start : start + n].astype(np.float32)


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Gate:
    """Wraps a batcher's function: holds every batch until released, counts the rows it computed."""

    def __init__(self, fn):
        self.fn = fn
        self.open = threading.Event()
        self.entered = threading.Event()
        self.rows = 0

    def __call__(self, x):
        self.entered.set()
        assert self.open.wait(30)
        self.rows += len(x)
        return self.fn(x)


def copy_model(root: Path, name: str, version: int, source: Path = DEFAULT_MODEL) -> Path:
    """A copy of a model folder as `root/name/version` (name and version live in the manifest, unhashed)."""
    target = root / name / str(version)
    shutil.copytree(source, target)
    manifest = json.loads((target / "model.json").read_text())
    manifest.update(name=name, version=version)
    (target / "model.json").write_text(json.dumps(manifest))
    return target
