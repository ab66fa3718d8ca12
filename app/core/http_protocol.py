"""uvicorn's HTTP protocol with a deadline for the request headers.

uvicorn closes a keep-alive connection that stays idle for ``timeout_keep_alive``, but it
sets no limit on how long a client may take to send a request's headers. A client that
opens connections and sends one header byte every few seconds keeps each of them open
forever, and a few hundred such clients use up a server's connection limit (the
"slowloris" attack). nginx bounds the same wait with ``client_header_timeout``.

``with_header_timeout(seconds)`` returns uvicorn's httptools protocol with that bound: a
connection is closed when a request's headers are not complete ``seconds`` after the
connection opened or after the previous response ended. Pass it as ``uvicorn.Config(http=...)``.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout_seconds = 10.0

    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._cancel_header_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request on this connection gets its own deadline. uvicorn's keep-alive
        # timer, shorter by default, still closes a connection on which nothing arrives.
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_seconds, self._headers_timed_out)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_timed_out(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        logger.info(
            "closed a connection whose request headers did not arrive within %g s",
            self.header_timeout_seconds,
            extra={"action": "http.header_timeout", "client": "%s:%d" % self.client if self.client else ""},
        )
        self.transport.close()


def with_header_timeout(seconds: float) -> type[HeaderTimeoutProtocol]:
    """Return the protocol class whose connections wait at most ``seconds`` for headers."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_seconds": seconds})
