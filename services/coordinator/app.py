"""The coordinator app: ``create_app(settings)``; nothing is created at import."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from fastapi import FastAPI

from services.coordinator.api import DOMAIN_ERRORS, router
from services.coordinator.card import card_memory_mb
from services.coordinator.leases import CoordinatorMetrics, LeaseManager
from services.coordinator.settings import CoordinatorSettings
from shared.errors import map_errors
from shared.events import EventBus
from shared.service import Foundation
from shared.settings import load_settings
from shared.store import open_redis
from shared.web import Readiness


def redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def create_app(settings: CoordinatorSettings | None = None) -> FastAPI:
    settings = settings or load_settings(CoordinatorSettings)
    base = Foundation.build("coordinator", settings)
    guards, metrics = base.guards, base.metrics
    timeout = settings.redis_timeout_ms / 1000.0
    redis = open_redis(settings.redis_url, timeout)
    bus = EventBus()
    manager = LeaseManager(
        redis,
        settings,
        bus,
        CoordinatorMetrics(metrics),
        card_memory_mb(settings.gpu_memory_mb),
        guards.audit,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await manager.start()
        try:
            yield
        finally:
            bus.close()
            await manager.stop()
            await redis.aclose()
            await guards.aclose()

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
