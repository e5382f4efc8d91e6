"""`vae-serve` / `python -m service`: run the app under uvicorn with the VAE_* settings."""

from __future__ import annotations

import logging
import sys

import uvicorn

from service.app import create_app
from service.settings import get_settings


def main() -> int:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=settings.access_log, loop="auto", http="auto", timeout_graceful_shutdown=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
