"""`vae-serve` / `python -m service`: run the app under uvicorn with the VAE_* settings."""

from __future__ import annotations

import argparse
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


def parser() -> argparse.ArgumentParser:
    """--host and --port, the two settings people type; the rest are VAE_* variables, listed in --help."""
    lines = []
    for name, field in Settings.model_fields.items():
        default = field.default if not isinstance(field.default, Path) else str(field.default)
        lines.append(f"  VAE_{name.upper():<20} {str(default).lower() if isinstance(default, bool) else default!s:<12}"
                     f" {field.description or ''}".rstrip())
    p = argparse.ArgumentParser(
        prog="vae-serve", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve the model repository over HTTP. Every setting is a VAE_* environment variable "
                    "(the README's Settings table explains each); --host and --port override theirs.",
        epilog="settings (environment variable, default, meaning):\n" + "\n".join(lines) +
               "\n\n`vae-serve new-key --help` makes an API key.")
    p.add_argument("--host", help="bind address (VAE_HOST)")
    p.add_argument("--port", type=int, help="port (VAE_PORT)")
    return p


def main(argv: list[str] | None = None) -> int:
    """`vae-serve` serves (settings from VAE_* variables); `vae-serve new-key` makes an API key."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["new-key"]:
        return new_key_main(args[1:])
    flags = parser().parse_args(args)
    overrides = {k: v for k, v in (("host", flags.host), ("port", flags.port)) if v is not None}
    try:
        settings = Settings(**overrides) if overrides else get_settings()
    except ValueError as e:
        print(f"vae-serve: {e}", file=sys.stderr)
        return 2
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
