"""In-process fan-out of events to subscribers (the SSE endpoints), by topic."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

log = logging.getLogger(__name__)

Subscription = asyncio.Queue[dict[str, Any] | None]
"""Events in order; ``None`` means the subscription ended."""


class EventBus:
    """Each subscriber gets its own queue; one that falls behind by ``max_pending``
    events is cut off (its queue ends), so a slow client costs bounded memory."""

    def __init__(self, max_pending: int = 1000) -> None:
        self._subscribers: dict[str, set[Subscription]] = {}
        self._max_pending = max_pending

    def publish(self, event: dict[str, Any], topic: str = "") -> None:
        for queue in list(self._subscribers.get(topic, ())):
            if queue.qsize() >= self._max_pending:
                log.warning("cutting off an event subscriber that fell behind")
                self._end(topic, queue)
            else:
                queue.put_nowait(event)

    @asynccontextmanager
    async def subscribe(self, topic: str = "") -> AsyncIterator[Subscription]:
        queue: Subscription = asyncio.Queue()
        self._subscribers.setdefault(topic, set()).add(queue)
        try:
            yield queue
        finally:
            self._drop(topic, queue)

    def close(self) -> None:
        """End every subscription (on shutdown)."""
        for topic, queues in list(self._subscribers.items()):
            for queue in list(queues):
                self._end(topic, queue)

    def _end(self, topic: str, queue: Subscription) -> None:
        self._drop(topic, queue)
        queue.put_nowait(None)

    def _drop(self, topic: str, queue: Subscription) -> None:
        queues = self._subscribers.get(topic)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._subscribers[topic]
