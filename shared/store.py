"""The one way a service opens Redis, where it keeps its state."""

from __future__ import annotations

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError


def open_redis(url: str, timeout_s: float) -> Redis:
    """A client whose commands time out after ``timeout_s`` (a paused Redis is a quick
    503, never a hang). A command that meets a broken connection is sent once more on a
    new one: after Redis was restarted, each pooled connection is a dead socket, and
    without the retry every one of them failed a request (measured: a 503 for a
    conversation read after a kill -9 of Redis, with Redis already back). A timeout is
    not retried, so a paused Redis costs one timeout, not two."""
    return Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
