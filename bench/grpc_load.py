"""The gRPC load generator: `ModelInfer` with a pre-serialised request, from a process of its own.

wrk speaks only HTTP/1.1, so the gRPC cells need another client. This one sends the same bytes every
call and does not parse the answers (bytes in, bytes out, no protobuf work on the client), keeps
`connections` calls in flight over a few HTTP/2 channels, and reports what `run_wrk` reports. It is
Python, so it takes more of the machine's CPU than wrk does: on a small machine its figures are a
lower bound for the server.

    python -m bench.grpc_load HOST:PORT BODY_FILE CONNECTIONS SECONDS  ->  one JSON line
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.load import LoadError, LoadResult

METHOD = "/inference.GRPCInferenceService/ModelInfer"
CHANNELS = 4  # calls multiplex over HTTP/2; a few channels spread them as several clients would


async def _drive(address: str, body: bytes, connections: int, seconds: float) -> dict:
    import grpc

    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(min(CHANNELS, connections))]
    calls = [ch.unary_unary(METHOD) for ch in channels]  # no serialisers: bytes both ways
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        nonlocal errors
        call = calls[i % len(calls)]
        while (start := time.perf_counter()) < deadline:
            try:
                await call(body, timeout=10)
            except grpc.aio.AioRpcError:
                errors += 1
            latencies.append(time.perf_counter() - start)

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(connections)))
    elapsed = time.perf_counter() - started
    for ch in channels:
        await ch.close()
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else 0.0

    return {"requests": len(latencies), "seconds": elapsed, "errors": errors, "p50_ms": pct(0.5),
            "p95_ms": pct(0.95), "p99_ms": pct(0.99)}


def run_grpc(address: str, body: Path, *, connections: int, seconds: float, rows_per_request: int) -> LoadResult:
    cmd = [sys.executable, "-m", "bench.grpc_load", address, str(body), str(connections), str(seconds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise LoadError(f"the gRPC load generator failed: {out.stderr[-500:]}")
    d = json.loads(out.stdout.strip().splitlines()[-1])
    return LoadResult(requests=d["requests"], seconds=d["seconds"], rows_per_request=rows_per_request,
                      p50_ms=d["p50_ms"], p95_ms=d["p95_ms"], p99_ms=d["p99_ms"], errors=d["errors"])


def main() -> None:
    address, body, connections, seconds = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    print(json.dumps(asyncio.run(_drive(address, body.read_bytes(), connections, seconds))))


if __name__ == "__main__":
    main()
