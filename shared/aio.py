"""The async toolkit the services share: racing work against a stop, and threads that
hand items to the event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Interrupted(Exception):
    """A stop finished before the work did."""


async def unless(work: Awaitable[T], *stops: Awaitable[Any], timeout_s: float | None = None) -> T:
    """``work``'s result, unless one of ``stops`` finishes, or ``timeout_s`` passes, first.

    Then ``work`` is cancelled (and awaited, so that it has let go of what it held) and
    ``Interrupted`` (a stop) or ``TimeoutError`` raised. Work that has finished wins,
    whatever else has. Whatever is still running is cancelled on the way out, also when
    the caller itself is cancelled. To wait for a future others share without cancelling
    it, pass ``asyncio.shield(future)``.
    """
    task = asyncio.ensure_future(work)
    stoppers = [asyncio.ensure_future(stop) for stop in stops]
    try:
        await asyncio.wait({task, *stoppers}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for stopper in stoppers:
            stopper.cancel()
        if not task.done():
            task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # the caller is being cancelled, not just the work
        if any(s.done() and not s.cancelled() for s in stoppers):
            raise Interrupted() from None
        raise TimeoutError() from None


class ThreadInbox(Generic[T]):
    """Items put by any thread, taken on the event loop that made the inbox."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[T] = asyncio.Queue()

    def put(self, item: T) -> None:
        """From any thread. Dropped once the loop is closed: nobody listens then."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self) -> T:
        return await self._queue.get()


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


_END = object()


class ThreadStream(Generic[T]):
    """A blocking iterator run on the loop's default executor; ``async for`` takes its
    items on the loop, and its exception is raised there. ``finished`` resolves once the
    thread is done (stop the iterator by its own means, then await it)."""

    def __init__(self, items: Callable[[], Iterable[T]]) -> None:
        self._inbox: ThreadInbox[object] = ThreadInbox()
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().run_in_executor(None, self._run, items)

    def _run(self, items: Callable[[], Iterable[T]]) -> None:
        try:
            for item in items():
                self._inbox.put(item)
        except BaseException as error:  # handed to the event loop, raised there
            self._inbox.put(_Raised(error))
        finally:
            self._inbox.put(_END)

    async def __aiter__(self) -> AsyncIterator[T]:
        while (item := await self._inbox.get()) is not _END:
            if isinstance(item, _Raised):
                raise item.error
            yield item  # type: ignore[misc]
