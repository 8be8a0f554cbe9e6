"""``python -m services.<name>``: load settings, log in JSON, serve with uvicorn.

A configuration error ends the process with status 2 and one log line that names
the variable to set, not a stack trace.

Every server speaks HTTP/1.1 through ``EnvelopeH11``, uvicorn's protocol with what it
lacks in front of untrusted clients:

- a **header timeout**: a connection that has not sent a whole request line and headers
  this long after it opened (or after its previous answer) is closed, so connections that
  never finish their headers do not pile up (uvicorn has only an idle timeout, armed
  after a first answer);
- a **body timeout**: a request body that stops arriving for this long is cut;
- a **lingering close**: when an answer is sent before the body was read (a 413, a
  refusal), the rest of the body is read and dropped for a while before the connection
  closes. Closing at once, with unread bytes, makes the kernel reset the connection, and
  a client still uploading then loses the answer it was sent (the gateway's 502 for a
  413).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from shared.errors import envelope
from shared.logs import configure_logging
from shared.settings import ConfigError, ServiceSettings, load_settings

S = TypeVar("S", bound=ServiceSettings)

log = logging.getLogger(__name__)


_NOT_HTTP = json.dumps(
    envelope(
        "the request is not valid HTTP/1.1 (a malformed request line or header)",
        "invalid_request_error",
        code="malformed_request",
    )
).encode()


@dataclass(frozen=True)
class HttpTimeouts:
    header_s: float = 10.0
    """From a connection's start (or its previous answer's end and its next byte) to a
    whole request line and headers."""
    body_s: float = 30.0
    """Between two pieces of a request body."""
    idle_s: float = 5.0
    """A kept-alive connection with no request (uvicorn's timeout_keep_alive)."""
    linger_s: float = 5.0
    """How long an unread request body is read and dropped after an early answer."""
    linger_bytes: int = 256 * 1_048_576
    """How much of it, at most."""


class BatonConfig(uvicorn.Config):
    """uvicorn's config, carrying the timeouts EnvelopeH11 enforces."""

    def __init__(self, app: Any, *, timeouts: HttpTimeouts, **options: Any) -> None:
        super().__init__(app, timeout_keep_alive=max(1, round(timeouts.idle_s)), **options)
        self.timeouts = timeouts


class _Lingering:
    """The connection's transport, with a close that first drains an unread body."""

    def __init__(self, transport: asyncio.Transport, protocol: EnvelopeH11) -> None:
        self._transport = transport
        self._protocol = protocol

    def close(self) -> None:
        if not self._protocol.linger():
            self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class EnvelopeH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, answering a request it cannot parse (NUL or 0xff in
    a header, a broken request line) with the error envelope instead of plain text, and
    with the header and body timeouts and the lingering close (see the module)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._timeouts: HttpTimeouts = getattr(config, "timeouts", HttpTimeouts())
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._lingering: asyncio.TimerHandle | None = None
        self._lingered = 0
        self._raw: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._raw = transport
        super().connection_made(_Lingering(transport, self))  # type: ignore[arg-type]
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._header_timer, self._body_timer, self._lingering):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            self._lingered += len(data)
            if self._lingered > self._timeouts.linger_bytes:
                self._close_now()
            return
        if self.conn.their_state is h11.IDLE and self._header_timer is None:
            self._arm_header_timer()  # the first byte of a request after a kept-alive answer
        super().data_received(data)
        state = self.conn.their_state
        if state is not h11.IDLE and self._header_timer is not None:
            self._header_timer.cancel()  # the request line and headers are in
            self._header_timer = None
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if state is h11.SEND_BODY and self._lingering is None:
            self._body_timer = self.loop.call_later(self._timeouts.body_s, self._body_timed_out)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self._timeouts.header_s, self._header_timed_out)

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE:  # still no whole request line and headers
            self._close_now()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.conn.their_state is h11.SEND_BODY:
            log.info("request body stalled; closing the connection", extra={"after_s": self._timeouts.body_s})
            self._close_now()

    def linger(self) -> bool:
        """Called when the connection would close: True if it drains an unread body first
        (it closes itself when the body ends, or past the linger bounds)."""
        if self._lingering is not None:
            return True
        if self.conn.their_state is not h11.SEND_BODY or self._raw is None or self._raw.is_closing():
            return False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._lingering = self.loop.call_later(self._timeouts.linger_s, self._close_now)
        return True

    def _close_now(self) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
        if self._raw is not None and not self._raw.is_closing():
            self._raw.close()

    def send_400_response(self, msg: str) -> None:
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(_NOT_HTTP)).encode()),
            (b"connection", b"close"),
        ]
        self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers, reason=b"Bad Request")))
        self.transport.write(self.conn.send(h11.Data(data=_NOT_HTTP)) or b"")
        self.transport.write(self.conn.send(h11.EndOfMessage()) or b"")
        self.transport.close()


def server_config(
    app: FastAPI, host: str, port: int, timeouts: HttpTimeouts | None = None, **options: Any
) -> uvicorn.Config:
    """How every service (and the tests' in-process servers) are served."""
    return BatonConfig(
        app,
        timeouts=timeouts or HttpTimeouts(),
        host=host,
        port=port,
        http=EnvelopeH11,
        log_config=None,
        access_log=False,
        **options,
    )


def serve(name: str, settings_cls: type[S], create_app: Callable[[S], FastAPI], *, edge: bool = False) -> None:
    """``edge``: the server clients reach (the gateway). It believes no client's
    X-Forwarded-For; the services behind it believe the gateway's, from the addresses in
    FORWARDED_ALLOW_IPS (uvicorn's variable; loopback by default)."""
    configure_logging(name)
    try:
        settings = load_settings(settings_cls)
        configure_logging(name, settings.log_level)
        app = create_app(settings)
    except ConfigError as exc:
        log.critical("cannot start %s: %s", name, exc)
        raise SystemExit(2) from None
    log.info("starting", extra={"host": settings.host, "port": settings.port})
    timeouts = HttpTimeouts(
        header_s=settings.header_timeout_s, body_s=settings.body_timeout_s, idle_s=settings.idle_timeout_s
    )
    config = server_config(
        app, settings.host, settings.port, timeouts, timeout_graceful_shutdown=5, proxy_headers=not edge
    )
    uvicorn.Server(config).run()
