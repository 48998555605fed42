"""uvicorn for ``jmoss serve``: its h11 protocol with what it lacks, and ``serve``.

uvicorn parses HTTP with h11 and leaves a few things to the server: timing clients out while
their request arrives, closing a connection whose request body was left unread, refusing a
request framed two ways (Content-Length and Transfer-Encoding), and closing in a way that does
not destroy the answer. These live here, around h11's parsed events; nothing re-parses bytes.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import TYPE_CHECKING, Any

from jmoss.server.routes import create_app

if TYPE_CHECKING:
    from jmoss.api import Model

log = logging.getLogger("jmoss.server")

DEFAULT_PORT = 19324  # moss_api_demo.py's port
DEFAULT_HEADER_TIMEOUT = 10.0  # nginx's client_header_timeout is 60 s; a JSON API needs far less
DEFAULT_BODY_TIMEOUT = 30.0
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 1000
# After the server closes (error, timeout, Connection: close) it stops sending and discards what
# the client still sends for this long (or until the client closes): closing a socket with unread
# bytes makes the kernel send a reset, and a reset can destroy the answer before the client has
# read it (nginx's "lingering close"; its lingering_timeout is 5 s).
LINGER_SECONDS = 2.0
# Answered whatever the connection count: a monitor must see the server up when clients fill it.
_UNLIMITED_PATHS = frozenset({"/health"})


def _canned(status: bytes, text: bytes) -> bytes:
    return (b"HTTP/1.1 %s\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (status, len(text), text))


class _LingeringTransport:
    """An asyncio transport whose ``close()`` is a lingering close (see ``LINGER_SECONDS``).

    uvicorn calls ``transport.close()`` from many places (its 400s, Connection: close, keep-alive
    expiry, shutdown); the protocol hands it this proxy so that each of them half-closes: what was
    written is flushed and followed by a FIN, incoming bytes are read and dropped, and the socket is
    closed when the client closes its side or after ``LINGER_SECONDS``.
    """

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop = transport, loop
        self.lingering = False
        self._timer: asyncio.TimerHandle | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self.lingering or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.is_closing():  # after the FIN nothing more may be sent
            self._transport.write(data)

    def close(self) -> None:
        if self.is_closing():
            return
        if not self._transport.can_write_eof():
            self._transport.close()
            return
        self.lingering = True
        self._transport.write_eof()  # sent once the buffered answer is flushed
        self._transport.resume_reading()  # drain: unread bytes would turn the close into a reset
        self._timer = self._loop.call_later(LINGER_SECONDS, self.abort_linger)

    def abort_linger(self) -> None:
        """Close for real (the client closed its side, or lingering ran out)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport.close()


def timed_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT, body_timeout: float = DEFAULT_BODY_TIMEOUT,
                   max_header_bytes: int = 16 * 1024) -> type:
    """uvicorn's h11 protocol plus the client timeouts and the closing rules uvicorn lacks.

    Timeouts (uvicorn only times keep-alive): a connection must deliver a request's headers within
    ``header_timeout`` of connecting (or of the first byte after an idle keep-alive wait), and its
    whole body within ``body_timeout`` of the headers. Otherwise it is answered 408 (if no reply
    has started) and closed, with one info line: slow-loris clients cannot hold sockets or buffers.
    While the app works on a request nothing is timed (generating a reply may take minutes).

    Refused before the app runs: request line + headers longer than ``max_header_bytes`` get 431
    (h11 bounds only an incomplete head; one that arrives whole in a single read passes it), an
    HTTP version other than 1.0/1.1 gets 505, as nginx answers, and a request with both
    Content-Length and Transfer-Encoding gets 400 and the connection closed (RFC 9112 §6.1: such a
    request may be smuggling a second one, so the connection must not be reused).

    Closing: a reply sent before the request's body was all received (a 413 on the declared
    length, a 404 that never reads the body) carries ``Connection: close`` and ends the
    connection, so the unread body is never parsed as a next request nor waited for; every close
    is a lingering close (``LINGER_SECONDS``), so the answer arrives before any reset.

    ``/health`` is answered even when the connection limit (``limit_concurrency``) is reached.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None
        _phase = ""
        _checked: Any = None  # the request cycle whose head was checked
        _limit: int | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.app = self._close_if_body_unread(self.app)

        # uvicorn compares its connection and task counts with this when a request's head has been
        # parsed (self.scope is that request's by then) and answers 503 past it.
        @property  # type: ignore[override]
        def limit_concurrency(self) -> int | None:
            scope = self.scope
            return None if scope is not None and scope["path"] in _UNLIMITED_PATHS else self._limit

        @limit_concurrency.setter
        def limit_concurrency(self, value: int | None) -> None:
            self._limit = value

        def _close_if_body_unread(self, app: Any) -> Any:
            async def guarded(scope: Any, receive: Any, send: Any) -> None:
                async def send_closing(message: Any) -> None:
                    if message["type"] == "http.response.start" and self.conn.their_state is h11.SEND_BODY:
                        message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
                    await send(message)

                await app(scope, receive, send_closing)

            return guarded

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.transport = _LingeringTransport(transport, self.loop)  # type: ignore[assignment]
            self._arm("headers", header_timeout)

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return  # lingering: the bytes are read only so that the close is not a reset
            super().data_received(data)
            self._update()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._update()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            if isinstance(self.transport, _LingeringTransport):
                self.transport.abort_linger()
            super().connection_lost(exc)

        def _check_head(self) -> bool:
            """Refuse an oversized head or an unknown HTTP version before the app runs (its task is
            scheduled but has not started: marked disconnected, it sends nothing)."""
            cycle = self.cycle
            if cycle is None or cycle is self._checked:
                return True
            self._checked = cycle
            scope = cycle.scope
            size = len(scope["raw_path"]) + len(scope["query_string"]) + sum(len(k) + len(v) + 4 for k, v in scope["headers"])
            if size > max_header_bytes:
                answer, why = _canned(b"431 Request Header Fields Too Large", b"request headers too large\n"), \
                    f"its request line and headers are {size} bytes, over {max_header_bytes}"
            elif scope["http_version"] not in ("1.0", "1.1"):
                answer, why = _canned(b"505 HTTP Version Not Supported", b"HTTP/1.0 or HTTP/1.1 only\n"), \
                    f"it spoke HTTP/{scope['http_version'][:8]}"
            elif {b"content-length", b"transfer-encoding"} <= {name for name, _ in scope["headers"]}:
                answer, why = _canned(b"400 Bad Request", b"send Content-Length or Transfer-Encoding, not both\n"), \
                    "it sent both Content-Length and Transfer-Encoding"
            else:
                return True
            scope["jmoss.closed"] = True  # type: ignore[typeddict-unknown-key]
            cycle.disconnected = True
            cycle.message_event.set()
            self.transport.write(answer)
            self.transport.close()
            log.info("refused a request from %s: %s", self._who(), why)
            return False

        def _who(self) -> str:
            return "%s:%d" % tuple(self.client[:2]) if self.client else "a client"

        def _update(self) -> None:
            their = self.conn.their_state
            if not self._check_head() or self.transport.is_closing():
                self._disarm()
            elif their is h11.IDLE:  # waiting for a request line and headers
                if self.timeout_keep_alive_task is not None:
                    self._disarm()  # nothing sent since the last reply: uvicorn's keep-alive timer runs
                elif self._phase != "headers":
                    self._arm("headers", header_timeout)
            elif their is h11.SEND_BODY:
                if self._phase != "body":
                    self._arm("body", body_timeout)
            else:
                self._disarm()  # the request is in; the app answers in its own time

        def _arm(self, phase: str, seconds: float) -> None:
            self._disarm()
            self._phase = phase
            self._timer = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer, self._phase = None, ""

        def _expired(self) -> None:
            phase, seconds = self._phase, header_timeout if self._phase == "headers" else body_timeout
            self._timer, self._phase = None, ""
            if self.transport.is_closing():
                return
            log.info("closed the connection from %s: its request %s did not arrive within %g s", self._who(), phase,
                     seconds)
            cycle = self.cycle
            answering = cycle is not None and not cycle.response_complete
            if answering:
                cycle.scope["jmoss.closed"] = True  # type: ignore[typeddict-unknown-key]
                cycle.disconnected = True  # the app's receive() returns http.disconnect; a late reply is dropped
                cycle.message_event.set()
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and not (answering and cycle.response_started):
                self.transport.write(_canned(b"408 Request Timeout", b"the request did not arrive in time\n"))
            self.transport.close()

    return TimedH11Protocol


def serve(model: "TextModel", host: str = "127.0.0.1", port: int = DEFAULT_PORT, *, log_level: str = "info",
          web: bool = True, header_timeout: float = DEFAULT_HEADER_TIMEOUT, body_timeout: float = DEFAULT_BODY_TIMEOUT,
          idle_timeout: float = DEFAULT_IDLE_TIMEOUT, max_connections: int = DEFAULT_MAX_CONNECTIONS,
          max_header_bytes: int = 16 * 1024, **limits: Any) -> None:
    """Serve ``model`` with uvicorn until interrupted; ``web`` and ``limits`` go to :func:`create_app`.

    ``header_timeout``/``body_timeout`` bound how long a request may take to arrive (see
    :func:`timed_protocol`), ``idle_timeout`` how long a keep-alive connection may sit idle between
    requests; past ``max_connections`` open connections new requests get 503 (``/health`` is
    always answered). ``max_header_bytes``
    bounds the request line plus headers (431 and close).
    """
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from jmoss.server.auth import exposure_warning

    warning = exposure_warning(host, limits.get("api_keys", ()))
    if warning:  # one line on stderr, before uvicorn's logging is set up
        print(f"jmoss: {warning}", file=sys.stderr, flush=True)
    app = create_app(model, web=web, **limits)
    log_config = copy.deepcopy(LOGGING_CONFIG)  # jmoss.server's info lines (disconnects, timeouts) beside uvicorn's
    log_config["loggers"]["jmoss"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    uvicorn.run(app, host=host, port=port, log_level=log_level, log_config=log_config, timeout_graceful_shutdown=5,
                http=timed_protocol(header_timeout, body_timeout, max_header_bytes), timeout_keep_alive=idle_timeout,  # type: ignore[arg-type]
                limit_concurrency=max_connections, h11_max_incomplete_event_size=max_header_bytes)
