"""The audit log: who was refused, forbidden, limited, what was deleted, what an admin
read of others' data, which leases were revoked, which workers the watchdog ended.

Each event is one JSON object. It goes to the ``baton.audit`` logger (a JSON line in
the service's log) and to a Redis stream shared by every service, trimmed to about
``BATON_AUDIT_MAX_EVENTS`` (without ``BATON_REDIS_URL``: a ring in this process's
memory). ``GET /v1/audit`` reads it, for admins. Events never carry a token, only
the reason it was refused and where it came from.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from typing import Any, Literal, get_args

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("baton.audit")

AuditKind = Literal[
    "token_refused", "forbidden", "rate_limited", "deleted", "admin_read", "lease_revoked", "worker_stalled"
]
KINDS: tuple[str, ...] = get_args(AuditKind)
_MEMORY_EVENTS = 10_000


class Audit:
    def __init__(self, service: str, redis: Redis | None, key_prefix: str, max_events: int) -> None:
        self._service = service
        self._redis = redis
        self._key = f"{key_prefix}audit"
        self._max = max_events
        self._memory: deque[dict[str, Any]] = deque(maxlen=min(max_events, _MEMORY_EVENTS))

    async def write(self, kind: str, **fields: Any) -> None:
        event = {"at": round(time.time(), 3), "service": self._service, "kind": kind} | {
            k: v for k, v in fields.items() if v is not None
        }
        log.info("audit", extra={"audit": event})
        if self._redis is None:
            self._memory.append(event)
            return
        try:
            await self._redis.xadd(self._key, {"event": json.dumps(event)}, maxlen=self._max, approximate=True)
        except (RedisError, OSError) as exc:
            self._memory.append(event)
            log.warning("audit event kept in memory only: Redis unreachable", extra={"error": type(exc).__name__})

    async def read(self, limit: int, kind: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` events (of ``kind``), newest first."""
        if self._redis is None:
            picked = [e for e in reversed(self._memory) if kind is None or e["kind"] == kind]
            return picked[:limit]
        found: list[dict[str, Any]] = []
        last = "+"
        while len(found) < limit:
            batch = await self._redis.xrevrange(self._key, max=last, min="-", count=max(limit, 100))
            if not batch:
                break
            for raw_id, fields in batch:
                entry_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
                event = json.loads((fields or {})[b"event"])
                if kind is None or event.get("kind") == kind:
                    found.append({"id": entry_id} | event)
                last = f"({entry_id}"
            if len(batch) < max(limit, 100):
                break
        return found[:limit]
