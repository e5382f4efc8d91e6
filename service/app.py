"""The FastAPI application factory. Nothing is built at import: `create_app(settings)` does it."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client import multiprocess as prom_multiprocess
from starlette.responses import HTMLResponse, Response
from starlette.types import Receive, Scope, Send

from service import triton, v2
from service.auth import DOC_ASSETS, KeyRing, needs_key, presented_key
from service.deps import AppState, add_head
from service.errors import V2_PREFIX, Unauthorized, install_handlers, response_for
from service.grpc_api import GrpcServer
from service.metrics import Metrics, multiprocess_dir
from service.pools import Pools, run_in
from service.repository import Repository
from service.routes import ARRAY_ENDPOINTS, Endpoint, router
from service.settings import Settings, get_settings

log = logging.getLogger("vaeserve")

UNAUTHORIZED = "a valid API key is required: send Authorization: Bearer <key> or X-API-Key: <key>"
# Endpoint labels for refused requests: the array endpoints by name, else the path's first part.
KEYED_ENDPOINTS = frozenset({"encode", "decode", "reconstruct", "sample", "interpolate", "anomaly-score", "v2",
                             "models", "admin", "metrics", "docs", "openapi.json", "redoc"})

DESCRIPTION = """Serves Variational Autoencoders exported by `vae-train`.

Every array endpoint takes JSON (`inputs`/`latents` as lists of rows) or a NumPy `.npy` body
(`Content-Type: application/x-npy`, other fields as query parameters), and answers JSON or, with
`Accept: application/x-npz`, an `.npz` with one array per field. Errors share one body:
`{"error": {"code", "message", "field"}}`.
"""


class VAEApp(FastAPI):
    """FastAPI, plus a direct dispatch for the array endpoints.

    Under load FastAPI's per-request machinery (its middleware stack with OpenTelemetry, included-
    router dispatch, dependency solving) cost more event-loop time than parsing, batching and
    answering the request together (py-spy, c=64). The array endpoints are the same functions
    FastAPI documents in /docs; here they are called directly, and their errors go through the same
    `errors.response_for`. The v2 infer paths are dispatched the same way. Every other path (docs,
    health, models, metadata, metrics, 404, 405) is FastAPI's.
    """

    direct: dict[str, Endpoint]
    vae: AppState
    keys: KeyRing | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.keys is not None and scope["type"] == "http" and not self._authorised(scope):
            path = scope["path"]  # any request target: "/encode", "/v2/...", or "*" (OPTIONS * HTTP/1.1)
            endpoint = path[1:] if path in self.direct else path.lstrip("/").split("/", 1)[0] or "other"
            self.vae.metrics.record_request(("-", "-"), endpoint if endpoint in KEYED_ENDPOINTS else "other", 401, 0.0)
            response = response_for(Unauthorized(UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"}), 0,
                                    v2=path.startswith(V2_PREFIX))
            await response(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            endpoint = self.direct.get(path)
            infer = v2.INFER_PATH.match(path) if endpoint is None and path.startswith("/v2/models/") else None
            if endpoint is not None or infer is not None:
                request = Request(scope, receive)
                try:
                    if endpoint is not None:
                        response = await endpoint(request, self.vae)
                    else:
                        assert infer is not None
                        response = await v2.infer(request, self.vae, infer[1], infer[2])
                except Exception as exc:  # noqa: BLE001 - mapped like FastAPI's handlers map it
                    response = response_for(exc, self.vae.settings.retry_after, v2=infer is not None)
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def _authorised(self, scope: Scope) -> bool:
        s = self.vae.settings
        if not needs_key(scope["path"], protect_metrics=s.protect_metrics, protect_docs=s.protect_docs):
            return True
        assert self.keys is not None
        return self.keys.check(presented_key(scope["headers"])) is not None


def add_offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their scripts served from this process, from the assets the
    fastapi-offline package ships: FastAPI's own pages load them from a CDN, blank on a network without one."""
    import fastapi_offline

    assets = Path(fastapi_offline.__file__).parent / "static"
    app.mount(DOC_ASSETS.rstrip("/"), StaticFiles(directory=assets), name="docs-assets")
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{title} - Swagger UI",
                                   oauth2_redirect_url="/docs/oauth2-redirect",
                                   swagger_js_url=f"{DOC_ASSETS}swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOC_ASSETS}swagger-ui.css",
                                   swagger_favicon_url=f"{DOC_ASSETS}favicon.png")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{title} - ReDoc",
                              redoc_js_url=f"{DOC_ASSETS}redoc.standalone.js",
                              redoc_favicon_url=f"{DOC_ASSETS}favicon.png", with_google_fonts=False)


def create_app(settings: Settings | None = None) -> VAEApp:
    settings = settings or get_settings()
    state = AppState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One inference thread: on a small CPU the event loop keeps the other core, and batches of
        # different networks never contend for the same cores. Large work (passes over a batch, scoring
        # large passes, drawing pictures, loading models) runs below their priority (service.pools).
        pools = Pools.start(settings.inference_threads, settings.background_nice)
        repository = Repository(settings, state.metrics, pools)
        grpc_server = GrpcServer(state, app.keys) if settings.grpc_port else None  # type: ignore[attr-defined]
        if grpc_server is not None:
            await grpc_server.start()

        async def load() -> None:
            try:
                await run_in(pools.background, repository.load_all)
                state.repository = repository
            except Exception as e:  # noqa: BLE001 - reported by /health/ready and the log
                log.exception("loading the model repository failed")
                state.load_error = f"loading the model repository failed: {e}"
            finally:
                state.loaded.set()
            # Everything loaded so far (torch, onnxruntime, the graphs) lives for the whole process:
            # move it out of the cyclic GC's reach, or every full collection walks it (~70 ms with
            # torch imported) and shows up as a latency spike under load.
            gc.collect()
            gc.freeze()
            if grpc_server is not None:
                await grpc_server.serving(repository.default_loaded)
            if not repository.default_loaded:
                loaded = ", ".join(sorted(repository.models)) or "none"
                log.error("the default model %r (VAE_DEFAULT_MODEL) is not loaded, so /health/ready answers 503 "
                          "until it is; loaded: %s (set VAE_DEFAULT_MODEL to one of them, or add %s/%s/<version>/)",
                          settings.default_model, loaded, settings.model_dir, settings.default_model)

        async def watch() -> None:
            """Pick up new and vanished versions every VAE_RELOAD_INTERVAL seconds."""
            await state.loaded.wait()
            while state.repository is not None:
                await asyncio.sleep(settings.reload_interval)
                try:
                    await state.repository.reload()
                    if grpc_server is not None:
                        await grpc_server.serving(state.repository.default_loaded)
                except Exception:  # noqa: BLE001 - a failed look must not end the watching
                    log.exception("looking for model changes failed")

        loading = asyncio.create_task(load())
        watching = asyncio.create_task(watch()) if settings.reload_interval > 0 else None
        try:
            yield
        finally:
            loading.cancel()
            if watching is not None:
                watching.cancel()
            if grpc_server is not None:  # HTTP has drained; gRPC's in-flight calls get as long as a request may take
                await grpc_server.stop(settings.request_timeout)
            pools.shutdown()
            if multiprocess_dir() is not None:
                prom_multiprocess.mark_process_dead(os.getpid())

    app = VAEApp(title="vaeserve", version="0.1.0", description=DESCRIPTION, lifespan=lifespan, docs_url=None,
                 redoc_url=None)
    add_offline_docs(app)
    app.state.vae = app.vae = state
    if settings.api_keys_file is not None:
        app.keys = KeyRing.from_file(settings.api_keys_file)
        log.info("API keys on: %d key(s) from %s", len(app.keys), settings.api_keys_file)
    install_handlers(app, settings.retry_after)
    app.include_router(router)
    app.include_router(triton.router)  # first: /v2/models/stats before v2's /v2/models/{name}
    app.include_router(v2.router)
    app.direct = dict(ARRAY_ENDPOINTS)

    @app.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.exposition_registry()), media_type=CONTENT_TYPE_LATEST)

    add_head(app.router, "/metrics")

    return app
