"""`Client` and `AsyncClient`: one method per operation, numpy in and out, over httpx.

Arrays travel as `.npy` request bodies and `.npz` answers (no JSON floats either way). Inputs with
more rows than the server takes per request (its `VAE_MAX_ROWS`, read once from `GET /models`) are
sent in chunks and the answers joined. A 503 is retried after its `Retry-After`, a failed connection
after a short backoff; a 4xx is never retried: it raises `APIError` with the server's code, message
and field. Each operation is built once as a plan of requests and a merge, and the two clients only
differ in how they send them.
"""

from __future__ import annotations

import asyncio
import io
import secrets
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from vaeclient.errors import APIError, VAEError
from vaeclient.results import (
    AnomalyResult,
    ClassifyResult,
    DecodeResult,
    EncodeResult,
    InterpolateResult,
    ReconstructResult,
    Result,
    SampleResult,
)

R = TypeVar("R", bound=Result)
NPY, NPZ = "application/x-npy", "application/x-npz"
RETRYABLE_TRANSPORT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError)


def _tls_refusal(exc: BaseException) -> bool:
    """A TLS failure (an unverified certificate, or the server refusing ours) stays one: no retry."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class Limits:
    max_rows: int
    max_samples: int
    max_decode_rows: int
    max_steps: int


@dataclass(frozen=True)
class _Request:
    path: str
    params: dict[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class _Plan:
    requests: list[_Request]
    merge: Callable[[list[dict[str, np.ndarray]]], Any]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    return buffer.getvalue()


def _rows(x: Any, what: str) -> np.ndarray:
    array = np.asarray(x, dtype=np.float32)
    if array.ndim == 1:
        array = array[None]
    if array.ndim < 2 or len(array) == 0:
        raise ValueError(f"{what} must be rows [N, ...] with N >= 1, got shape {list(array.shape)}")
    return array


def _query(**fields: Any) -> dict[str, str]:
    return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in fields.items() if v is not None}


def _merge(cls: type[R], parts: list[dict[str, np.ndarray]], **override: Any) -> R:
    """Join chunked answers: arrays end to end, scalars from the first answer."""
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in override:
            values[f.name] = override[f.name]
        elif f.name not in parts[0]:
            values[f.name] = None
        elif parts[0][f.name].ndim == 0:
            values[f.name] = parts[0][f.name].item()
        elif parts[0][f.name].dtype.kind == "U" and f.name != "labels":  # feature_names: the same in every chunk
            values[f.name] = parts[0][f.name].tolist()
        elif parts[0][f.name].dtype.kind == "U":  # labels: one per row
            values[f.name] = np.concatenate([p[f.name] for p in parts]).tolist()
        else:
            values[f.name] = np.concatenate([p[f.name] for p in parts]) if len(parts) > 1 else parts[0][f.name]
    return cls(**values)


def _chunked(cls: type[R], path: str, x: np.ndarray, size: int, seeded: bool, seed: int | None,
             **fields: Any) -> _Plan:
    """Rows in chunks of `size`. When several chunks draw noise, chunk i uses seed + i (a seed is drawn
    here if none was given), so the whole answer is reproducible from the seed it reports."""
    starts = range(0, len(x), size)
    several = seeded and len(starts) > 1
    base = (secrets.randbits(62) if seed is None else seed) if several else seed
    requests = [_Request(path, _query(**fields, seed=base + i if several and base is not None else base),
                         _npy(x[start : start + size])) for i, start in enumerate(starts)]
    override = {"seed": base} if several else {}
    return _Plan(requests, lambda parts: _merge(cls, parts, **override))


def _error(response: httpx.Response) -> APIError:
    retry = response.headers.get("retry-after")
    try:
        error = response.json()["error"]
        if isinstance(error, str):
            error = {"code": "error", "message": error}
        code, message, field = error.get("code", "error"), error.get("message", ""), error.get("field")
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message, field = "http_error", response.text[:500], None
    return APIError(response.status_code, code, message, field,
                    float(retry) if retry and retry.replace(".", "", 1).isdigit() else None)


def _answer(response: httpx.Response) -> dict[str, np.ndarray]:
    if response.status_code != 200:
        raise _error(response)
    with np.load(io.BytesIO(response.content), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


class _Operations:
    """The operations, written once; `_execute` (sync or async) sends a plan and merges its answers."""

    model: str | None
    version: int | None
    retries: int
    connect_retries: int | None
    max_retry_wait: float

    def _execute(self, build: Callable[[Limits], _Plan]) -> Any:
        raise NotImplementedError

    def _common(self, model: str | None, version: int | None) -> dict[str, Any]:
        return {"model": model or self.model, "version": version or self.version}

    def _delay(self, attempt: int, response: httpx.Response | None) -> float | None:
        """Seconds to wait before trying again, or None to stop: only 503s and failed connections retry
        (the latter `connect_retries` times, when set: a wrong URL or certificate fails fast)."""
        limit = self.retries if response is not None or self.connect_retries is None else self.connect_retries
        if attempt >= limit or (response is not None and response.status_code != 503):
            return None
        backoff = 0.1 * 2**attempt
        if response is not None:
            retry_after = response.headers.get("retry-after", "")
            if retry_after.replace(".", "", 1).isdigit():
                backoff = float(retry_after)
        return min(backoff, self.max_retry_wait)

    def encode(self, x: Any, *, sample: bool = False, seed: int | None = None, model: str | None = None,
               version: int | None = None) -> Any:
        """Rows [N, D] -> EncodeResult (mean, logvar, z)."""
        rows = _rows(x, "x")
        return self._execute(lambda lim: _chunked(EncodeResult, "/encode", rows, lim.max_rows, sample, seed,
                                                  sample=sample, **self._common(model, version)))

    def decode(self, z: Any, *, model: str | None = None, version: int | None = None) -> Any:
        """Latents [N, L] -> DecodeResult (outputs in data space)."""
        rows = _rows(z, "z")
        return self._execute(lambda lim: _chunked(DecodeResult, "/decode", rows, lim.max_rows, False, None,
                                                  **self._common(model, version)))

    def reconstruct(self, x: Any, *, sample: bool = False, seed: int | None = None, model: str | None = None,
                    version: int | None = None) -> Any:
        """Rows -> ReconstructResult (outputs, latents)."""
        rows = _rows(x, "x")
        return self._execute(lambda lim: _chunked(ReconstructResult, "/reconstruct", rows, lim.max_rows, sample,
                                                  seed, sample=sample, **self._common(model, version)))

    def anomaly_score(self, x: Any, *, score: str | None = None, samples: int | None = None,
                      threshold: float | None = None, explain: bool = False, model: str | None = None,
                      version: int | None = None) -> Any:
        """Rows -> AnomalyResult. score: elbo | iwae | complexity | typicality (None: the model's default); samples:
        None = the K the score was calibrated with; explain: each feature's part of the reconstruction
        term (`explanation`, `feature_names`). Chunks keep rows x K within VAE_MAX_DECODE_ROWS."""
        rows = _rows(x, "x")
        assumed_k = samples or (64 if score in ("iwae", "complexity") else 1)  # the server's calibrated K by default

        def build(lim: Limits) -> _Plan:
            size = max(1, min(lim.max_rows, lim.max_decode_rows // assumed_k))
            return _chunked(AnomalyResult, "/anomaly-score", rows, size, False, None, score=score, samples=samples,
                            threshold=threshold, explain=explain or None, **self._common(model, version))
        return self._execute(build)

    def classify(self, x: Any, *, model: str | None = None, version: int | None = None) -> Any:
        """Rows -> ClassifyResult (labels, probabilities): a semi-supervised model's q(y|x)."""
        rows = _rows(x, "x")
        return self._execute(lambda lim: _chunked(ClassifyResult, "/classify", rows, lim.max_rows, False, None,
                                                  **self._common(model, version)))

    def sample(self, n: int, *, seed: int | None = None, temperature: float = 1.0, model: str | None = None,
               version: int | None = None) -> Any:
        """n draws from the prior, decoded -> SampleResult. Over VAE_MAX_ROWS, chunk i uses seed + i."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")

        def build(lim: Limits) -> _Plan:
            sizes = [min(lim.max_rows, n - start) for start in range(0, n, lim.max_rows)]
            base = (secrets.randbits(62) if seed is None else seed) if len(sizes) > 1 else seed
            requests = [_Request("/sample", _query(n=size, temperature=temperature,
                                                   seed=None if base is None else base + i,
                                                   **self._common(model, version)))
                        for i, size in enumerate(sizes)]
            override = {"seed": base} if len(sizes) > 1 else {}
            return _Plan(requests, lambda parts: _merge(SampleResult, parts, **override))
        return self._execute(build)

    def interpolate(self, start: Any, end: Any, *, steps: int = 8, method: str = "linear", latent: bool = False,
                    model: str | None = None, version: int | None = None) -> Any:
        """A path from start to end (data rows, or latents with latent=True) -> InterpolateResult."""
        ends = np.concatenate([_rows(start, "start"), _rows(end, "end")])
        if len(ends) != 2:
            raise ValueError("start and end must be one row each")
        query = _query(steps=steps, method=method, latent=latent, **self._common(model, version))
        return self._execute(lambda lim: _Plan([_Request("/interpolate", query, _npy(ends))],
                                               lambda parts: _merge(InterpolateResult, parts)))


def _limits(body: dict[str, Any]) -> Limits:
    try:
        limits = body["limits"]
        return Limits(**{f.name: int(limits[f.name]) for f in fields(Limits)})
    except (KeyError, TypeError, ValueError):
        raise VAEError("GET /models did not report the server's limits; is this a vaeserve server?") from None


def _headers(api_key: str | None) -> dict[str, str]:
    headers = {"Accept": NPZ}
    if api_key is not None:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def tls_context(ca: str | Path | None = None, cert: str | Path | None = None,
                key: str | Path | None = None) -> ssl.SSLContext | bool:
    """How an https:// URL is verified: httpx's CA bundle (True), or `ca` (a PEM bundle, e.g. for a
    self-signed server); `cert` (and `key`, unless the PEM holds both) is the client certificate for
    mutual TLS. A certificate is always verified: there is no switch to turn that off."""
    if ca is None and cert is None and key is None:
        return True
    context = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    if ca is None:
        import certifi

        context.load_verify_locations(certifi.where())
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key is not None else None)
    elif key is not None:
        raise ValueError("a client key without its certificate: pass cert= as well")
    return context


class Client(_Operations):
    """A blocking client. Use as a context manager, or call close().

    >>> with Client("http://127.0.0.1:8000") as vae:
    ...     scores = vae.anomaly_score(rows).score
    """

    def __init__(self, url: str = "http://127.0.0.1:8000", *, model: str | None = None, version: int | None = None,
                 api_key: str | None = None, timeout: float = 30.0, retries: int = 3,
                 connect_retries: int | None = None, max_retry_wait: float = 30.0,
                 ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None,
                 transport: httpx.BaseTransport | None = None):
        self.model, self.version, self.retries, self.max_retry_wait = model, version, retries, max_retry_wait
        self.connect_retries = connect_retries
        self._http = httpx.Client(base_url=url, headers=_headers(api_key), timeout=timeout, transport=transport,
                                  verify=tls_context(ca, cert, key))
        self._cached_limits: Limits | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def models(self) -> dict[str, Any]:
        """GET /models: loaded models, refused versions, and the server's limits."""
        response = self._send("GET", "/models")
        if response.status_code != 200:
            raise _error(response)
        body: dict[str, Any] = response.json()
        return body

    def metadata(self, model: str | None = None, version: int | None = None) -> dict[str, Any]:
        """GET /models/{name}: a model's shapes, feature names, classes and scores (the client's model, else
        the server's default)."""
        name = model or self.model or self.models()["default"]
        response = self._send("GET", f"/models/{name}", params=_query(version=version or self.version))
        if response.status_code != 200:
            raise _error(response)
        body: dict[str, Any] = response.json()
        return body

    def ready(self) -> bool:
        try:
            return self._http.get("/health/ready").status_code == 200
        except httpx.TransportError:
            return False

    def _limits(self) -> Limits:
        if self._cached_limits is None:
            self._cached_limits = _limits(self.models())
        return self._cached_limits

    def _send(self, method: str, path: str, params: dict[str, str] | None = None, body: bytes = b"") -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, params=params, content=body or None,
                                              headers={"Content-Type": NPY} if body else None)
            except RETRYABLE_TRANSPORT as e:
                delay = None if _tls_refusal(e) else self._delay(attempt, None)
                if delay is None:
                    raise
            else:
                delay = self._delay(attempt, response)
                if delay is None:
                    return response
            time.sleep(delay)
            attempt += 1

    def _execute(self, build: Callable[[Limits], _Plan]) -> Any:
        plan = build(self._limits())
        return plan.merge([_answer(self._send("POST", r.path, r.params, r.body)) for r in plan.requests])


class AsyncClient(_Operations):
    """The same operations as `Client`, awaited: `await vae.encode(rows)`."""

    def __init__(self, url: str = "http://127.0.0.1:8000", *, model: str | None = None, version: int | None = None,
                 api_key: str | None = None, timeout: float = 30.0, retries: int = 3,
                 connect_retries: int | None = None, max_retry_wait: float = 30.0,
                 ca: str | Path | None = None, cert: str | Path | None = None, key: str | Path | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.model, self.version, self.retries, self.max_retry_wait = model, version, retries, max_retry_wait
        self.connect_retries = connect_retries
        self._http = httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=timeout, transport=transport,
                                       verify=tls_context(ca, cert, key))
        self._cached_limits: Limits | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def models(self) -> dict[str, Any]:
        response = await self._send("GET", "/models")
        if response.status_code != 200:
            raise _error(response)
        body: dict[str, Any] = response.json()
        return body

    async def metadata(self, model: str | None = None, version: int | None = None) -> dict[str, Any]:
        name = model or self.model or (await self.models())["default"]
        response = await self._send("GET", f"/models/{name}", params=_query(version=version or self.version))
        if response.status_code != 200:
            raise _error(response)
        body: dict[str, Any] = response.json()
        return body

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/health/ready")).status_code == 200
        except httpx.TransportError:
            return False

    async def _limits(self) -> Limits:
        if self._cached_limits is None:
            self._cached_limits = _limits(await self.models())
        return self._cached_limits

    async def _send(self, method: str, path: str, params: dict[str, str] | None = None,
                    body: bytes = b"") -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.request(method, path, params=params, content=body or None,
                                                    headers={"Content-Type": NPY} if body else None)
            except RETRYABLE_TRANSPORT as e:
                delay = None if _tls_refusal(e) else self._delay(attempt, None)
                if delay is None:
                    raise
            else:
                delay = self._delay(attempt, response)
                if delay is None:
                    return response
            await asyncio.sleep(delay)
            attempt += 1

    async def _execute(self, build: Callable[[Limits], _Plan]) -> Any:
        plan = build(await self._limits())
        parts: Sequence[dict[str, np.ndarray]] = [
            _answer(await self._send("POST", r.path, r.params, r.body)) for r in plan.requests]
        return plan.merge(list(parts))
