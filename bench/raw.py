"""The raw limit: an exported encoder called in-process, no HTTP, rows/s per runtime and batch size."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from service.manifest import GRAPH_FILES
from service.runtime import RUNTIMES, load_graph

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def rows_per_second(model_dir: Path, width: int, *, device: str = "cpu", threads: int = 1, window_s: float = 0.25,
                    reps: int = 5) -> dict[str, dict[int, float]]:
    """Median over `reps` timed windows, for each runtime (that loads on the device) and batch size."""
    out: dict[str, dict[int, float]] = {}
    for runtime in RUNTIMES:
        try:
            graph = load_graph(model_dir / GRAPH_FILES["encoder", runtime], runtime, device, threads)
        except RuntimeError:  # e.g. onnxruntime without its CUDA provider on a GPU host
            continue
        out[runtime] = {}
        for batch in BATCHES:
            x = np.random.default_rng(0).random((batch, width), dtype=np.float32)
            for _ in range(20):
                graph(x)
            rates = []
            for _ in range(reps):
                calls, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < window_s:
                    graph(x)
                    calls += 1
                rates.append(calls * batch / elapsed)
            out[runtime][batch] = float(np.median(rates))
    return out


def at_batch(limits: dict[int, float], batch: float) -> float:
    """The raw limit at a (fractional) mean batch size, interpolated on log2(batch)."""
    sizes = sorted(limits)
    xs = np.log2(sizes)
    return float(np.interp(np.log2(max(1.0, batch)), xs, [limits[s] for s in sizes]))
