"""In-process fan-out of lease events to SSE subscribers."""

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
    """Each subscriber gets its own queue; one that falls behind is cut off."""

    def __init__(self, max_pending: int = 1000) -> None:
        self._subscribers: set[Subscription] = set()
        self._max_pending = max_pending

    def publish(self, event: dict[str, Any]) -> None:
        for queue in list(self._subscribers):
            if queue.qsize() >= self._max_pending:
                log.warning("cutting off an event subscriber that fell behind")
                self._end(queue)
            else:
                queue.put_nowait(event)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        queue: Subscription = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    def close(self) -> None:
        """End every subscription (on shutdown)."""
        for queue in list(self._subscribers):
            self._end(queue)

    def _end(self, queue: Subscription) -> None:
        self._subscribers.discard(queue)
        queue.put_nowait(None)
