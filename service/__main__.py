"""`vae-serve` / `python -m service`: run the app under uvicorn with the VAE_* settings."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import uvicorn

from service.auth import KeyRing, new_key_main
from service.http import BoundedHttpToolsProtocol, tls_options
from service.settings import Settings, get_settings
from service.signing import load_public_keys

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
GRACEFUL_SHUTDOWN_S = 30  # after SIGTERM: stop accepting, let in-flight requests finish this long, exit


def prepare_multiprocess_metrics() -> Path:
    """Several workers share metrics through prometheus-client's multiprocess mode.

    The directory must exist and be empty before any worker starts, and workers read the variable
    when they import prometheus_client: they are fresh processes, so setting it here is in time.
    """
    folder = os.environ.get(MULTIPROC_ENV)
    path = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="vae-metrics-"))
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def run(settings: Settings) -> None:
    common: dict[str, Any] = {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
              "access_log": settings.access_log, "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
              "timeout_keep_alive": settings.keep_alive_timeout,
              # X-Forwarded-For only feeds the access log's client address; skip it unless that log is on.
              "proxy_headers": settings.access_log, "http": BoundedHttpToolsProtocol, **tls_options(settings)}
    if settings.workers == 1:
        from service.app import create_app

        uvicorn.run(create_app(settings), **common)
    else:
        prepare_multiprocess_metrics()
        uvicorn.run("service.app:create_app", factory=True, workers=settings.workers, **common)


def main(argv: list[str] | None = None) -> int:
    """`vae-serve` serves (settings from VAE_* variables); `vae-serve new-key` makes an API key."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["new-key"]:
        return new_key_main(args[1:])
    if args:
        print(f"vae-serve takes its settings from VAE_* environment variables (see the README); unknown "
              f"arguments {args}. `vae-serve new-key --help` makes an API key.", file=sys.stderr)
        return 2
    settings = get_settings()
    try:  # refuse to start on a keys file that cannot be used, rather than serve unprotected
        if settings.api_keys_file is not None:
            KeyRing.from_file(settings.api_keys_file)
        if settings.trusted_keys is not None:
            load_public_keys(settings.trusted_keys)
    except ValueError as e:
        print(f"vae-serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
