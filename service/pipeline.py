"""The one request path: read -> parse -> validate -> run (batched) -> build the response.

Each step is its own function; the routers only name the endpoint, its parameter model and the
work to run. Metrics for requests are recorded here, once, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service import codec
from service.deps import AppState
from service.errors import InvalidInput, Timeout, status_of, validation_message
from service.repository import LoadedModel
from service.schemas import ARRAY_FIELDS
from service.settings import Settings

P = TypeVar("P", bound=BaseModel)


@dataclass
class Call:
    """A parsed request: validated parameters, the resolved model, and its array fields still raw."""

    params: Any
    model: LoadedModel
    arrays: dict[str, Any]
    npy: np.ndarray | None
    settings: Settings
    maybe_bools: bool

    def rows(self, field: str) -> np.ndarray:
        """Input rows in data space, float32 [N, D]."""
        value = self.npy if self.npy is not None else self.arrays.get(field)
        return codec.rows(value, field, shape=self.model.input_shape, max_rows=self.settings.max_rows,
                          maybe_bools=self.maybe_bools)

    def latents(self, field: str) -> np.ndarray:
        value = self.npy if self.npy is not None else self.arrays.get(field)
        return codec.rows(value, field, shape=(self.model.latent_dim,), max_rows=self.settings.max_rows,
                          maybe_bools=self.maybe_bools)

    def row(self, field: str, *, latent: bool) -> np.ndarray | None:
        """One vector (interpolation end), or None when absent: [1, D] or [1, L]."""
        value = self.arrays.get(field)
        if value is None:
            return None
        shape = (self.model.latent_dim,) if latent else self.model.input_shape
        return codec.rows([value] if isinstance(value, list) else value, field, shape=shape, max_rows=1,
                          maybe_bools=self.maybe_bools)

    def check_range(self, field: str, value: int, limit: int, setting: str) -> None:
        if value > limit:
            raise InvalidInput(f"{field} is {value}; the limit is {limit} ({setting})", field=field)


async def _chunks(request: Request) -> AsyncIterator[bytes]:
    """The body as the server delivers it (Starlette's request.stream() adds a generator layer and
    state checks this path does not need)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def validate_params(params_type: type[P], data: dict[str, Any], *, strict: bool) -> P:
    try:
        return params_type.model_validate(data, strict=strict)
    except ValidationError as e:
        message, field = validation_message(list(e.errors()))
        raise InvalidInput(message, field=field) from None


async def parse(request: Request, state: AppState, params_type: type[P]) -> Call:
    settings = state.settings
    repository = await state.loaded_repository()
    kind = codec.media_type(request.headers.get("content-type"))
    body = await codec.read_body(_chunks(request), request.headers.get("content-length"), settings.max_body_bytes)
    npy = None
    if not body.strip() and request.query_params:
        # No body: the fields come from the query string, as with .npy bodies (`POST /sample?n=4&seed=7`).
        params = validate_params(params_type, dict(request.query_params), strict=False)
        arrays: dict[str, Any] = {}
        maybe_bools = False
    elif kind == codec.NPY:
        npy = codec.parse_npy(body)
        params = validate_params(params_type, dict(request.query_params), strict=False)
        arrays = {}
        maybe_bools = False
    else:
        data = codec.parse_json(body)
        arrays = {k: data.pop(k) for k in ARRAY_FIELDS if k in data}
        params = validate_params(params_type, data, strict=True)
        maybe_bools = codec.may_hold_booleans(body)
    model = repository.get(params.model, params.version)  # type: ignore[attr-defined]
    return Call(params=params, model=model, arrays=arrays, npy=npy, settings=settings, maybe_bools=maybe_bools)


async def serve(request: Request, state: AppState, endpoint: str, params_type: type[BaseModel],
                run: Callable[[Call], Awaitable[dict[str, Any]]]) -> Response:
    start = time.perf_counter()
    labels = ("-", "-")
    status = 500
    try:
        npz = codec.wants_npz(request.headers.get("accept"))
        try:
            async with asyncio.timeout(state.settings.request_timeout):
                call = await parse(request, state, params_type)
                labels = (call.model.name, str(call.model.version))
                payload = await run(call)
        except TimeoutError:
            raise Timeout(f"the request took longer than {state.settings.request_timeout:g}s "
                          "(VAE_REQUEST_TIMEOUT); its rows were dropped from the queue") from None
        if npz:
            response = Response(codec.encode_npz(payload), media_type=codec.NPZ)
        else:
            response = Response(codec.encode_json(payload), media_type=codec.JSON)
        status = 200
        return response
    except Exception as exc:
        status = status_of(exc)
        raise
    finally:
        state.metrics.record_request(labels, endpoint, status, time.perf_counter() - start)
