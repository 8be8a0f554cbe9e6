"""Where the model runs, and when it gives the GPU back.

Per request (the caller holds the model slot): take an interactive lease unless one
is still kept from an earlier request, load the GPU layers unless they are there,
and after the answer either release at once (someone waits, or the client went away
with nobody queued here), or keep the card for the keep-alive, renewing, until it
runs out or someone asks for it.

The layers are offloaded (a reload with 0 GPU layers) only when the lease says the
card cannot hold the next holder beside them (``free_memory``); otherwise they stay,
and the next request needs no reload. The CUDA checkpoint API could replace that
reload, but it acts on another process, and this model lives in the service's own;
without a GPU to measure it against the reload, the reload path stays.
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
from services.llm.slot import ModelSlot
from shared.aio import unless
from shared.errors import ServiceUnavailable
from shared.gpu import Gpu, GpuUnavailable, Handover, HeldLease
from shared.metrics import Metrics

log = logging.getLogger(__name__)

HOLDER = "llm"


class PlacementMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.gpu_wait = metrics.histogram("llm_gpu_wait_seconds", "Time waiting for the GPU lease.")
        self.reloads = metrics.histogram("llm_reload_seconds", "Loading the GPU layers (a reload).")
        self.offloads = metrics.histogram("llm_offload_seconds", "Offloading to the CPU (a reload with 0 layers).")
        self.fallbacks = metrics.counter("llm_cpu_fallbacks_total", "Requests served on the CPU: no lease in time.")
        self.lease_held = metrics.gauge("llm_gpu_lease_held", "1 while the LLM holds the GPU lease.")


class GpuBusy(Exception):
    """The lease was not granted within the budget the caller gave (a backend answers instead)."""


@dataclass
class Placement:
    device: Literal["gpu", "cpu"]
    lease: HeldLease | None
    gpu_wait_s: float
    fallback: bool = False


class GpuPolicy:
    def __init__(
        self,
        engine: Engine,
        gpu: Gpu,
        settings: LLMSettings,
        slot: ModelSlot,
        metrics: PlacementMetrics,
        vram_mb: int = 0,
    ) -> None:
        self.engine = engine
        self.vram_mb = vram_mb
        self._gpu = gpu
        self._settings = settings
        self._slot = slot
        self._metrics = metrics
        self._lease: HeldLease | None = None
        self._keeper: asyncio.Task[None] | None = None
        self.moves_layers = can_offload() or settings.force_reload
        if not self.moves_layers:
            log.info(
                "this llama.cpp build cannot offload to a GPU: layers stay on the CPU, but the lease is "
                "still taken so the LLM and transcription never fight over the cores"
            )

    @property
    def target_layers(self) -> int:
        return self._settings.gpu_layers if self.moves_layers else 0

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
        }

    async def place(self, budget_s: float | None = None) -> Placement:
        """Called holding the slot, before generating. ``budget_s``: wait at most this long
        for the lease (below GEMMA_GPU_WAIT_MS), then raise GpuBusy instead of the fallback."""
        if self._keeper is not None:
            self._keeper.cancel()
            self._keeper = None
        waited = 0.0
        if self._lease is not None and self._lease.lost:
            await self._drop_lost()
        if self._lease is None:
            started = time.monotonic()
            try:
                self._lease = await self._gpu.acquire(
                    HOLDER,
                    "interactive",
                    wait_s=min(self._settings.gpu_wait_ms / 1000, budget_s if budget_s is not None else 1e9),
                    ttl_ms=self._settings.lease_ttl_ms,
                    vram_mb=self.vram_mb,
                )
            except GpuUnavailable as exc:
                waited = time.monotonic() - started
                self._metrics.gpu_wait.observe(waited)
                if budget_s is not None:
                    raise GpuBusy(exc.reason) from None
                self._metrics.fallbacks.inc()
                if self._settings.gpu_fallback == "fail":
                    raise ServiceUnavailable(
                        f"the GPU was not granted in time ({exc.reason})",
                        retry_after_s=exc.retry_after_s,
                        code="gpu_unavailable",
                    ) from None
                log.warning("GPU not granted in time; serving on the CPU", extra={"reason": exc.reason})
                return Placement("cpu", None, waited, fallback=True)
            waited = time.monotonic() - started
            self._metrics.gpu_wait.observe(waited)
            self._metrics.lease_held.set(1)
            log.info("GPU lease granted", extra={"fence": self._lease.fence, "waited_ms": round(waited * 1000)})
        if self.engine.gpu_layers != self.target_layers:
            seconds = await asyncio.to_thread(self.engine.load, self.target_layers)
            self._metrics.reloads.observe(seconds)
            log.info(
                "layers loaded",
                extra={"gpu_layers": self.target_layers, "seconds": round(seconds, 3), "fence": self._lease.fence},
            )
        device: Literal["gpu", "cpu"] = "gpu" if self.engine.gpu_layers and can_offload() else "cpu"
        return Placement(device, self._lease, waited)

    async def finish(self, placement: Placement, *, client_gone: bool) -> None:
        """Called holding the slot, after generating."""
        lease = placement.lease
        if lease is None:
            return
        if lease.lost:
            await self._drop_lost()
        elif lease.yield_requested or self._settings.keep_alive_s == 0 or (client_gone and self._slot.waiting == 0):
            await self._offload_and_release("someone waits" if lease.yield_requested else "done")
        elif self._slot.waiting == 0:
            self._keeper = asyncio.create_task(self._keep(lease), name="llm-keep-alive")

    async def _keep(self, lease: HeldLease) -> None:
        """Hold the card while idle until the keep-alive runs out or someone asks for it."""
        with contextlib.suppress(TimeoutError):
            await unless(lease.wait_yield(), timeout_s=self._settings.keep_alive_s)
        async with self._slot:  # a request that takes the slot first cancels this task
            if self._lease is lease:
                reason = "someone waits" if lease.yield_requested else "keep-alive over"
                await self._offload_and_release(reason)

    async def _offload_and_release(self, reason: str) -> None:
        lease, self._lease = self._lease, None
        handover: Handover = "keep"
        seconds = 0.0
        if lease is not None and lease.free_memory and self.moves_layers and self.engine.gpu_layers != 0:
            seconds = await asyncio.to_thread(self.engine.load, 0)
            self._metrics.offloads.observe(seconds)
            handover = "offload"
            log.info("offloaded to the CPU", extra={"seconds": round(seconds, 3)})
        if lease is not None:
            await lease.release(handover, seconds * 1000)
            self._metrics.lease_held.set(0)
            log.info("GPU lease released", extra={"fence": lease.fence, "why": reason, "handover": handover})

    async def _drop_lost(self) -> None:
        lease, self._lease = self._lease, None
        self._metrics.lease_held.set(0)
        if lease is not None:
            log.warning(
                "GPU lease lost; no more GPU work under it", extra={"fence": lease.fence, "why": lease.lost_reason}
            )
            with contextlib.suppress(Exception):
                await lease.release()
        if lease is not None and lease.free_memory and self.moves_layers and self.engine.gpu_layers != 0:
            seconds = await asyncio.to_thread(self.engine.load, 0)
            self._metrics.offloads.observe(seconds)

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
        async with self._slot:
            await self._offload_and_release("shutting down")
