"""The conversation store's bounds, in-process against a real Redis: bytes per
conversation and per subject (the red team stored a 3.2 MB turn of 998 messages), and a
Redis that is paused is a 503 store_unavailable, never a 500."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from redis.asyncio import Redis

from harness.servers import RedisServer
from services.llm.conversations.store import ConversationStore, size_of
from shared.errors import TooManyRequests, install_error_handlers


@pytest.fixture
async def store(redis_server: RedisServer, key_prefix: str) -> ConversationStore:
    redis = Redis.from_url(redis_server.url, socket_timeout=2)
    return ConversationStore(redis, key_prefix, 10, 2000, max_bytes=64 * 1024, max_subject_bytes=160 * 1024)


def turn(count: int, size: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": "x" * size} for _ in range(count)]


async def test_the_red_teams_turn_is_refused_before_anything_is_stored(store: ConversationStore) -> None:
    conversation = await store.create("alice", "big")
    with pytest.raises(TooManyRequests) as refused:
        await store.check_room(conversation, turn(998, 3200))  # 3.2 MB, under the message bound
    assert refused.value.code == "conversation_full"
    assert "64 KB" in refused.value.message
    assert (await store.get("alice", conversation.id)).messages == []


async def test_bytes_are_counted_per_conversation_and_per_subject(store: ConversationStore) -> None:
    conversations = [await store.create("bob", f"c{i}") for i in range(4)]
    for conversation in conversations[:2]:
        await store.check_room(conversation, turn(1, 60_000))
        await store.append(conversation, turn(1, 60_000))
        assert 60_000 < conversation.bytes <= size_of(turn(1, 60_000))
        assert (await store.get("bob", conversation.id)).bytes == conversation.bytes
    # The third conversation is empty, but bob's conversations together are nearly full.
    with pytest.raises(TooManyRequests) as refused:
        await store.check_room(conversations[2], turn(1, 60_000))
    assert refused.value.code == "conversations_full"
    # Another subject is not held back by bob's bytes.
    carol = await store.create("carol", "c")
    await store.check_room(carol, turn(1, 60_000))
    # Deleting gives the bytes back.
    await store.delete("bob", conversations[0].id)
    await store.check_room(conversations[2], turn(1, 60_000))


async def test_an_answer_is_stored_even_when_it_fills_the_conversation(store: ConversationStore) -> None:
    """The bound is checked before the model answers; the answer itself is never lost."""
    conversation = await store.create("dan", "full")
    await store.check_room(conversation, turn(1, 60_000))
    await store.append(conversation, [*turn(1, 60_000), {"role": "assistant", "content": "y" * 8000}])
    assert conversation.bytes > store.max_bytes
    with pytest.raises(TooManyRequests):
        await store.check_room(conversation, turn(1, 10))


@pytest.fixture
def paused_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "paused").start()
    yield server
    server.signal_continue()
    server.stop()


async def test_a_paused_redis_is_a_503_not_a_500(paused_redis: RedisServer, key_prefix: str) -> None:
    redis = Redis.from_url(paused_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    store = ConversationStore(redis, key_prefix, 10, 2000)
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/v1/conversations")
    async def listed() -> dict[str, object]:
        return {"data": [c.id for c in await store.owned("alice")]}

    @app.post("/v1/conversations")
    async def created() -> dict[str, object]:
        return {"id": (await store.create("alice", "t")).id}

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        assert (await client.get("/v1/conversations")).status_code == 200
        assert paused_redis.process is not None
        paused_redis.process.send_signal(signal.SIGSTOP)
        for method in ("GET", "POST"):
            started = time.monotonic()
            answer = await client.request(method, "/v1/conversations")
            assert answer.status_code == 503, answer.text
            assert answer.json()["error"]["code"] == "store_unavailable"
            assert answer.headers["retry-after"] == "1"
            assert time.monotonic() - started < 5
        paused_redis.signal_continue()
        assert (await client.get("/v1/conversations")).status_code == 200
    await redis.aclose()
