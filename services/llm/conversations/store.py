"""Conversations kept by the service, each its subject's own, in Redis.

A conversation is a hash (owner, title, created_at, summary, summarized) and a list of
messages; each subject has a sorted set of its conversations by creation time. Another
subject's conversation is not found (404), exactly as one that does not exist: an id
reveals nothing. Bounds: conversations per subject, messages and bytes per
conversation, and bytes per subject over all their conversations (429 past any, checked
before the model is asked), a title's length, and the id's shape (checked before Redis
is asked). A Redis that is down is a 503 ``store_unavailable`` (shared.errors).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from shared.errors import NotFound, ServiceUnavailable, TooManyRequests

ID = re.compile(r"^conv_[0-9a-f]{24}$")


@dataclass
class Conversation:
    id: str
    owner: str
    title: str
    created_at: float
    messages: list[dict[str, Any]] = field(default_factory=list)
    """Every turn, oldest first: ``role``, ``content``, ``created_at``."""
    summary: str | None = None
    """The model's summary of the oldest ``summarized`` messages, once they no longer fit."""
    summarized: int = 0
    bytes: int = 0
    """What its stored messages take (their JSON, as kept in Redis)."""

    def public(self, with_messages: bool = True) -> dict[str, Any]:
        shown: dict[str, Any] = {"id": self.id, "title": self.title, "created_at": self.created_at}
        if with_messages:
            shown |= {"messages": self.messages, "summary": self.summary, "summarized_messages": self.summarized}
        return shown

    def history(self) -> list[dict[str, str]]:
        """What goes in front of a new turn: the summary (as a system message) and the
        messages it does not cover."""
        said = [{"role": m["role"], "content": m["content"]} for m in self.messages[self.summarized :]]
        if self.summary:
            said.insert(0, {"role": "system", "content": f"Summary of the conversation so far: {self.summary}"})
        return said


def stored(messages: list[dict[str, str]], now: float) -> list[str]:
    """Messages as Redis keeps them, one JSON text each."""
    return [json.dumps({"role": m["role"], "content": m["content"], "created_at": now}) for m in messages]


def size_of(messages: list[dict[str, str]]) -> int:
    """What ``messages`` will take once stored (at most: the widest timestamp)."""
    return sum(len(text.encode("utf-8")) for text in stored(messages, 9_999_999_999.999))


class ConversationStore:
    def __init__(
        self,
        redis: Redis | None,
        prefix: str,
        max_conversations: int,
        max_messages: int,
        max_bytes: int = 1_048_576,
        max_subject_bytes: int = 32 * 1_048_576,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self.max_conversations = max_conversations
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.max_subject_bytes = max_subject_bytes

    def _key(self, conversation_id: str) -> str:
        return f"{self._prefix}conv:{conversation_id}"

    def _index(self, owner: str) -> str:
        return f"{self._prefix}convs:{owner}"

    def _usage(self, owner: str) -> str:
        return f"{self._prefix}convbytes:{owner}"

    @property
    def available(self) -> bool:
        """Whether conversations can be kept (this service has a Redis)."""
        return self._redis is not None

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise ServiceUnavailable(
                "conversations are kept in Redis, and this service has none (BATON_REDIS_URL)",
                retry_after_s=None,
                code="conversations_unavailable",
            )
        return self._redis

    async def create(self, owner: str, title: str) -> Conversation:
        redis = self.redis
        if await redis.zcard(self._index(owner)) >= self.max_conversations:
            raise TooManyRequests(
                f"at most {self.max_conversations} conversations each (GEMMA_MAX_CONVERSATIONS): delete one first",
                retry_after_s=None,
                code="too_many_conversations",
            )
        conversation = Conversation(f"conv_{secrets.token_hex(12)}", owner, title, round(time.time(), 3))
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self._key(conversation.id),
                mapping={"owner": owner, "title": title, "created_at": conversation.created_at, "summarized": 0},
            )
            pipe.zadd(self._index(owner), {conversation.id: conversation.created_at})
            await pipe.execute()
        return conversation

    async def owned(self, owner: str) -> list[Conversation]:
        ids = await self.redis.zrevrange(self._index(owner), 0, -1)
        found = [await self._load(_text(i), owner, with_messages=False) for i in ids]
        return [c for c in found if c is not None]

    async def get(self, owner: str, conversation_id: str) -> Conversation:
        conversation = await self._load(conversation_id, owner) if ID.match(conversation_id) else None
        if conversation is None:
            raise NotFound(f"no conversation {conversation_id[:64]!r}", param="conversation", code="not_found")
        return conversation

    async def delete(self, owner: str, conversation_id: str) -> None:
        conversation = await self._load(conversation_id, owner, with_messages=False)
        if conversation is None:
            raise NotFound(f"no conversation {conversation_id[:64]!r}", param="conversation", code="not_found")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._key(conversation_id), self._key(conversation_id) + ":messages")
            pipe.zrem(self._index(owner), conversation_id)
            pipe.decrby(self._usage(owner), conversation.bytes)
            await pipe.execute()

    async def check_room(self, conversation: Conversation, messages: list[dict[str, str]]) -> None:
        """Before any work: the turn and its answer must fit the conversation's bounds, and
        the turn the subject's bytes (the answer is counted when it is stored)."""
        if len(conversation.messages) + len(messages) + 1 > self.max_messages:
            raise TooManyRequests(
                f"a conversation holds at most {self.max_messages} messages (GEMMA_MAX_CONVERSATION_MESSAGES):"
                " start a new one",
                retry_after_s=None,
                code="conversation_full",
            )
        adding = size_of(messages)
        if conversation.bytes + adding > self.max_bytes:
            raise TooManyRequests(
                f"a conversation holds at most {self.max_bytes // 1024} KB (GEMMA_MAX_CONVERSATION_KB); this one "
                f"holds {conversation.bytes // 1024} KB and the turn {adding // 1024} KB more: start a new one",
                retry_after_s=None,
                code="conversation_full",
            )
        used = int(await self.redis.get(self._usage(conversation.owner)) or 0)
        if used + adding > self.max_subject_bytes:
            raise TooManyRequests(
                f"your conversations hold {used // 1_048_576} MB; at most {self.max_subject_bytes // 1_048_576} MB "
                "(GEMMA_MAX_CONVERSATIONS_MB): delete some first",
                retry_after_s=None,
                code="conversations_full",
            )

    async def append(self, conversation: Conversation, messages: list[dict[str, str]]) -> None:
        now = round(time.time(), 3)
        texts = stored(messages, now)
        added = sum(len(text.encode("utf-8")) for text in texts)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.rpush(self._key(conversation.id) + ":messages", *texts)
            pipe.hincrby(self._key(conversation.id), "bytes", added)
            pipe.incrby(self._usage(conversation.owner), added)
            await pipe.execute()
        conversation.messages.extend(json.loads(text) for text in texts)
        conversation.bytes += added

    async def summarize(self, conversation: Conversation, summary: str, summarized: int) -> None:
        await self.redis.hset(self._key(conversation.id), mapping={"summary": summary, "summarized": summarized})
        conversation.summary, conversation.summarized = summary, summarized

    async def _load(self, conversation_id: str, owner: str, with_messages: bool = True) -> Conversation | None:
        raw = await self.redis.hgetall(self._key(conversation_id))
        if not raw or _text(raw.get(b"owner", b"")) != owner:
            return None
        messages = await self.redis.lrange(self._key(conversation_id) + ":messages", 0, -1) if with_messages else []
        summary = raw.get(b"summary")
        return Conversation(
            id=conversation_id,
            owner=owner,
            title=_text(raw.get(b"title", b"")),
            created_at=float(raw.get(b"created_at", 0)),
            messages=[json.loads(m) for m in messages],
            summary=_text(summary) if summary else None,
            summarized=int(raw.get(b"summarized", 0)),
            bytes=int(raw.get(b"bytes", 0)),
        )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
