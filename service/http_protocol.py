"""uvicorn's httptools protocol with bounds on what one connection may make the server hold.

uvicorn's httptools protocol (its default, and its fastest) buffers a request's line and
headers without limit and gives a client as long as it likes to send them: one connection
sending an endless header line was buffered to hundreds of megabytes while every other
request on the worker waited (docs/RELIABILITY.md, "HTTP limits"). ``LimitedHttpTools``
keeps httptools' parser and adds, per request:

- ``max_header_bytes``: the request line and headers together; more is answered 431 and the
  connection closed. Counted on the bytes as they arrive, before the parser sees them, so
  the parser never holds more than the limit. (A head that starts in the same read as the
  previous message's end is counted from the next read: it may exceed the limit by what one
  read returns, at most 256 KiB.)
- ``max_headers``: header fields; more is answered 431.
- ``header_timeout``: the line and headers must arrive within this from the request's first
  byte (for a new connection: from its opening); else 408 (or, if nothing came, a silent
  close). Not counted while the server is still answering the previous request.
- ``body_timeout``: the body within this from the end of the headers; else 408 and closed.
  Not counted while reading is paused because the application has not yet taken what came.

Between requests uvicorn's own keep-alive timeout closes an idle connection. The limits
come from ``Settings`` through ``service.serve``, which hands uvicorn this class bound to
them (``functools.partial``); nothing here reads the environment.

This subclasses uvicorn internals (``HttpToolsProtocol`` of uvicorn 0.54: ``parser``,
``cycle``, ``flow``, ``transport``, ``headers``): tests/service/test_http_limits.py runs
every bound against the installed uvicorn, so an upgrade that changes them fails there.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from service.api.headers import SECURITY_HEADERS


@dataclass(frozen=True)
class HttpLimits:
    """What one request may take of the server (see the module docstring)."""

    max_header_bytes: int = 16_384
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 30.0


LINGER_SECONDS = 2.0  # how long a refused connection is drained before it is closed
LINGER_BYTES = 65_536  # ... and how much of what it still sends is read and dropped


class HeadRefused(Exception):
    """Raised inside the parser's callbacks to stop parsing a head over a limit."""


class LimitedHttpTools(HttpToolsProtocol):
    """``HttpToolsProtocol`` with ``HttpLimits`` (see the module docstring)."""

    def __init__(self, *args, limits: HttpLimits | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits = limits or HttpLimits()
        self._reading_head = True  # between a message's end (or the opening) and its headers
        self._reading_body = False  # between a message's headers and its end
        self._head_bytes = 0
        self._refusal: str | None = None  # why the head was refused, for the 431
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._lingering: asyncio.TimerHandle | None = None  # refused: closing after LINGER
        self._drained = 0  # bytes dropped while lingering

    # -- the connection

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # A connection that sends nothing at all is timed like a slow head.
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def connection_lost(self, exc) -> None:
        self._cancel_timers()
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            # Refused: what still comes is dropped until the close, and no more than
            # LINGER_BYTES of it (a client that keeps sending gets the close sooner).
            self._drained += len(data)
            if self._drained > LINGER_BYTES:
                self.transport.close()
            return
        self._unset_keepalive_if_required()
        try:
            self._feed(data)
        except httptools.HttpParserError:
            if self._refusal is not None:
                self._refuse(431, self._refusal)
            else:
                msg = "Invalid HTTP request received."
                self.logger.warning(msg)
                self.send_400_response(msg)
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        # Timers are armed only for a message left incomplete by this read: a request that
        # arrives in one read (nearly all of them) never creates one.
        if self._reading_head:
            if self._head_bytes and self._head_timer is None:
                self._head_timer = self.loop.call_later(
                    self.limits.header_timeout, self._head_timed_out
                )
        elif self._reading_body and self._body_timer is None:
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)

    def _feed(self, data: bytes) -> None:
        if not self._reading_head:
            self.parser.feed_data(data)
            return
        limit = self.limits.max_header_bytes
        room = limit - self._head_bytes
        if len(data) <= room:
            self._head_bytes += len(data)
            self.parser.feed_data(data)
            return
        # Only what still fits under the limit reaches the parser; if the head is not
        # complete within it, it is too large (the rest of the read may be its body).
        self._head_bytes = limit
        if room:
            self.parser.feed_data(data[:room])
        if self._reading_head:
            self._refusal = f"request line and headers: larger than the limit of {limit} bytes"
            raise httptools.HttpParserError(self._refusal)
        self.parser.feed_data(data[room:])

    # -- parser callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(self.headers) >= self.limits.max_headers:
            self._refusal = f"headers: more than the limit of {self.limits.max_headers} fields"
            raise HeadRefused(self._refusal)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._reading_body = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._reading_body = False
        self._reading_head = True
        self._head_bytes = 0
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # -- timeouts

    def _busy(self) -> bool:
        """Still answering a request (or holding what came because the app has not taken
        it): the client is waiting on us, not the other way round."""
        return self.flow.read_paused or (
            self.cycle is not None and not self.cycle.response_complete
        )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self._reading_head:
            return
        if self._busy():
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout, self._head_timed_out
            )
            return
        if self._head_bytes:
            limit = self.limits.header_timeout
            self._refuse(408, f"request line and headers: not received within {limit:g} s")
        else:
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or not self._reading_body:
            return
        if self.flow.read_paused:
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
            return
        self._refuse(408, f"body: not received within {self.limits.body_timeout:g} s")

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    # -- answers of the protocol itself

    def _refuse(self, status: int, detail: str) -> None:
        """Answer ``status`` with a JSON detail (unless a response has begun) and close.

        The request's application task, if any, sees a disconnect from now on. The close
        lingers: the answer is followed by a FIN and what the client still sends is read
        and dropped for up to ``LINGER_SECONDS`` and ``LINGER_BYTES`` (or until it closes
        too), because closing a socket with unread input sends a reset that can destroy the
        answer before the client reads it."""
        self._cancel_timers()
        cycle = self.cycle
        started = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.message_event.set()
        if not started:
            body = json.dumps({"detail": detail}).encode()
            head = [STATUS_LINE[status]]
            for name, value in (*self.server_state.default_headers, *SECURITY_HEADERS):
                head += [name, b": ", value, b"\r\n"]
            head += [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
            ]
            self.transport.write(b"".join(head) + body)
            if self.transport.can_write_eof():
                self.transport.write_eof()
                self._lingering = self.loop.call_later(LINGER_SECONDS, self.transport.close)
                return
        self.transport.close()
