"""Where the model runs, and when it gives the GPU back: one lease for the whole batch.

- **Ask early.** A request asks for the card when it arrives (``want``), while its
  memories are looked up and its prompt fitted; by the time it is ready the card is
  usually held. A request that turns out to need no card (a cached answer, a remote
  backend, a refusal) takes its ask back, and the ask is dropped when nobody else wants it.
- **One lease while anything runs.** ``place`` gives a request the lease the engine
  already holds, or waits for it up to GEMMA_GPU_WAIT_MS; then the request runs on the
  CPU (GEMMA_GPU_FALLBACK=cpu) while the ask goes on, and the engine moves to the card
  between two steps once it is granted. After the last request ends, the card is kept
  for the keep-alive, or given back at once when someone waits for it.
- **Yield at a token boundary.** The scheduler asks ``may_step`` before every decode. Once
  the lease is lost or someone asks for the card, every stream pauses after the step
  under way (the fence stops them within one token), the layers move off the card when
  the lease says it cannot hold the next holder beside them (the running sequences'
  cells go to host memory and come back), the lease is released, and the engine waits
  for the card again, interactively, to go on where every stream stopped.

The layers are moved only on a llama.cpp build that can offload (or GEMMA_FORCE_RELOAD):
elsewhere the lease is still taken so the LLM and transcription never fight over the cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Literal

from services.llm.engine import Engine, can_offload
from services.llm.settings import LLMSettings
from shared.aio import unless
from shared.errors import ServiceUnavailable
from shared.gpu import Gpu, GpuUnavailable, Handover, HeldLease, LeaseEvent, LeaseRequest
from shared.metrics import Metrics

log = logging.getLogger(__name__)

HOLDER = "llm"


class GpuPolicyMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.gpu_wait = metrics.histogram("llm_gpu_wait_seconds", "Time a request waited for the GPU lease.")
        self.reloads = metrics.histogram("llm_reload_seconds", "Loading the GPU layers (a reload).")
        self.offloads = metrics.histogram("llm_offload_seconds", "Offloading to the CPU (a reload with 0 layers).")
        self.fallbacks = metrics.counter("llm_cpu_fallbacks_total", "Requests served on the CPU: no lease in time.")
        self.lease_held = metrics.gauge("llm_gpu_lease_held", "1 while the LLM holds the GPU lease.")
        self.handovers = metrics.counter(
            "llm_batch_handovers_total", "Times the running batch paused to give the GPU back.", ("why",)
        )
        self.pause = metrics.histogram(
            "llm_batch_pause_seconds",
            "From the yield request (or loss) to every stream paused at a token boundary.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )


class GpuBusy(Exception):
    """The lease was not granted within the budget the caller gave (a backend answers instead)."""


@dataclass
class Seat:
    """Where a request runs: the device, the lease the batch holds for it (None on the
    CPU), how long it waited for the card, and whether it fell back to the CPU."""

    device: Literal["gpu", "cpu"]
    lease: HeldLease | None
    gpu_wait_s: float
    fallback: bool = False


class Ask:
    """A request's early ask for the card; ``withdraw`` it if the request needs no card."""

    def __init__(self, policy: GpuPolicy) -> None:
        self._policy = policy
        self.pending = True

    def withdraw(self) -> None:
        if self.pending:
            self.pending = False
            self._policy._withdrawn()


class GpuPolicy:
    def __init__(self, engine: Engine, gpu: Gpu, settings: LLMSettings, metrics: GpuPolicyMetrics, vram_mb: int = 0):
        self.engine = engine
        self.vram_mb = vram_mb
        self._gpu = gpu
        self._settings = settings
        self._metrics = metrics
        self._lease: HeldLease | None = None
        self._acquiring: asyncio.Task[HeldLease | None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._handing: asyncio.Task[None] | None = None
        self._releasing: asyncio.Task[None] | None = None
        self._asks = 0
        self._used = False
        """Whether a request has run under the lease held now (one asked for and withdrawn is not kept)."""
        self.active = 0
        """Requests placed and not finished."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._asked_at: float | None = None
        self.moves_layers = can_offload() or settings.force_reload
        if not self.moves_layers:
            log.info(
                "this llama.cpp build cannot offload to a GPU: layers stay on the CPU, but the lease is "
                "still taken so the LLM and transcription never fight over the cores"
            )

    @property
    def target_layers(self) -> int:
        return self._settings.gpu_layers if self.moves_layers else 0

    def attach(self) -> None:
        """Bind to the running loop and the engine's scheduler (once the model is loaded)."""
        self._loop = asyncio.get_running_loop()
        scheduler = self.engine.scheduler
        scheduler.may_step = self._may_step
        scheduler.on_blocked = lambda: self._soon(self._hand_over_soon)

    def settings_summary(self) -> dict[str, object]:
        """How this service hands the card over, for /v1/info."""
        s = self._settings
        return {
            "gpu_wait_ms": s.gpu_wait_ms,
            "fallback": s.gpu_fallback,
            "keep_alive_s": s.keep_alive_s,
            "lease_ttl_ms": s.lease_ttl_ms,
            "moves_layers": self.moves_layers,
            "force_reload": s.force_reload,
            "holding_lease": self._lease is not None and not self._lease.lost,
            "requests_placed": self.active,
        }

    # -- the scheduler's thread ----------------------------------------------------------

    def _may_step(self) -> bool:
        """The fence, before every decode: no step under a lease that is lost or asked for."""
        lease = self._lease
        if lease is None:
            return not self._handing_over()
        if lease.lost or lease.yield_requested:
            if self._asked_at is None:
                self._asked_at = lease.yield_seen_at or time.monotonic()
            return False
        return True

    def _handing_over(self) -> bool:
        return self._handing is not None and not self._handing.done()

    def _soon(self, callback: object) -> None:
        if self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed at exit
                self._loop.call_soon_threadsafe(callback)  # type: ignore[arg-type]

    # -- asking for the card -------------------------------------------------------------

    def want(self) -> Ask:
        """Ask for the card now, for a request that will need it (probably) soon."""
        self._asks += 1
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        if self._lease is None or self._lease.lost:
            self._start_acquiring()
        return Ask(self)

    def _withdrawn(self) -> None:
        self._asks -= 1
        if self._asks == 0 and self.active == 0:
            if self._acquiring is not None and not self._acquiring.done():
                self._acquiring.cancel()
                self._acquiring = None
            self._idle()

    def _start_acquiring(self) -> None:
        if self._acquiring is None or self._acquiring.done():
            self._acquiring = asyncio.create_task(self._acquire(), name="llm-gpu-ask")

    def _lease_request(self) -> LeaseRequest:
        """Every ask of the LLM's: interactive, each try bounded by GEMMA_GPU_WAIT_MS."""
        return LeaseRequest(
            HOLDER,
            "interactive",
            wait_s=self._settings.gpu_wait_ms / 1000,
            ttl_ms=self._settings.lease_ttl_ms,
            vram_mb=self.vram_mb,
        )

    async def _acquire(self) -> HeldLease | None:
        """Wait for the lease as long as it takes (each try bounded by GEMMA_GPU_WAIT_MS);
        adopt it: layers on, the engine moved between two steps."""
        while True:
            started = time.monotonic()
            try:
                lease = await self._gpu.acquire(self._lease_request())
            except GpuUnavailable as exc:
                log.info("GPU not granted yet; asking again", extra={"reason": exc.reason})
                await asyncio.sleep(min(1.0, exc.retry_after_s))
                continue
            self._metrics.gpu_wait.observe(time.monotonic() - started)
            break
        self._lease = lease
        self._used = False
        self._asked_at = None
        self._metrics.lease_held.set(1)
        lease.listen(self._heard)
        log.info("GPU lease granted", extra={"fence": lease.fence, "waited_ms": round(lease_wait_ms(started))})
        if self.engine.gpu_layers != self.target_layers:
            await self._move(self.target_layers)
        if self.active == 0 and self._asks == 0:
            self._idle()
        return lease

    async def _move(self, layers: int) -> None:
        """The layers on or off the card, between two steps."""
        scheduler = self.engine.scheduler
        await asyncio.to_thread(scheduler.hold)
        try:
            seconds = await asyncio.to_thread(self.engine.load, layers)
        finally:
            scheduler.open()
        (self._metrics.reloads if layers else self._metrics.offloads).observe(seconds)
        log.info("layers moved", extra={"gpu_layers": layers, "seconds": round(seconds, 3)})

    def _heard(self, event: LeaseEvent) -> None:
        """A lease's signal (on the thread that heard it)."""
        if event in ("yield", "lost"):
            self._soon(self._hand_over_soon)

    # -- a request's seat ----------------------------------------------------------------

    async def place(self, ask: Ask, budget_s: float | None = None) -> Seat:
        """The device a request runs on; ``budget_s``: wait at most this long for the lease
        (below GEMMA_GPU_WAIT_MS), then raise GpuBusy instead of the fallback."""
        started = time.monotonic()
        if self._handing is not None and not self._handing.done():
            await asyncio.shield(self._handing)
        if self._lease is None or self._lease.lost:
            self._start_acquiring()
            assert self._acquiring is not None
            wait_s = self._settings.gpu_wait_ms / 1000
            if budget_s is not None:
                wait_s = min(wait_s, budget_s)
            with contextlib.suppress(TimeoutError):
                await unless(asyncio.shield(self._acquiring), timeout_s=wait_s)
        waited = time.monotonic() - started
        ask.pending = False
        self._asks -= 1
        lease = self._lease
        if lease is None or lease.lost:
            if budget_s is not None or self._settings.gpu_fallback == "fail":
                if self._asks == 0 and self.active == 0:
                    self._idle()
                if budget_s is not None:
                    raise GpuBusy("not granted within the backend rule's budget")
                raise ServiceUnavailable("the GPU was not granted in time", retry_after_s=1, code="gpu_unavailable")
            self._metrics.fallbacks.inc()
            self.active += 1
            log.warning("GPU not granted in time; serving on the CPU while the ask goes on")
            return Seat("cpu", None, waited, fallback=True)
        self.active += 1
        self._used = True
        device: Literal["gpu", "cpu"] = "gpu" if self.engine.gpu_layers and can_offload() else "cpu"
        return Seat(device, lease, waited)

    async def finish(self, seat: Seat, *, client_gone: bool) -> None:
        self.active -= 1
        if self.active == 0 and self._asks == 0:
            self._idle(client_gone=client_gone)

    def _idle(self, *, client_gone: bool = False) -> None:
        """Nothing placed, nothing asked: give the card back now, or keep it a while."""
        lease = self._lease
        if lease is None or self._keeper is not None:
            if lease is None and self._acquiring is not None and not self._acquiring.done() and self._asks == 0:
                self._acquiring.cancel()
            return
        if lease.lost or lease.yield_requested or self._settings.keep_alive_s == 0 or client_gone or not self._used:
            self._releasing = asyncio.create_task(self._release("done"), name="llm-release")
        else:
            self._keeper = asyncio.create_task(self._keep(lease), name="llm-keep-alive")

    async def _keep(self, lease: HeldLease) -> None:
        """Hold the card while idle until the keep-alive runs out or someone asks for it."""
        with contextlib.suppress(TimeoutError):
            await unless(lease.wait_yield(), timeout_s=self._settings.keep_alive_s)
        self._keeper = None
        if self._lease is lease and self.active == 0 and self._asks == 0:
            await self._release("someone waits" if lease.yield_requested else "keep-alive over")

    async def _release(self, reason: str) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        handover: Handover = "keep"
        seconds = 0.0
        if lease.free_memory and self.moves_layers and self.engine.gpu_layers != 0 and not lease.lost:
            started = time.monotonic()
            await self._move(0)
            seconds = time.monotonic() - started
            handover = "offload"
        elif lease.lost and self.moves_layers and self.engine.gpu_layers != 0:
            await self._move(0)
        await lease.release(handover, seconds * 1000)
        self._metrics.lease_held.set(0)
        log.info("GPU lease released", extra={"fence": lease.fence, "why": reason, "handover": handover})

    # -- handing over mid-batch ----------------------------------------------------------

    def _hand_over_soon(self) -> None:
        if self._handing_over():
            return
        lease = self._lease
        if lease is None or not (lease.lost or lease.yield_requested) or self.active == 0:
            # Nothing to hand over mid-batch (released meanwhile; or nothing runs, and the
            # keep-alive or an idle release gives it back): let the scheduler look again.
            if lease is not None and self.active == 0 and self._keeper is None:
                self._idle()
            self.engine.scheduler.unfence()
            return
        self._handing = asyncio.create_task(self._hand_over(lease), name="llm-hand-over")

    async def _hand_over(self, lease: HeldLease) -> None:
        """Pause every stream at a token boundary, free the card, and take it back."""
        why = "lost" if lease.lost else "yield"
        scheduler = self.engine.scheduler
        await asyncio.to_thread(scheduler.hold)
        asked = self._asked_at or lease.yield_seen_at
        if asked is not None:
            self._metrics.pause.observe(max(0.0, time.monotonic() - asked))
        self._metrics.handovers.labels(why).inc()
        self._lease = None
        self._asked_at = None
        self._metrics.lease_held.set(0)
        handover: Handover = "pause"
        started = time.monotonic()
        try:
            if self.moves_layers and self.engine.gpu_layers != 0 and (lease.free_memory or lease.lost):
                seconds = await asyncio.to_thread(self.engine.load, 0)
                self._metrics.offloads.observe(seconds)
                handover = "offload"
            await lease.release(handover, (time.monotonic() - started) * 1000)
            log.info("GPU lease released mid-batch", extra={"fence": lease.fence, "why": why, "handover": handover})
            if self.active > 0:
                await self._take_back()
        finally:
            scheduler.unfence()
            scheduler.open()

    async def _take_back(self) -> None:
        """After a hand-over: the card again for the streams that wait, or the CPU. Through
        the one ask the policy keeps (``_acquiring``): an ask of its own beside it was a
        second waiter of the same holder, and when the coordinator granted the other one
        this ask waited for a card its own process held, while the hand-over under way
        kept that lease's yield request from being heard: 10 s (GEMMA_GPU_WAIT_MS) each
        time, over and over in the soak."""
        self._start_acquiring()
        assert self._acquiring is not None
        try:
            await unless(asyncio.shield(self._acquiring), timeout_s=self._settings.gpu_wait_ms / 1000)
        except TimeoutError:
            if self.moves_layers and self.engine.gpu_layers != 0:
                await asyncio.to_thread(self.engine.load, 0)  # nothing on the card without a lease
            log.warning("GPU not granted back in time; the streams go on on the CPU")
            return
        self._used = True

    async def close(self) -> None:
        for task in (self._keeper, self._acquiring, self._handing, self._releasing):
            if task is not None:
                task.cancel()
        lease, self._lease = self._lease, None
        if lease is not None:
            await lease.release("keep")
            self._metrics.lease_held.set(0)


def lease_wait_ms(started: float) -> float:
    return (time.monotonic() - started) * 1000
