"""The placement on real whisper worker processes, with leases the test controls: the
red team's stalled job (a worker stopped, its lease renewed, its yields ignored), and
the watchdog that frees the card from a worker that makes no progress."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from services.transcription import audio
from services.transcription.placement import Placement, PlacementMetrics
from services.transcription.pool import WorkerPool
from services.transcription.worker import Work, WorkerSpec, process_state
from shared.gpu import LeaseEvent, LeaseRequest, Listener
from shared.gpu.standin import NoLease
from shared.metrics import Metrics
from shared.presets import resolve
from tests.services.transcription.conftest import MEETING

pytestmark = pytest.mark.slow


class Lease(NoLease):
    """A lease the test holds the strings of: asked to yield from its grant, or not."""

    def __init__(self, fence: int, asked: bool) -> None:
        super().__init__()
        self.fence = fence
        self.released: str | None = None
        self._listeners: list[Listener] = []
        self._asked = asyncio.Event()
        if asked:
            self.ask()

    def ask(self) -> None:
        self.yield_seen_at = asyncio.get_running_loop().time()
        self._asked.set()
        for listener in list(self._listeners):
            listener("yield")

    @property
    def yield_requested(self) -> bool:
        return self._asked.is_set()

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)
        if self._asked.is_set():
            listener("yield")

    def renewed(self) -> None:
        event: LeaseEvent = "renewed"
        for listener in list(self._listeners):
            listener(event)

    async def wait_yield(self) -> None:
        await self._asked.wait()

    async def release(self, handover: str | None = None, handover_ms: float = 0.0) -> None:
        self.released = handover or "release"


class Gpu:
    """Grants at once; the first grant is asked to yield before the job has even started
    (a chat that was already waiting: the red team's load)."""

    def __init__(self) -> None:
        self.leases: list[Lease] = []

    async def acquire(self, request: LeaseRequest) -> Lease:
        lease = Lease(len(self.leases) + 1, asked=not self.leases)
        self.leases.append(lease)
        return lease

    async def aclose(self) -> None:
        return None


@pytest.fixture
async def pool() -> AsyncIterator[WorkerPool]:
    path, _ = resolve("whisper-tiny.en", "whisper")
    made = WorkerPool(WorkerSpec(path, "cpu", "int8", threads=1, beam_size=1, chunk_length_s=30), size=2)
    await made.start()
    yield made
    await made.close()


def placement(pool: WorkerPool, gpu: Gpu, stall_s: float = 120) -> Placement:
    return Placement(
        pool,
        gpu,  # type: ignore[arg-type]
        vram_mb=0,
        ttl_ms=10_000,
        on_cuda=False,
        metrics=PlacementMetrics(Metrics("transcription")),
        stall_s=stall_s,
    )


async def meeting() -> np.ndarray:
    decoder = audio.Decoder(0, audio.MemoryBudget(1 << 30))
    samples, held = await decoder.load(MEETING)
    held.release()
    decoder.close()
    return samples


async def test_a_job_asked_to_yield_before_it_starts_hands_over_instead_of_stalling(pool: WorkerPool) -> None:
    """The cause of the red team's stall: arming the lease paused the worker before the
    request was sent to it, and the send then waited for ever on a stopped process."""
    samples = await meeting()
    gpu = Gpu()
    windows: list[Any] = []

    async def on_message(_: str, window: Any) -> None:
        windows.append(window)

    work = Work("windows", samples, {"seek": 0, "first_id": 0, "language": None, "prompt": None})
    done = placement(pool, gpu).run(lambda: work, priority="batch", wait_s=None, on_message=on_message)
    await asyncio.wait_for(done, 120)
    assert gpu.leases[0].released == "pause"  # the first lease was handed over at once
    assert len(gpu.leases) == 2 and windows  # then the job ran on under the second


async def test_a_worker_that_makes_no_progress_is_restarted_from_the_checkpoint(pool: WorkerPool) -> None:
    """The watchdog: a worker stopped behind the placement's back (as the red team saw,
    state T) makes no progress; the card is freed and the request starts again."""
    samples = await meeting()  # three windows: stopped in the second, resumed from the first's end
    gpu = Gpu()
    gpu.leases.append(Lease(0, asked=False))  # no early yield this time
    stopped: list[int] = []
    seen = 0

    async def on_message(_: str, window: Any) -> None:
        nonlocal seen
        seen += 1
        if seen == 1:  # after the first window, stop the worker as nobody should
            worker = next(w for w in pool.workers if w.armed is not None)
            os.kill(worker.pid, signal.SIGSTOP)
            stopped.append(worker.pid)

    work = Work("windows", samples, {"seek": 0, "first_id": 0, "language": None, "prompt": None})
    metrics = Metrics("transcription")
    stalling = Placement(
        pool,
        gpu,  # type: ignore[arg-type]
        vram_mb=0,
        ttl_ms=10_000,
        on_cuda=False,
        metrics=PlacementMetrics(metrics),
        stall_s=8,  # a window takes about 1.5 s here (one thread, greedy): room for a loaded machine
    )
    await asyncio.wait_for(stalling.run(lambda: work, priority="batch", wait_s=None, on_message=on_message), 180)
    assert stopped and process_state(stopped[0]) is None  # the stalled worker was ended
    assert gpu.leases[1].released == "restart"
    assert "transcription_stalls_total 1.0" in metrics.render().decode()


async def test_a_lease_is_not_held_while_the_request_waits_for_a_worker(pool: WorkerPool) -> None:
    """The soak's stall: an upload held the card for 100 s waiting for a worker that a
    paused job and a paused upload held, both waiting for that card. A request with no
    worker now gives a lease back when someone asks for it, and asks again once it has one."""
    samples = await meeting()
    busy = [await pool.take(), await pool.take()]  # both workers held by paused requests
    gpu = Gpu()
    gpu.leases.append(Lease(0, asked=False))  # the next grant is not asked for at once
    handed = Lease(100, asked=False)  # the route's lease, taken before the stream starts
    windows: list[Any] = []

    async def on_message(_: str, window: Any) -> None:
        windows.append(window)

    work = Work("windows", samples, {"seek": 0, "first_id": 0, "language": None, "prompt": None})
    running = asyncio.ensure_future(
        placement(pool, gpu).run(lambda: work, priority="interactive", wait_s=30, on_message=on_message, lease=handed)
    )
    handed.ask()  # a chat asks for the card
    async with asyncio.timeout(10):
        while handed.released is None:
            await asyncio.sleep(0.01)
    assert handed.released == "pause" and not running.done()  # given back with no worker yet
    pool.give(busy.pop())  # a worker comes free
    await asyncio.wait_for(running, 120)
    assert windows and len(gpu.leases) == 2  # asked again, and ran under the new lease
    pool.give(busy.pop())
