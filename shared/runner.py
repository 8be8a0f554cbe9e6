"""``python -m services.<name>``: load settings, log in JSON, serve with uvicorn.

A configuration error ends the process with status 2 and one log line that names
the variable to set, not a stack trace.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
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


class EnvelopeH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, answering a request it cannot parse (NUL or 0xff in
    a header, a broken request line) with the error envelope instead of plain text."""

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


def server_config(app: FastAPI, host: str, port: int, **options: Any) -> uvicorn.Config:
    """How every service (and the tests' in-process servers) are served."""
    return uvicorn.Config(app, host=host, port=port, http=EnvelopeH11, log_config=None, access_log=False, **options)


def serve(name: str, settings_cls: type[S], create_app: Callable[[S], FastAPI]) -> None:
    configure_logging(name)
    try:
        settings = load_settings(settings_cls)
        configure_logging(name, settings.log_level)
        app = create_app(settings)
    except ConfigError as exc:
        log.critical("cannot start %s: %s", name, exc)
        raise SystemExit(2) from None
    log.info("starting", extra={"host": settings.host, "port": settings.port})
    uvicorn.Server(server_config(app, settings.host, settings.port, timeout_graceful_shutdown=5)).run()
