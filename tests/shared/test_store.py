"""The services' Redis client against a real Redis that is killed and started again,
and one that is paused."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from harness.servers import RedisServer
from shared.store import open_redis


async def test_after_redis_is_killed_and_back_no_command_fails_on_a_dead_connection(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis", persistent=True).start()
    redis = open_redis(server.url, 2)
    try:
        await redis.set("kept", "1")
        await asyncio.gather(*(redis.blpop(["nothing"], timeout=0.1) for _ in range(4)))  # four pooled connections
        server.kill()
        server.start()
        answers = [await redis.get("kept") for _ in range(5)]
        assert answers == [b"1"] * 5  # each failed once on its dead socket before
    finally:
        await redis.aclose()
        server.stop()


async def test_a_paused_redis_costs_one_timeout_not_two(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis").start()
    redis = open_redis(server.url, 2)
    assert server.process is not None
    try:
        await redis.ping()
        os.kill(server.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await redis.get("x")
        assert time.monotonic() - started < 3.5  # one timeout of 2 s; a retried one would take 4
    finally:
        server.signal_continue()
        await redis.aclose()
        server.stop()
