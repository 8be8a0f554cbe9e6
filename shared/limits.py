"""Limits per subject, held in Redis so that every process of every service counts
together: requests per minute, streams open at once, transcription jobs queued or
running, and bytes of text stored in RAG.

Service tokens are never limited: a service acting for a user was already counted
when the user's request reached it. Without ``BATON_REDIS_URL`` there are no limits
(a single trusted user, tests); the launcher and compose set it.

Requests per minute use the ``limits`` library (a sliding window counter in Redis).
Streams and jobs are slots: a sorted set per subject whose members expire (a stream
refreshes its slot while open, so a process that dies frees its slots within
``STREAM_TTL_S``; a job's slot lasts until the job ends). Stored bytes are a counter
the RAG store moves by what it actually added or removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from shared.errors import TooManyRequests
from shared.settings import LimitSettings

log = logging.getLogger(__name__)

STREAM_TTL_S = 60.0
"""A stream's slot expires this long after its last refresh (a dead process's streams)."""
_REFRESH_EVERY_S = STREAM_TTL_S / 3
_FOREVER = 1e15  # a job's slot: until the job ends

# Frees expired members, then takes a slot when one is free.
# KEYS[1] the subject's set; ARGV member, limit, ttl in ms (0: no expiry). -> 1 taken, 0 full.
_TAKE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
local ttl = tonumber(ARGV[3])
local until_ms = ttl > 0 and now_ms + ttl or tonumber(ARGV[4])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], until_ms, ARGV[1])
  return 1
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], until_ms, ARGV[1])
return 1
"""

# Pushes the expiry of members still held. KEYS[1] the set; ARGV ttl in ms, members...
_REFRESH = """
local now = redis.call('TIME')
local until_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then redis.call('ZADD', KEYS[1], until_ms, ARGV[i]) end
end
return 1
"""


def subject_key(subject: str) -> str:
    """A fixed-size key part for a subject (subjects are up to 256 printable characters)."""
    return hashlib.sha256(subject.encode("utf-8")).hexdigest()[:24]


class Limiter:
    """Checks and counts one subject's use. Every method is a no-op without Redis."""

    def __init__(self, settings: LimitSettings, redis: Redis | None) -> None:
        self.settings = settings
        self._redis = redis
        self._prefix = f"{settings.key_prefix}limit:"
        self._rpm = RateLimitItemPerMinute(settings.limit_rpm) if settings.limit_rpm else None
        self._window: SlidingWindowCounterRateLimiter | None = None
        if redis is not None and self._rpm is not None and settings.redis_url:
            storage = RedisStorage(
                settings.redis_url.replace("redis://", "async+redis://", 1).replace("rediss://", "async+rediss://", 1),
                implementation="redispy",
                key_prefix=f"{self._prefix}rpm",
                wrap_exceptions=True,
                socket_timeout=2,
                socket_connect_timeout=2,
            )
            self._window = SlidingWindowCounterRateLimiter(storage)
        self._held: dict[str, set[str]] = {}  # streams open in this process: key -> members
        self._refresher: asyncio.Task[None] | None = None
        self._warned = 0.0

    @property
    def enabled(self) -> bool:
        return self._redis is not None

    # -- requests per minute -----------------------------------------------------------

    async def request(self, subject: str) -> None:
        """Count one request; 429 with Retry-After when the subject is over its rate."""
        if self._window is None or self._rpm is None:
            return
        try:
            if await self._window.hit(self._rpm, subject_key(subject)):
                return
            stats = await self._window.get_window_stats(self._rpm, subject_key(subject))
        except StorageError as exc:
            self._unavailable(exc)
            return
        raise TooManyRequests(
            f"more than {self.settings.limit_rpm} requests per minute (BATON_LIMIT_RPM)",
            retry_after_s=max(1.0, stats.reset_time - time.time()),
            code="rate_limited",
        )

    # -- streams -----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def stream(self, subject: str | None) -> AsyncIterator[None]:
        """Hold one of the subject's stream slots while the block runs (None: a service)."""
        slot = await self.open_stream(subject)
        try:
            yield
        finally:
            await slot.close()

    async def open_stream(self, subject: str | None) -> StreamSlot:
        """Take a stream slot now (429 when none is free); close the slot when the stream ends."""
        limit = self.settings.limit_streams
        if self._redis is None or not limit or subject is None:
            return StreamSlot(None, None, None)
        key, member = f"{self._prefix}streams:{subject_key(subject)}", uuid.uuid4().hex
        if not await self._take(key, member, limit, int(STREAM_TTL_S * 1000)):
            raise TooManyRequests(
                f"{limit} streams are already open for this user (BATON_LIMIT_STREAMS)",
                retry_after_s=5,
                code="too_many_streams",
            )
        self._held.setdefault(key, set()).add(member)
        if self._refresher is None or self._refresher.done():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())
        return StreamSlot(self, key, member)

    async def _give_back(self, key: str, member: str) -> None:
        held = self._held.get(key)
        if held is not None:
            held.discard(member)
            if not held:
                del self._held[key]
        await self._remove(key, member)

    async def _refresh_loop(self) -> None:
        assert self._redis is not None
        while self._held:
            await asyncio.sleep(_REFRESH_EVERY_S)
            for key, members in list(self._held.items()):
                if members:
                    try:
                        await self._redis.eval(_REFRESH, 1, key, int(STREAM_TTL_S * 1000), *members)
                    except (RedisError, OSError) as exc:
                        self._unavailable(exc)

    # -- jobs --------------------------------------------------------------------------

    async def take_job(self, subject: str, job_id: str) -> None:
        """Count a job as queued or running for ``subject``; 429 when they have too many."""
        limit = self.settings.limit_jobs
        if self._redis is None or not limit:
            return
        if not await self._take(f"{self._prefix}jobs:{subject_key(subject)}", job_id, limit, 0):
            raise TooManyRequests(
                f"{limit} transcription jobs are already queued or running for this user (BATON_LIMIT_JOBS)",
                retry_after_s=30,
                code="too_many_jobs",
            )

    async def end_job(self, subject: str, job_id: str) -> None:
        if self._redis is not None:
            await self._remove(f"{self._prefix}jobs:{subject_key(subject)}", job_id)

    # -- stored bytes ------------------------------------------------------------------

    async def check_storage(self, subject: str, more_bytes: int) -> None:
        """429 when ``more_bytes`` would take the subject past its stored-text quota."""
        limit = int(self.settings.limit_stored_mb * 1_048_576)
        if self._redis is None or not limit or more_bytes <= 0:
            return
        try:
            used = int(await self._redis.get(self._usage_key(subject)) or 0)
        except (RedisError, OSError) as exc:
            self._unavailable(exc)
            return
        if used + more_bytes > limit:
            raise TooManyRequests(
                f"this would store more than {self.settings.limit_stored_mb:g} MB of text for this user "
                f"(BATON_LIMIT_STORED_MB; {used / 1_048_576:.1f} MB stored): delete some first",
                retry_after_s=None,
                code="storage_quota_exceeded",
            )

    async def stored(self, subject: str, delta_bytes: int) -> None:
        """Move the subject's stored-bytes counter by what was added (+) or removed (-)."""
        if self._redis is None or not delta_bytes:
            return
        try:
            await self._redis.incrby(self._usage_key(subject), delta_bytes)
        except (RedisError, OSError) as exc:
            self._unavailable(exc)

    async def stored_bytes(self, subject: str) -> int:
        if self._redis is None:
            return 0
        return int(await self._redis.get(self._usage_key(subject)) or 0)

    def _usage_key(self, subject: str) -> str:
        return f"{self._prefix}stored:{subject_key(subject)}"

    # -- plumbing ----------------------------------------------------------------------

    async def _take(self, key: str, member: str, limit: int, ttl_ms: int) -> bool:
        assert self._redis is not None
        try:
            return bool(await self._redis.eval(_TAKE, 1, key, member, limit, ttl_ms, int(_FOREVER)))
        except (RedisError, OSError) as exc:
            self._unavailable(exc)
            return True

    async def _remove(self, key: str, member: str) -> None:
        assert self._redis is not None
        try:
            await self._redis.zrem(key, member)
        except (RedisError, OSError) as exc:
            self._unavailable(exc)

    def _unavailable(self, exc: BaseException) -> None:
        """Limits fail open: an unreachable Redis must not take the service down."""
        now = time.monotonic()
        if now - self._warned > 30:
            self._warned = now
            log.warning("limits not enforced: Redis unreachable", extra={"error": type(exc).__name__})

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher


class StreamSlot:
    """One open stream's slot; ``close()`` gives it back (idempotent)."""

    def __init__(self, limiter: Limiter | None, key: str | None, member: str | None) -> None:
        self._limiter, self._key, self._member = limiter, key, member

    async def close(self) -> None:
        if self._limiter is not None and self._key is not None and self._member is not None:
            key, member = self._key, self._member
            self._key = self._member = None
            await self._limiter._give_back(key, member)
