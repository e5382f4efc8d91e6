"""The FastAPI application factory. Nothing is built at import: `create_app(settings)` does it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import Response

from service.deps import AppState
from service.errors import install_handlers
from service.metrics import Metrics
from service.repository import Repository
from service.routes import router
from service.settings import Settings, get_settings

log = logging.getLogger("vaeserve")

DESCRIPTION = """Serves Variational Autoencoders exported by `vae-train`.

Every array endpoint takes JSON (`inputs`/`latents` as lists of rows) or a NumPy `.npy` body
(`Content-Type: application/x-npy`, other fields as query parameters), and answers JSON or, with
`Accept: application/x-npz`, an `.npz` with one array per field. Errors share one body:
`{"error": {"code", "message", "field"}}`.
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    state = AppState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One inference thread: on a small CPU the event loop keeps the other core, and batches of
        # different networks never contend for the same cores.
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vae-inference")
        repository = Repository(settings, state.metrics, executor)

        async def load() -> None:
            try:
                await asyncio.to_thread(repository.load_all)
            except Exception as e:  # noqa: BLE001 - reported by /health/ready and the log
                log.exception("loading the model repository failed")
                state.load_error = f"loading the model repository failed: {e}"
                return
            state.repository = repository
            if not repository.default_loaded:
                log.error("the default model %r is not loaded; /health/ready answers 503", settings.default_model)

        loading = asyncio.create_task(load())
        try:
            yield
        finally:
            loading.cancel()
            executor.shutdown(wait=True, cancel_futures=False)

    app = FastAPI(title="vaeserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    app.state.vae = state
    install_handlers(app, settings.retry_after)
    app.include_router(router)

    @app.get("/metrics", summary="Prometheus metrics (text format)", include_in_schema=True)
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.exposition_registry()), media_type=CONTENT_TYPE_LATEST)

    return app
