"""Starts vaeserve for a benchmark, reads its own metrics and memory, and stops it."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A `python -m service` process on 127.0.0.1 (or an already running one, given its URL)."""

    def __init__(self, *, model_dir: Path | None = None, default_model: str = "digits",
                 env: dict[str, str] | None = None, url: str | None = None, log: Path | None = None,
                 verify: ssl.SSLContext | bool = True):
        """`verify`: how the readiness probe checks the certificate when `env` turns TLS on."""
        self.proc: subprocess.Popen[bytes] | None = None
        self.verify = verify
        self.log: BinaryIO | None = None
        self.grpc_address: str | None = None  # host:port of its gRPC face, when this process started it
        if url is not None:
            self.url = url.rstrip("/")
            return
        port = free_port()
        self.grpc_port = free_port()
        self.grpc_address = f"127.0.0.1:{self.grpc_port}"
        self.url = f"{'https' if (env or {}).get('VAE_TLS_CERT') else 'http'}://127.0.0.1:{port}"
        environ = {**os.environ, "VAE_PORT": str(port), "VAE_HOST": "127.0.0.1", "VAE_LOG_LEVEL": "warning",
                   "VAE_DEFAULT_MODEL": default_model, "VAE_GRPC_PORT": str(self.grpc_port), **(env or {})}
        if model_dir is not None:
            environ["VAE_MODEL_DIR"] = str(model_dir)
        self.log_path = log
        self.log = open(log, "ab") if log else None  # noqa: SIM115 - closed in stop(), with the process
        out = self.log or subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, "-m", "service"], env=environ, stdout=out, stderr=out)
        self.started = time.monotonic()
        self.startup_s = self._wait_ready()

    def _wait_ready(self, timeout: float = 120) -> float:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path else ""
                self.stop()
                raise RuntimeError(f"vaeserve exited with {self.proc.returncode} before it was ready. {tail}")
            try:
                if httpx.get(f"{self.url}/health/ready", timeout=1, verify=self.verify).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("vaeserve was not ready in time")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def rss_mb(self) -> float | None:
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    def batch_totals(self, network: str, model: str | None = None) -> tuple[float, float]:
        """(rows, batches) so far for a network, from the service's own histogram."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        rows = batches = 0.0
        for line in text.splitlines():
            if f'network="{network}"' not in line or (model and f'model="{model}"' not in line):
                continue
            if line.startswith("vae_batch_size_rows_sum{"):
                rows += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vae_batch_size_rows_count{"):
                batches += float(line.rsplit(" ", 1)[1])
        return rows, batches

    def failed_requests(self, endpoint: str) -> float:
        """Answers other than 200 so far on one endpoint (e.g. `grpc/encode`), from the service's
        own counter; 499s (calls their client cancelled, as a load generator does when it stops) excluded."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vae_requests_total{") and f'endpoint="{endpoint}"' in line
                   and 'status="200"' not in line and 'status="499"' not in line)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.log is not None:
            self.log.close()
            self.log = None

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
