"""The HTTP server bounds what a connection may hold before its request reaches the app: a header
deadline (408, closed) and a header size limit (431, closed); HEAD works on health and metrics."""

from __future__ import annotations

import contextlib
import shutil
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from bench.server import Server
from tests.service_helpers import DEFAULT_MODEL

HEADER_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(DEFAULT_MODEL, root / "digits" / "1")
    env = {"VAE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "VAE_MAX_HEADER_BYTES": "16384",
           "VAE_KEEP_ALIVE_TIMEOUT": "75"}
    with Server(model_dir=root, log=root / "server.log", env=env) as running:
        yield running


def connect(server: Server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.settimeout(10)
    return sock


def read_all(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and when it closed (monotonic)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks), time.monotonic()


def test_a_connection_stopping_halfway_through_its_headers_is_answered_408_and_closed(server):
    started = time.monotonic()
    with connect(server) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # and then nothing more
        data, closed_at = read_all(sock)
    assert data.startswith(b"HTTP/1.1 408 ") and b"VAE_HEADER_TIMEOUT_S" in data
    assert HEADER_TIMEOUT_S * 0.9 < closed_at - started < HEADER_TIMEOUT_S + 5


def test_trickled_headers_cannot_extend_the_deadline(server):
    """One byte every 0.3 s keeps data arriving, but the deadline runs from the request's first byte."""
    started = time.monotonic()
    with connect(server) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\n")
        try:
            for _ in range(40):
                sock.sendall(b"X")
                time.sleep(0.3)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data, closed_at = read_all(sock)
    assert data.startswith(b"HTTP/1.1 408 ") and closed_at - started < HEADER_TIMEOUT_S + 5


def test_a_silent_connection_is_closed_after_the_deadline(server):
    started = time.monotonic()
    with connect(server) as sock:
        data, closed_at = read_all(sock)
    assert data == b"" and closed_at - started < HEADER_TIMEOUT_S + 5


def test_an_oversized_header_is_answered_431_and_closed(server):
    with connect(server) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server closes while 8 MB are sent
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (8 << 20) + b"\r\n\r\n")
        try:
            data, _ = read_all(sock)
        except ConnectionResetError:
            data = b""
    assert data.startswith(b"HTTP/1.1 431 ") or data == b"", data[:200]
    with connect(server) as sock:  # a header over the limit but sent whole: the answer is always readable
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        data, _ = read_all(sock)
    assert data.startswith(b"HTTP/1.1 431 ") and b"VAE_MAX_HEADER_BYTES" in data


def test_normal_requests_keep_alive_and_bodies_do_not_count_as_headers(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        rows = [[0.0] * 64] * 200  # a body far larger than the header limit
        for _ in range(3):
            assert client.post("/encode", json={"inputs": rows}).status_code == 200
        time.sleep(HEADER_TIMEOUT_S * 1.5)  # idle between requests: keep-alive's timeout, not the header one
        assert client.get("/health/live").status_code == 200


@pytest.mark.parametrize("path", ["/health/live", "/health/ready", "/metrics", "/v2/health/live", "/v2/health/ready"])
def test_head_on_health_and_metrics_answers_200(server, path):
    r = httpx.head(server.url + path, timeout=10)
    assert r.status_code == 200 and r.content == b""
