"""The gRPC load generator: h2load (nghttp2's native HTTP/2 client) sending one ModelInfer request.

wrk speaks only HTTP/1.1. gRPC is HTTP/2 with a 5-byte frame before each message, so h2load, given
the framed request and gRPC's headers, drives `ModelInfer` as a native client, as wrk drives the HTTP
cells: on a 2-core machine a Python client would take a large share of the server's CPU (grpcio's
asyncio client took 0.4 of the 2 cores), which is not the server's figure. h2load does not read
gRPC's trailers, so a call the server refused still looks like HTTP 200 to it: the caller counts
those from the server's own `vae_requests_total` (see `cli.measure_cells`).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from bench.load import LoadError, LoadResult

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def h2load_path() -> str:
    path = shutil.which("h2load")
    if path is None:
        raise LoadError("h2load is not installed: `apt-get install nghttp2-client` (make test and make bench do)")
    return path


def framed(message: bytes) -> bytes:
    """One gRPC length-prefixed message: not compressed, big-endian length, the message."""
    return b"\x00" + struct.pack(">I", len(message)) + message


def run_grpc(address: str, body: Path, *, connections: int, seconds: float, rows_per_request: int) -> LoadResult:
    """`connections` HTTP/2 connections with one call in flight on each (as wrk keeps one request per
    connection), for `seconds`; `body` is the serialised ModelInferRequest."""
    with tempfile.TemporaryDirectory() as tmp:
        data, log = Path(tmp) / "request.grpc", Path(tmp) / "requests.log"
        data.write_bytes(framed(body.read_bytes()))
        cmd = [h2load_path(), "-t1", f"-c{connections}", "-m1", f"-D{max(1, round(seconds))}", "-d", str(data),
               "-H", "content-type: application/grpc", "-H", "te: trailers", "--log-file", str(log),
               f"http://{address}{METHOD}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
        if out.returncode != 0 or not log.exists():
            raise LoadError(f"h2load failed: {out.stdout[-300:]} {out.stderr[-300:]}")
        # One line per finished request: start (µs since the epoch), HTTP status, duration (µs).
        lines = [line.split("\t") for line in log.read_text().splitlines() if line]
    latencies = sorted(int(line[2]) / 1000 for line in lines)
    took = re.search(r"finished in ([\d.]+)(ms|s)", out.stdout)
    counts = re.search(r"(\d+) errored, (\d+) timeout", out.stdout)
    if took is None or counts is None:
        raise LoadError(f"h2load printed no summary: {out.stdout[-300:]}")
    elapsed = float(took[1]) / (1000 if took[2] == "ms" else 1)
    failed = sum(line[1] != "200" for line in lines) + int(counts[1]) + int(counts[2])

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return LoadResult(requests=len(lines), seconds=elapsed, rows_per_request=rows_per_request,
                      p50_ms=pct(0.5), p95_ms=pct(0.95), p99_ms=pct(0.99), errors=failed)
