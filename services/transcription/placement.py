"""Where transcription runs, and how it gives the GPU back: one object for jobs and
interactive requests alike.

A request runs on a worker process under a lease. When the coordinator asks for the
card, or the lease is lost, the lease's listener pauses the worker at once (SIGSTOP,
on the thread that heard it) and tells the request's loop, which hands the card over:

- ``pause``: the usual case. The worker's memory stays where it is; release at once.
- when the lease says the card cannot hold both (``free_memory``):
  - ``checkpoint``: the CUDA driver copies the worker's device memory to the host
    (shared.cuda_checkpoint), where the driver supports it;
  - ``restart``: otherwise the worker is ended (and any other paused worker of this
    service), and the request starts again on a new worker from the caller's
    checkpoint once the card is back.

Then it waits for the card, and resumes the worker (SIGCONT) exactly where it stopped.
At the end of a request the lease is released, after moving the weights off the
device (``unload``) whenever memory must be freed. The worker is also fenced on its
own: it stops itself at the lease's local deadline (see worker.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any

from services.transcription.pool import WorkerPool
from services.transcription.worker import (
    Decoded,
    Died,
    Ended,
    Failed,
    HandedOver,
    Work,
    Worker,
    WorkerDied,
    WorkerFailed,
    process_state,
)
from shared import cuda_checkpoint
from shared.aio import Interrupted, unless
from shared.gpu import Gpu, GpuUnavailable, Handover, HeldLease, LeaseEvent, LeaseRequest, Priority
from shared.metrics import Metrics

log = logging.getLogger(__name__)

HOLDER = "transcription"
MAX_DEATHS = 3
"""A request whose worker dies this many times in a row without progress fails."""

OnMessage = Callable[[str, Any], Awaitable[None]]
OnState = Callable[[str], Awaitable[None]]


class PlacementMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.yields = metrics.counter("transcription_yields_total", "Times a request gave the GPU back mid-file.")
        self.yield_latency = metrics.histogram(
            "transcription_yield_latency_seconds",
            "From learning someone waits to releasing the lease.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.handovers = metrics.histogram(
            "transcription_handover_seconds",
            "What was done with the device when giving the GPU back, and how long it took.",
            ("path",),
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.worker_deaths = metrics.counter("transcription_worker_deaths_total", "Workers that died mid-request.")
        self.stalls = metrics.counter(
            "transcription_stalls_total",
            "Workers ended by the watchdog: no progress while holding the GPU (the request restarts "
            "from its checkpoint).",
        )
        self.on_device = metrics.gauge(
            "transcription_workers_on_device", "Workers whose Whisper weights are on the device, as they reported."
        )


class Stalled(Exception):
    """The worker sent nothing for the watchdog's bound while holding the card."""


class Step(Enum):
    """The states of a request's run (``Placement.run``)."""

    SEND = "send"
    """Send the request (from the caller's checkpoint) to the worker."""
    RESUME = "resume"
    """Resume the paused worker where it stopped."""
    LISTEN = "listen"
    """Read the worker's messages."""
    HAND_OVER = "hand_over"
    """The worker is paused: give the card back and get it again."""
    DIED = "died"
    STALLED = "stalled"
    DONE = "done"


@dataclass
class _Run:
    """One request's run: its worker, its lease, and what the steps share."""

    worker: Worker
    lease: HeldLease
    request_for: Callable[[], Work]
    priority: Priority
    wait_s: float | None
    on_message: OnMessage
    on_state: OnState | None
    deaths: int = 0
    busy: bool = False
    """The worker has a request of ours."""
    resend: bool = False
    """After the hand-over, send the request again (its worker was replaced)."""
    result: Any = None

    async def state(self, state: str) -> None:
        if self.on_state is not None:
            await self.on_state(state)


class Placement:
    def __init__(
        self,
        pool: WorkerPool,
        gpu: Gpu,
        *,
        vram_mb: int,
        ttl_ms: int,
        on_cuda: bool,
        metrics: PlacementMetrics,
        stall_s: float = 120.0,
        on_stall: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.stall_s = stall_s
        """A worker that holds the card and sends nothing (no window, no piece) this long is stalled."""
        self._on_stall = on_stall
        self.pool = pool
        self._gpu = gpu
        self.vram_mb = vram_mb
        self._ttl_ms = ttl_ms
        self._metrics = metrics
        self.checkpoints = on_cuda and cuda_checkpoint.available()
        """Whether device memory is freed with the CUDA checkpoint API (else: restart)."""
        metrics.on_device.set_function(lambda: sum(1 for w in pool.workers if w.alive and w.on_device))

    async def acquire(self, priority: Priority, wait_s: float | None) -> HeldLease:
        """The lease; ``wait_s`` None waits as long as it takes (jobs)."""
        while True:
            try:
                request = LeaseRequest(
                    HOLDER,
                    priority,
                    wait_s=300 if wait_s is None else wait_s,
                    ttl_ms=self._ttl_ms,
                    vram_mb=self.vram_mb,
                )
                return await self._gpu.acquire(request)
            except GpuUnavailable as exc:
                if wait_s is not None:
                    raise
                log.info("still waiting for the GPU", extra={"reason": exc.reason})
                await asyncio.sleep(min(5.0, exc.retry_after_s))

    async def run(
        self,
        request_for: Callable[[], Work],
        *,
        priority: Priority,
        wait_s: float | None,
        on_message: OnMessage,
        on_state: OnState | None = None,
        lease: HeldLease | None = None,
    ) -> Any:
        """Run a request to its end and return what the worker's ``end`` carried.

        ``request_for()`` gives the request to send: again after the worker was ended,
        so it must start from the caller's checkpoint. ``on_message`` gets each
        ``window`` or ``piece``; ``on_state`` gets ``paused`` and ``running``.
        Cancelling the task ends the worker's request at once (the worker is replaced).
        Raises GpuUnavailable (interactive: the card did not come back in time),
        WorkerFailed, or WorkerDied.

        An explicit state machine (``Step``): SEND the request, or RESUME the paused
        worker; LISTEN until the worker ends, fails, dies, stalls or was paused; then
        HAND_OVER the card (and get it back), replace a DIED worker, or end a STALLED
        one, and go on from SEND or RESUME.
        """
        worker, held = await self._worker_then_lease(lease, priority, wait_s)
        run = _Run(worker, held, request_for, priority, wait_s, on_message, on_state)
        try:
            await run.state("running")
            step = Step.SEND
            while True:
                step = await self._step(run, step)
                if step is Step.DONE:
                    return run.result
        except BaseException:
            if run.busy:
                run.worker.kill()  # cancelled or failed mid-request: it cannot be interrupted otherwise
            raise
        finally:
            self._disarm(run.worker)
            await asyncio.shield(self._finish(run.worker, run.lease))

    async def _step(self, run: _Run, step: Step) -> Step:
        """One step of a request's run; the next one."""
        worker = run.worker
        if step in (Step.SEND, Step.RESUME) and not worker.alive:
            run.worker = await self.pool.replace(worker)  # ended while paused, to free memory for someone else
            step = Step.SEND
        if step is Step.SEND:
            arm = partial(self._arm, run.worker, run.lease)
            await self._unless_stalled(run.worker.send(run.request_for(), before=arm))
            run.busy = True
            return Step.LISTEN
        if step is Step.RESUME:
            run.worker.set_deadline(run.lease.deadline)
            run.worker.resume()  # where it stopped; if this lease is already asked for, arming pauses it again
            self._arm(run.worker, run.lease)
            return Step.LISTEN
        if step is Step.LISTEN:
            return await self._listen(run)
        if step is Step.STALLED:
            # No word from the worker for stall_s while it holds the card: end it, give
            # the card back, and start again from the checkpoint.
            await self._stalled(worker, run.lease)
            run.busy = False
            run.lease = await self.acquire(run.priority, run.wait_s)
            run.worker = await self.pool.replace(worker)
            return Step.SEND
        if step is Step.DIED:
            run.deaths += 1
            self._metrics.worker_deaths.inc()
            log.warning("a whisper worker died mid-request; replacing it", extra={"deaths": run.deaths})
            if run.deaths >= MAX_DEATHS:
                raise WorkerDied(f"the worker died {run.deaths} times in a row")
            run.busy = False
            run.worker = await self.pool.replace(worker)
            if not run.lease.lost:
                return Step.SEND
            run.resend = True  # and the card, lost meanwhile, is given back first
            return Step.HAND_OVER
        if step is Step.HAND_OVER:
            return await self._hand_over_and_back(run)
        raise AssertionError(f"no step {step}")

    async def _listen(self, run: _Run) -> Step:
        """The worker's messages until one that ends the listening: the result (DONE), a
        failure (raised), a death, a stall, or a pause for a hand-over."""
        while True:
            try:
                message = await self._unless_stalled(run.worker.receive())
            except Stalled:
                return Step.STALLED
            if isinstance(message, Decoded):
                run.deaths = 0
                await run.on_message(message.kind, message.body)
            elif isinstance(message, HandedOver) and message.fence != run.lease.fence:
                continue  # a stale signal from an earlier lease
            elif isinstance(message, Ended):
                run.busy = False
                run.result = message.result
                return Step.DONE
            elif isinstance(message, Failed):
                run.busy = False
                raise WorkerFailed(message.error)
            elif isinstance(message, Died):
                return Step.DIED
            else:
                return Step.HAND_OVER

    async def _hand_over_and_back(self, run: _Run) -> Step:
        """The worker is paused: give the card back (freeing memory as asked), wait for
        it, and go on where the worker stopped, or from the start on a new worker."""
        await run.state("paused")
        restart = await self._hand_over(run.worker, run.lease)
        if restart:
            run.busy, run.resend = False, True
        run.lease = await self.acquire(run.priority, run.wait_s)
        await run.state("running")
        if restart:
            run.worker = await self.pool.replace(run.worker)
        elif run.worker.checkpointed:
            run.worker.resume()
            await asyncio.to_thread(cuda_checkpoint.restore, run.worker.pid)
            run.worker.checkpointed = False
        step = Step.SEND if run.resend else Step.RESUME
        run.resend = False
        return step

    async def _worker_then_lease(
        self, lease: HeldLease | None, priority: Priority, wait_s: float | None
    ) -> tuple[Worker, HeldLease]:
        """An idle worker first, then the card. A request that holds the card without a
        worker can do nothing with it and hears no yield (only an armed worker does): in
        the soak an upload held the card for 100 s, waiting for a worker that a paused job
        and a paused upload held, both waiting for that card, until the coordinator
        revoked it; 15 times in 30 minutes, every chat meanwhile waiting out its GPU wait.
        So a lease handed in (the route takes one before a stream starts, to refuse with
        503 while it still can) is given back if someone asks for it before a worker is
        free, and asked for again once one is."""
        taking = asyncio.ensure_future(self.pool.take())
        try:
            if lease is not None:
                try:
                    await unless(asyncio.shield(taking), lease.wait_yield())
                except Interrupted:
                    await lease.release("pause", 0.0)
                    lease = None
            worker = await taking
        except BaseException:
            if taking.done() and not taking.cancelled() and taking.exception() is None:
                self.pool.give(taking.result())
            else:
                taking.cancel()
            raise
        if lease is None:
            try:
                lease = await self.acquire(priority, wait_s)
            except BaseException:
                self.pool.give(worker)
                raise
        return worker, lease

    async def _unless_stalled(self, work: Awaitable[Any]) -> Any:
        """``work``, unless the worker makes no progress for ``stall_s`` (Stalled). Time
        paused by a hand-over does not count: the placement is not waiting then."""
        try:
            return await asyncio.wait_for(work, self.stall_s)
        except TimeoutError:
            raise Stalled() from None

    async def _stalled(self, worker: Worker, lease: HeldLease) -> None:
        self._disarm(worker)
        state = process_state(worker.pid)
        worker.kill()
        self.pool.end_paused(keep=worker)
        self._metrics.stalls.inc()
        log.warning(
            "a whisper worker made no progress while holding the GPU; ended it, releasing the card",
            extra={"fence": lease.fence, "after_s": self.stall_s, "process_state": state},
        )
        if self._on_stall is not None:
            await self._on_stall({"fence": lease.fence, "after_s": self.stall_s, "process_state": state})
        await lease.release("restart", 0.0)

    # -- the lease's signals ------------------------------------------------------------

    def _arm(self, worker: Worker, lease: HeldLease) -> None:
        worker.armed = lease
        worker.set_deadline(lease.deadline)

        def listener(event: LeaseEvent) -> None:
            if worker.armed is not lease:
                return
            if event == "renewed":
                worker.extend(lease.deadline)  # resumes it if its fence stopped it before the renewal came
                return
            worker.hand_over(lease.fence)  # the cores (or the card) are free from this instant

        lease.listen(listener)

    @staticmethod
    def _disarm(worker: Worker) -> None:
        worker.armed = None

    async def _hand_over(self, worker: Worker, lease: HeldLease) -> bool:
        """The worker is paused. Free memory if asked, release. True: the worker was ended."""
        self._disarm(worker)
        started = time.monotonic()
        path: Handover = "pause"
        restart = False
        if lease.free_memory and not lease.lost:
            if self.checkpoints:
                try:
                    worker.resume()  # the driver's thread in the worker does part of the work
                    await asyncio.to_thread(cuda_checkpoint.suspend, worker.pid)
                    worker.pause()
                    worker.checkpointed = True
                    path = "checkpoint"
                except cuda_checkpoint.CheckpointFailed as exc:
                    log.warning("CUDA checkpoint failed; ending the worker instead", extra={"error": str(exc)})
                    worker.pause()
            if path != "checkpoint":
                worker.kill()
                restart = True
                path = "restart"
                self.pool.end_paused(keep=worker)
                await self.pool.free_idle()
        # From the instant the worker was paused (when the yield was heard) to the release.
        seconds = time.monotonic() - (lease.yield_seen_at or started)
        await lease.release(path, seconds * 1000)
        self._metrics.handovers.labels(path).observe(seconds)
        if lease.yield_seen_at is not None:
            latency = time.monotonic() - lease.yield_seen_at
            self._metrics.yields.inc()
            self._metrics.yield_latency.observe(latency)
            log.info(
                "gave the GPU back",
                extra={"fence": lease.fence, "path": path, "latency_ms": round(latency * 1000, 2)},
            )
        else:
            log.warning("lease lost mid-request; paused", extra={"fence": lease.fence, "why": lease.lost_reason})
        return restart

    async def _finish(self, worker: Worker | None, lease: HeldLease) -> None:
        """After the request: weights off the device if memory must be freed, release."""
        started = time.monotonic()
        path: Handover = "keep"
        try:
            if worker is not None and worker.alive and not lease.lost and lease.free_memory:
                worker.resume()
                await worker.call(Work("free_device"))
                await self.pool.free_idle()
                path = "unload"
        except Exception:
            log.exception("could not free the device after a request")
        finally:
            seconds = time.monotonic() - started
            with contextlib.suppress(Exception):
                await lease.release(path, seconds * 1000)
            self._metrics.handovers.labels(path).observe(seconds)
            if worker is not None:
                worker.resume()
                self.pool.give(worker)
