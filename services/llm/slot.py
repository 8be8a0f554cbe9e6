"""The one model slot: one request generates at a time, and the GPU policy's keep-alive
takes the slot too before it gives the card back. The slot counts who waits for it: the
queue metric, and the policy keeps the card after an answer only while somebody does."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from types import TracebackType

from shared.aio import Interrupted, unless


class ModelSlot:
    def __init__(self, on_waiting: Callable[[int], object] | None = None) -> None:
        self._lock = asyncio.Lock()
        self._on_waiting = on_waiting
        self.waiting = 0
        """Requests waiting for the slot now."""

    def _count(self, change: int) -> None:
        self.waiting += change
        if self._on_waiting is not None:
            self._on_waiting(self.waiting)

    async def take(self, disconnected: Callable[[], Awaitable[object]]) -> bool:
        """Wait for the slot, counted among those waiting. False, and the slot not held,
        when ``disconnected`` finishes first (the caller left)."""
        self._count(+1)
        try:
            await unless(self._lock.acquire(), disconnected())
        except Interrupted:
            return False
        finally:
            self._count(-1)
        return True

    def release(self) -> None:
        self._lock.release()

    async def __aenter__(self) -> ModelSlot:
        await self._lock.acquire()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._lock.release()
