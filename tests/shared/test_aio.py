"""The async toolkit: racing work against stops, threads handing items to the loop, and
the event bus, in process."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from shared.aio import Interrupted, ThreadStream, unless
from shared.events import EventBus


async def test_work_that_finishes_first_returns_and_the_stop_is_cancelled() -> None:
    stop = asyncio.Event()
    waiting = asyncio.ensure_future(stop.wait())
    assert await unless(asyncio.sleep(0, result="done"), waiting) == "done"
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_stop_that_finishes_first_cancels_the_work_and_raises_interrupted() -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    with pytest.raises(Interrupted):
        await unless(forever(), asyncio.sleep(0))
    assert cancelled.is_set()  # awaited: it has let go of what it held


async def test_a_timeout_raises_timeout_error_and_a_shielded_future_is_left_alone() -> None:
    shared: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await unless(asyncio.shield(shared), timeout_s=0.01)
    assert not shared.cancelled()
    shared.set_result(7)
    assert await unless(asyncio.shield(shared), timeout_s=0.01) == 7


async def test_cancelling_the_caller_cancels_the_work_too() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    caller = asyncio.create_task(unless(forever(), asyncio.Event().wait()))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(cancelled.wait(), 5)


async def test_a_thread_stream_yields_in_order_then_raises_what_the_thread_raised() -> None:
    threads: set[str] = set()

    def items() -> Iterator[int]:
        threads.add(threading.current_thread().name)
        yield 1
        yield 2
        raise ValueError("from the thread")

    stream = ThreadStream(items)
    seen = []
    with pytest.raises(ValueError, match="from the thread"):
        async for item in stream:
            seen.append(item)
    await stream.finished
    assert seen == [1, 2]
    assert threading.current_thread().name not in threads


async def test_the_bus_keeps_topics_apart_and_cuts_off_a_subscriber_that_falls_behind() -> None:
    bus = EventBus(max_pending=2)
    async with bus.subscribe("job-a") as a, bus.subscribe("job-b") as b:
        bus.publish({"n": 1}, "job-a")
        assert (a.qsize(), b.qsize()) == (1, 0)
        bus.publish({"n": 2}, "job-a")
        bus.publish({"n": 3}, "job-a")  # a has 2 pending: it is cut off instead
        assert [a.get_nowait() for _ in range(3)] == [{"n": 1}, {"n": 2}, None]
        bus.publish({"n": 4}, "job-a")  # nobody listens to job-a now
        assert a.empty()
        bus.close()
        assert b.get_nowait() is None
