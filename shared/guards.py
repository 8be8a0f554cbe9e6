"""The per-subject limits and the audit log of one service, on the Redis every
service shares (``BATON_REDIS_URL``), built once per app and closed with it."""

from __future__ import annotations

from dataclasses import dataclass

from redis.asyncio import Redis

from shared.audit import Audit
from shared.limits import Limiter
from shared.settings import LimitSettings
from shared.store import open_redis


@dataclass
class Guards:
    limiter: Limiter
    audit: Audit
    redis: Redis | None

    @classmethod
    def build(cls, service: str, settings: LimitSettings) -> Guards:
        redis = open_redis(settings.redis_url, 2) if settings.redis_url else None
        return cls(
            Limiter(settings, redis),
            Audit(service, redis, settings.key_prefix, settings.audit_max_events),
            redis,
        )

    async def aclose(self) -> None:
        await self.limiter.aclose()
        if self.redis is not None:
            await self.redis.aclose()
