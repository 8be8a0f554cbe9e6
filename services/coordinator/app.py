"""The coordinator app: ``create_app(parts)`` (parts.py; settings are built into parts);
nothing is created at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fastapi import FastAPI

from services.coordinator.api import DOMAIN_ERRORS, router
from services.coordinator.parts import Parts, build
from services.coordinator.settings import CoordinatorSettings
from shared.errors import map_errors
from shared.web import Readiness


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def create_app(parts: Parts | CoordinatorSettings | None = None) -> FastAPI:
    if not isinstance(parts, Parts):
        parts = build(parts)
    made = parts
    settings, base, manager = made.settings, made.base, made.manager

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await made.start()
        try:
            yield
        finally:
            await made.close()

    async def ready() -> Readiness:
        ok = manager.epoch is not None and await manager.ping()
        return Readiness(ok, {"redis": "ok" if ok else "unreachable"})

    def public_info() -> dict[str, Any]:
        return {"limits": settings.limits.public()}

    def info() -> dict[str, Any]:
        return {
            "redis_url": redact_url(settings.redis_url),
            "epoch": manager.epoch,
            "default_ttl_ms": settings.default_ttl_ms,
            "max_ttl_ms": settings.max_ttl_ms,
            "max_queue": settings.max_queue,
            "max_batch_wait_ms": settings.max_batch_wait_ms,
            "yield_grace_ms": settings.yield_grace_ms,
            "batch_slice_ms": settings.batch_slice_ms,
            "turn_ms": settings.turn_ms,
            "card_mb": manager.card_mb,
        }

    app = base.app(settings.max_body_mb, lifespan=lifespan, ready=ready, info=info, public_info=public_info)
    app.state.manager, app.state.settings = manager, settings  # the routes' dependencies
    app.include_router(router)
    map_errors(app, DOMAIN_ERRORS)
    return app
