"""The load generator: wrk (native, so it does not take the server's Python CPU) with post.lua."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

LUA = Path(__file__).with_name("post.lua")


class LoadError(RuntimeError):
    pass


@dataclass
class LoadResult:
    requests: int
    seconds: float
    rows_per_request: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int  # non-2xx responses plus socket errors and timeouts

    @property
    def req_per_s(self) -> float:
        return (self.requests - self.errors) / self.seconds

    @property
    def rows_per_s(self) -> float:
        return self.req_per_s * self.rows_per_request


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise LoadError("wrk is not installed: `apt-get install wrk` (make test and make bench install it)")
    return path


def run_wrk(url: str, body: Path, *, connections: int, seconds: float, rows_per_request: int,
            content_type: str = "application/json", accept: str = "",
            headers: dict[str, str] | None = None) -> LoadResult:
    env = {**os.environ, "WRK_BODY_FILE": str(body), "WRK_CONTENT_TYPE": content_type, "WRK_ACCEPT": accept,
           "WRK_HEADERS": "\n".join(f"{k}: {v}" for k, v in (headers or {}).items())}
    # One wrk thread, as the peer driver uses: it needs a few % of a core, the server gets the rest.
    cmd = [wrk_path(), "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
           "-s", str(LUA), url]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise LoadError(f"wrk printed no result: {out.stdout[-300:]} {out.stderr[-300:]}")
    d = json.loads(line[len("WRKJSON "):])
    errors = d["err_status"] + d["err_connect"] + d["err_read"] + d["err_write"] + d["err_timeout"]
    return LoadResult(requests=d["requests"], seconds=d["duration_us"] / 1e6, rows_per_request=rows_per_request,
                      p50_ms=d["p50_us"] / 1000, p95_ms=d["p95_us"] / 1000, p99_ms=d["p99_us"] / 1000,
                      errors=errors)
