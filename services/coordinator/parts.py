"""The coordinator's parts, built from its settings: ``build(settings)``. The app (app.py)
is made from them, so a test can reach the lease manager it serves."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from services.coordinator.card import card_memory_mb
from services.coordinator.leases import CoordinatorMetrics, LeaseManager
from services.coordinator.settings import CoordinatorSettings
from shared.events import EventBus
from shared.service import Foundation
from shared.settings import load_settings
from shared.store import open_redis


@dataclass
class Parts:
    settings: CoordinatorSettings
    base: Foundation
    redis: Redis
    bus: EventBus
    manager: LeaseManager

    async def start(self) -> None:
        await self.manager.start()

    async def close(self) -> None:
        self.bus.close()
        await self.manager.stop()
        await self.redis.aclose()
        await self.base.guards.aclose()


def build(settings: CoordinatorSettings | None = None) -> Parts:
    settings = settings or load_settings(CoordinatorSettings)
    base = Foundation.build("coordinator", settings)
    redis = open_redis(settings.redis_url, settings.redis_timeout_ms / 1000.0)
    bus = EventBus()
    manager = LeaseManager(
        redis,
        settings,
        bus,
        CoordinatorMetrics(base.metrics),
        card_memory_mb(settings.gpu_memory_mb),
        base.guards.audit,
    )
    return Parts(settings, base, redis, bus, manager)
