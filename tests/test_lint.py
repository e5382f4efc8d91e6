"""The code passes ruff and mypy: part of the suite so CI holds the line."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff():
    result = run("ruff", "check", "training", "service", "bench", "vaeclient", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy():
    result = run("mypy", "training", "service", "bench", "vaeclient")
    assert result.returncode == 0, result.stdout + result.stderr
