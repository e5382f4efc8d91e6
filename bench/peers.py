"""The peer servers of ../shared/peers (TorchServe, Triton via PyTriton, naive FastAPI), when set up."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

PEERS = ("fastapi-async", "torchserve-batch64", "pytriton-dynbatch64")


@dataclass
class PeerSetup:
    scripts: Path  # the folder holding run_peers.py
    venvs: Path  # PEERS_DIR, where setup.sh put the virtual environments and the model

    @property
    def python(self) -> Path:
        return self.venvs / "venv" / "bin" / "python"


def find(scripts: Path | None = None) -> tuple[PeerSetup | None, str]:
    """The peers' setup, or None and why not."""
    here = Path(__file__).resolve().parents[1]
    scripts = scripts or here.parent / "shared" / "peers"
    venvs = Path(os.environ.get("PEERS_DIR", "/tmp/peers"))
    if not (scripts / "run_peers.py").is_file():
        return None, f"no peer scripts at {scripts}"
    missing = [v for v in ("venv", "venv-ts", "venv-triton") if not (venvs / v / "bin" / "python").exists()]
    if missing or not (venvs / "model" / "row.json").exists():
        missing_text = ", ".join(missing) or "model"
        return None, f"peers not set up in {venvs} (missing {missing_text}): run `bash {scripts}/setup.sh`"
    return PeerSetup(scripts, venvs), "ok"


def run(setup: PeerSetup, *, duration: float, warmup: float, out: Path, log: Path) -> dict[str, dict]:
    """Measure the peers with their own driver (wrk, the same row, torch at 1 thread); per peer, its cells."""
    cmd = [str(setup.python), str(setup.scripts / "run_peers.py"), "--peers", ",".join(PEERS), "--torch-threads",
           "1", "--duration", str(max(1, round(duration))), "--warmup", str(max(1, round(warmup))),
           "--no-calibrate", "--out", str(out)]
    with log.open("ab") as f:
        subprocess.run(cmd, cwd=setup.scripts, stdout=f, stderr=subprocess.STDOUT, timeout=1200, check=False)
    if not out.exists():
        raise RuntimeError(f"the peer driver wrote no results; see {log}")
    results = {}
    for peer in json.loads(out.read_text())["results"]:
        cells = {}
        for r in peer.get("runs", []):
            if "error" in r:
                continue
            key = f"c={r['conc']}" if r.get("kind") == "row" else "bulk"
            cells[key] = {"req_per_s": r["good_rps"], "rows_per_s": r.get("rows_per_s", r["good_rps"]),
                          "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
                          "errors": r["non2xx"] + r["err_timeout"] + r["err_read"] + r["err_connect"]}
        results[peer["name"]] = {"cells": cells, "error": peer.get("error"), "startup_s": peer.get("startup_s"),
                                 "idle_rss_mb": peer.get("idle_rss_mb")}
    return results
