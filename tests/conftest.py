from __future__ import annotations

from pathlib import Path

import pytest

from training.cli import main as train_main

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with one small digits model trained for two epochs."""
    root = tmp_path_factory.mktemp("models")
    rc = train_main(["--dataset", "digits", "--epochs", "2", "--hidden", "32", "--latent-dim", "4",
                     "--output", str(root), "--name", "tiny", "--no-progress",
                     "--checkpoint", str(root / "ckpt.pt")])
    assert rc == 0
    return root


@pytest.fixture(scope="session")
def tiny_model(tiny_repo: Path) -> Path:
    return tiny_repo / "tiny" / "1"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def shipped_server():
    """`python -m service` on the shipped models (digits the default), one per test module."""
    from bench.server import Server
    from tests.service_helpers import DEFAULT_MODEL

    s = Server(model_dir=DEFAULT_MODEL.parents[1])
    yield s
    s.stop()
