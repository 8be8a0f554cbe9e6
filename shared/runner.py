"""``python -m services.<name>``: load settings, log in JSON, serve with uvicorn.

A configuration error ends the process with status 2 and one log line that names
the variable to set, not a stack trace.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import uvicorn
from fastapi import FastAPI

from shared.logs import configure_logging
from shared.settings import ConfigError, ServiceSettings, load_settings

S = TypeVar("S", bound=ServiceSettings)

log = logging.getLogger(__name__)


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
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
