"""The one request path: read -> parse -> validate -> run (batched) -> build the response.

`handle` is the path every protocol shares: it runs an `Operation` on a parsed `Call` within the
request timeout and records the request's metrics once, whatever the outcome. `serve` is the native
protocol's parse and render around it; `v2.py` brings its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from service import codec, pictures
from service.batching import PASS_OBSERVER
from service.call import Call
from service.deps import AppState
from service.errors import InvalidInput, Timeout, status_of, validation_message
from service.operations import Operation, Payload
from service.pools import run_in
from service.schemas import ARRAY_FIELDS, DecodeParams, InterpolateParams, PictureFields
from service.statistics import RequestTiming

P = TypeVar("P", bound=BaseModel)


async def body_chunks(request: Request) -> AsyncIterator[bytes]:
    """The body as the server delivers it (Starlette's request.stream() adds a generator layer and
    state checks this path does not need)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def read_body(request: Request, state: AppState) -> bytes:
    return await codec.read_body(body_chunks(request), request.headers.get("content-length"),
                                 state.settings.max_body_bytes)


def validate_params(params_type: type[P], data: dict[str, Any], *, strict: bool) -> P:
    try:
        return params_type.model_validate(data, strict=strict)
    except ValidationError as e:
        message, field = validation_message(list(e.errors()))
        raise InvalidInput(message, field=field) from None


async def parse(request: Request, state: AppState, params_type: type[P]) -> Call:
    """A native request: a JSON body, an .npy body with query parameters, or no body and a query."""
    answer = codec.negotiate(request.headers.get("accept"))
    repository = await state.loaded_repository()
    kind = codec.media_type(request.headers.get("content-type"))
    body = await read_body(request, state)
    npy = None
    columns: list[str] | None = None
    if not body.strip() and request.query_params:
        # No body: the fields come from the query string, as with .npy bodies (`POST /sample?n=4&seed=7`).
        params = validate_params(params_type, dict(request.query_params), strict=False)
        arrays: dict[str, Any] = {}
        maybe_bools = False
    elif kind == codec.NPY or kind == codec.ARROW:
        npy, columns = codec.parse_arrow(body) if kind == codec.ARROW else (codec.parse_npy(body), None)
        params = validate_params(params_type, dict(request.query_params), strict=False)
        arrays = {}
        maybe_bools = False
    else:
        if len(body) > codec.LARGE_BODY:
            codec.check_json_values(body, state.settings.max_rows, repository.widest_row())
        data = codec.parse_json(body)
        arrays = {k: data.pop(k) for k in ARRAY_FIELDS if k in data}
        params = validate_params(params_type, data, strict=True)
        maybe_bools = codec.may_hold_booleans(body)
    model = repository.get(params.model, params.version)  # type: ignore[attr-defined]
    takes_latents = params_type is DecodeParams or isinstance(params, InterpolateParams) and params.latent
    if columns is not None and npy is not None and not takes_latents:  # named columns are the model's features
        npy = codec.order_columns(npy, columns, model.manifest.feature_names)
    if answer == codec.PNG:
        pictures.check_drawable(model.input_shape, isinstance(params, PictureFields) and params.draws())
    return Call(params=params, model=model, arrays=arrays, npy=npy, settings=state.settings,
                maybe_bools=maybe_bools, npz=answer == codec.NPZ, png=answer == codec.PNG, arrow=answer == codec.ARROW,
                gone=request.is_disconnected)


async def handle(state: AppState, endpoint: str, op: Operation, parse_call: Callable[[], Awaitable[Call]],
                 render: Callable[[Call, Payload], Response]) -> Response:
    """Parse, run and render one request within VAE_REQUEST_TIMEOUT; count and time it (Prometheus,
    and Triton's statistics, whose timing its forward passes hear of through PASS_OBSERVER)."""
    timing = RequestTiming()
    observing = PASS_OBSERVER.set(timing)
    start = timing.start
    labels = ("-", "-")
    status = 500
    try:
        try:
            async with asyncio.timeout(state.settings.request_timeout):
                call = await parse_call()
                labels = (call.model.name, str(call.model.version))
                timing.parsed = time.perf_counter()
                timing.stats = state.statistics.entry(call.model.name, call.model.version, op.name)
                payload = await op.run(call, state)
                # A picture (up to VAE_MAX_PICTURE_PIXELS) is drawn and compressed in a worker thread, where
                # Pillow's encoder lets go of the GIL; every other answer is built here, bounded by the row limits.
                if call.png:
                    response = await run_in(call.model.background, render, call, payload)
                else:
                    response = render(call, payload)
        except TimeoutError:
            raise Timeout(f"the request took longer than {state.settings.request_timeout:g}s "
                          "(VAE_REQUEST_TIMEOUT); its rows were dropped from the queue") from None
        status = 200
        return response
    except (Exception, asyncio.CancelledError) as exc:  # cancelled: a gRPC client that gave up (a 499, not a 500)
        status = status_of(exc, v2=endpoint.startswith("v2"))
        raise
    finally:
        PASS_OBSERVER.reset(observing)
        state.statistics.finished(timing, op.name, status == 200)
        state.metrics.record_request(labels, endpoint, status, time.perf_counter() - start)


def _render_native(call: Call, payload: Payload) -> Response:
    if call.png:
        return Response(pictures.render(call, payload), media_type=codec.PNG)
    if call.npz:
        return Response(codec.encode_npz(payload), media_type=codec.NPZ)
    if call.arrow:
        return Response(codec.encode_arrow(payload), media_type=codec.ARROW)
    return Response(codec.encode_json(payload), media_type=codec.JSON)


async def serve(request: Request, state: AppState, op: Operation) -> Response:
    """One native request for `op`."""
    return await handle(state, op.name, op, lambda: parse(request, state, op.params), _render_native)
