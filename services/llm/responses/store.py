"""Stored responses as Baton's conversations. A stored response (``store``, the default)
is a conversation of its caller's plus a link: ``resp_…`` → (conversation, how many of
its messages the response had seen). ``previous_response_id`` continues that
conversation; continuing an older response of a chain forks a new conversation from
the messages it had seen. Links expire; the conversations the Responses API made are at
most ``MAX_RESPONSE_CONVERSATIONS`` per caller (the oldest goes first) and count toward
the caller's conversation bounds like any other."""

from __future__ import annotations

import contextlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from services.llm.conversations.store import Conversation, ConversationStore
from shared.errors import NotFound

LINK_TTL_S = 30 * 24 * 3600
"""How long a response may be continued (OpenAI keeps responses 30 days)."""
MAX_RESPONSE_CONVERSATIONS = 32
TITLE = "responses"


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Link:
    conversation: str
    length: int


class ResponseLinks:
    def __init__(self, conversations: ConversationStore, prefix: str) -> None:
        self.conversations = conversations
        self._prefix = prefix

    def _key(self, response_id: str) -> str:
        return f"{self._prefix}resp:{response_id}"

    def _made(self, owner: str) -> str:
        return f"{self._prefix}respconvs:{owner}"

    @staticmethod
    def new_id() -> str:
        return f"resp_{secrets.token_hex(24)}"

    async def conversation_for(self, owner: str, previous: str | None) -> Conversation:
        """The conversation a stored response continues (``previous``) or starts."""
        if previous is None:
            return await self._start(owner)
        redis = self.conversations.redis
        raw = await redis.hgetall(self._key(previous)) if previous.startswith("resp_") else {}
        if not raw or text(raw.get(b"owner", b"")) != owner:
            raise NotFound(f"no response {previous[:64]!r}", param="previous_response_id", code="not_found")
        link = Link(text(raw[b"conversation"]), int(raw[b"length"]))
        try:
            conversation = await self.conversations.get(owner, link.conversation)
        except NotFound:
            raise NotFound(
                f"response {previous[:64]!r} can no longer be continued (its conversation was deleted)",
                param="previous_response_id",
                code="not_found",
            ) from None
        if len(conversation.messages) == link.length:
            return conversation
        forked = await self._start(owner)  # an older response of the chain: a branch of its own
        seen = [{"role": m["role"], "content": m["content"]} for m in conversation.messages[: link.length]]
        if seen:
            await self.conversations.append(forked, seen)
        return forked

    async def _start(self, owner: str) -> Conversation:
        redis = self.conversations.redis
        made = self._made(owner)
        while await redis.zcard(made) >= MAX_RESPONSE_CONVERSATIONS:
            oldest = await redis.zpopmin(made)
            if not oldest:
                break
            conversation_id = text(oldest[0][0])
            with contextlib.suppress(NotFound):  # deleted by its owner already
                await self.conversations.delete(owner, conversation_id)
        conversation = await self.conversations.create(owner, TITLE)
        await redis.zadd(made, {conversation.id: time.time()})
        return conversation

    async def link(self, owner: str, response_id: str, conversation: Conversation) -> None:
        key = self._key(response_id)
        async with self.conversations.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key, mapping={"owner": owner, "conversation": conversation.id, "length": len(conversation.messages)}
            )
            pipe.expire(key, LINK_TTL_S)
            await pipe.execute()
