"""Every shell and Python example in the README runs as written, in order, against a server this test
starts: the tour, the client, API keys, signing, training and anomaly scoring (issue 20).

What the test changes, and only this: the server's address (the README says localhost:8000, the test
picks free ports), the tour's scratch folder (/tmp/vae-tour, here a temporary one) and PATH (the
project's .venv/bin first, as an activated environment has it). The one block it does not run is the
two commands that set up and run this very test."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.server import Server, free_port
from tests.conftest import REPO

pytestmark = pytest.mark.slow
README = (REPO / "README.md").read_text()
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
EXAMPLES = [(m.group(1), m.group(2), README[: m.start()].count("\n") + 1) for m in BLOCK.finditer(README)]
SETUP = [e for e in EXAMPLES if all(line.startswith("make ") for line in e[1].strip().splitlines())]
RUN = [e for e in EXAMPLES if e not in SETUP]


def test_only_the_two_commands_are_left_out():
    assert len(SETUP) == 1 and "make run" in SETUP[0][1] and "make test" in SETUP[0][1]
    assert len(RUN) >= 8 and {lang for lang, _, _ in RUN} == {"bash", "python"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("readme-server") / "server.log"
    with Server(model_dir=REPO / "models", log=log, env={"VAE_RELOAD_INTERVAL": "0"}) as running:
        yield running


def test_every_example_runs_as_written(server, tmp_path):
    tour, second, second_grpc = tmp_path / "vae-tour", free_port(), free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "VAE_LOG_LEVEL": "warning", "VAE_RELOAD_INTERVAL": "0"}
    for lang, code, line in RUN:
        code = (code.replace("/tmp/vae-tour", str(tour)).replace("localhost:8000", f"127.0.0.1:{server.port}")
                .replace("127.0.0.1:8000", f"127.0.0.1:{server.port}")
                .replace("localhost:8002", f"127.0.0.1:{second}").replace("--port 8002", f"--port {second}")
                .replace("VAE_GRPC_PORT=8003", f"VAE_GRPC_PORT={second_grpc}")
                .replace("127.0.0.1:8001", str(server.grpc_address))
                .replace(".venv/bin/", f"{Path(sys.executable).parent}/"))
        command = ["bash", "-euo", "pipefail", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"README line {line} ({lang}) failed:\n{code}\n--- stdout\n{done.stdout[-2000:]}" \
                                     f"\n--- stderr\n{done.stderr[-3000:]}"
    scores = (tour / "scores.csv").read_text().splitlines()
    assert scores[0].startswith("id,score,percentile,is_anomaly,feature_1") and len(scores) == 11
    assert [row.split(",")[3] for row in scores[-2:]] == ["1", "1"]  # the two hot readings are flagged
    assert all(row.split(",")[4] == "temperature" for row in scores[-2:])
    assert (tmp_path / "sevens.png").read_bytes()[:4] == b"\x89PNG" and (tour / "pictures").is_dir()
    assert not any(p.name.startswith(("digits-2", "sensors")) for p in (REPO / "models").iterdir())  # nothing shipped
    shutil.rmtree(tour)
