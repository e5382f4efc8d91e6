"""The HTTP server's own limits and TLS: what uvicorn is started with (`service.__main__`).

uvicorn bounds neither how long a client may take to send its headers (its keep-alive timeout runs
only between requests) nor, with httptools, how large they may be: a connection that stops halfway
through its headers stayed open indefinitely, and an 8 MB header was read. `BoundedHttpToolsProtocol`
is uvicorn's httptools protocol with both: a deadline from the first byte of a request (or from
the connection's opening) to the end of its headers, answered 408, and a cap on the bytes read
before the headers end, answered 431. Both close the connection.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import Settings, get_settings

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_FIXES = {408: "the request's headers did not arrive within VAE_HEADER_TIMEOUT_S; send them at once",
          431: "the request's headers are larger than VAE_MAX_HEADER_BYTES; send smaller headers"}


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline (408) and a header size limit (431).

    Its limits are VAE_HEADER_TIMEOUT_S and VAE_MAX_HEADER_BYTES, read from the environment like every
    other setting: uvicorn takes the class by reference and, with several workers, in each process."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        settings = get_settings()
        self.header_timeout, self.max_header_bytes = settings.header_timeout_s, settings.max_header_bytes
        self._unparsed_bytes = self._chunk_bytes = 0
        self._in_headers = True  # until the first request's headers end
        self._refused = False
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()  # a connection that never sends a byte

    def _arm(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout, self._refuse, 408)

    def _disarm(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    # The common case costs nothing: a request whose headers arrive in one chunk arms no timer, and its
    # headers are only counted when the bytes seen could exceed the limit.
    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._chunk_bytes = len(data)
        super().data_received(data)
        if self._in_headers and not self._refused:
            # The parser is still inside the headers, so every byte of this chunk belongs to them.
            self._unparsed_bytes += len(data)
            if self._unparsed_bytes > self.max_header_bytes:
                self._refuse(431)
            else:
                self._arm()  # the deadline runs from this request's first byte

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers, self._unparsed_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._in_headers = False
        self._disarm()
        if self._unparsed_bytes + self._chunk_bytes > self.max_header_bytes and self._header_size() > \
                self.max_header_bytes:
            self._refuse(431)  # before the app sees the request
            return
        super().on_headers_complete()

    def _header_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _refuse(self, status: int) -> None:
        """Answer in the service's error format and close; nothing of the request reached the app."""
        self._header_deadline = None
        if self.transport.is_closing():
            return
        self._refused = True
        if status == 408 and not self._unparsed_bytes and self.cycle is None:
            self.transport.close()  # a connection that never sent a byte gets no answer, as on keep-alive expiry
            return
        body = orjson.dumps({"error": {"code": "request_timeout" if status == 408 else "headers_too_large",
                                       "message": _FIXES[status], "field": None}})
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body))
        self.transport.close()


def tls_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS arguments: HTTPS with VAE_TLS_CERT/KEY, client certificates required with VAE_TLS_CLIENT_CA."""
    if settings.tls_cert is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    if settings.tls_client_ca is not None:
        options.update(ssl_ca_certs=str(settings.tls_client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options
