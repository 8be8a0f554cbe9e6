"""One held lease: renewed on a thread of its own, fenced by its own clock, and told by
its client (over the coordinator's event stream) when someone waits or it is lost.

It talks to the coordinator only through a ``Line``: the renewal, the release, and
forgetting it once it is given back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Protocol

import httpx

from shared.aio import Interrupted, unless
from shared.gpu.api import LeaseEvent, LeaseLost, Listener
from shared.protocol.coordinator import Handover, LeaseGrant, Priority, Renewal

log = logging.getLogger(__name__)


class Line(Protocol):
    """The lease's way to the coordinator (GpuClient)."""

    def renew(self, lease_id: str) -> httpx.Response:
        """The renewal, blocking (the renewal thread). Raises httpx.TransportError, or
        RuntimeError once the line is closed."""
        ...

    async def give_back(self, lease_id: str, params: dict[str, str] | None) -> httpx.Response:
        """The release. Raises httpx.TransportError."""
        ...

    def forget(self, fence: int) -> None:
        """Stop telling this lease about events."""
        ...


def margin_for(ttl_s: float) -> float:
    """Safety margin before the TTL: a fifth of it, at most one second."""
    return min(1.0, ttl_s / 5)


def _error_code(response: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(response.json()["error"]["code"])
    return None


class Lease:
    """One grant. Thread-safe to read; ``check()`` may be called from worker threads."""

    def __init__(
        self,
        line: Line,
        grant: LeaseGrant,
        sent_at: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._line = line
        self.lease_id: str = grant.lease_id
        self.fence: int = grant.fence
        self.holder: str = grant.holder
        self.priority: Priority = grant.priority
        self.ttl_ms: int = grant.ttl_ms
        self.waited_ms: int = grant.waited_ms
        self.granted_at: float = grant.granted_at
        self.vram_mb: int = grant.vram_mb
        self.free_memory: bool = grant.free_memory
        """Free the device memory before releasing: the card cannot hold this and the next holder."""
        self._listeners: list[Listener] = []
        self._ttl_s = self.ttl_ms / 1000.0
        self.margin_s = margin_for(self._ttl_s)
        self._loop = loop
        self._lock = threading.Lock()
        self._last_sent = sent_at  # send time of the request whose answer last confirmed the lease
        self._lost_reason: str | None = None
        self._yield = threading.Event()
        self._yield_async = asyncio.Event()
        self._lost_async = asyncio.Event()
        self._renew_soon = threading.Event()
        self._released = False
        self.yield_seen_at: float | None = None
        """Monotonic time this client learned that someone waits (for yield latency)."""
        self.verdict: str | None = None
        """What the coordinator answered the first renewal after the lease was lost here."""
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-renew-{self.fence}", daemon=True)
        if grant.yield_requested:
            self.on_yield()

    # -- state ---------------------------------------------------------------

    @property
    def deadline(self) -> float:
        """Monotonic time after which this lease must not be used."""
        return self._last_sent + self._ttl_s - self.margin_s

    @property
    def lost(self) -> bool:
        if self._lost_reason is None and time.monotonic() >= self.deadline:
            self.mark_lost("not renewed in time")
        return self._lost_reason is not None

    @property
    def lost_reason(self) -> str | None:
        return self._lost_reason

    def check(self) -> None:
        """Raise LeaseLost unless GPU work may continue under this lease."""
        if self.lost:
            raise LeaseLost(f"GPU lease {self.fence} lost: {self._lost_reason}")

    @property
    def yield_requested(self) -> bool:
        return self._yield.is_set()

    async def wait_yield(self) -> None:
        """Returns once someone waits for the GPU (or the lease is lost)."""
        with contextlib.suppress(Interrupted):
            await unless(self._yield_async.wait(), self._lost_async.wait())

    def wait_yield_blocking(self, timeout_s: float | None = None) -> bool:
        """For worker threads: block until a yield is requested; False on timeout."""
        return self._yield.wait(timeout_s)

    def listen(self, listener: Listener) -> None:
        """Call ``listener`` on the thread that learns of a yield request, a loss or a
        renewal (it must be quick and must not block). A yield or loss that already
        happened is reported at once."""
        with self._lock:
            self._listeners.append(listener)
        if self._yield.is_set():
            listener("yield")
        if self._lost_reason is not None:
            listener("lost")

    def _notify(self, event: LeaseEvent) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                log.exception("lease listener failed", extra={"fence": self.fence, "event": event})

    # -- what the GpuClient tells its leases, from other threads ------------------

    def renew_soon(self) -> None:
        """Renew now rather than at the next interval (the event stream came back)."""
        self._renew_soon.set()

    def on_yield(self, free_memory: bool | None = None) -> None:
        if free_memory is not None:
            self.free_memory = free_memory
        if not self._yield.is_set():
            self.yield_seen_at = time.monotonic()
            self._yield.set()
            self._notify("yield")
            with contextlib.suppress(RuntimeError):  # the loop may be closed at exit
                self._loop.call_soon_threadsafe(self._yield_async.set)

    def mark_lost(self, reason: str) -> None:
        with self._lock:
            if self._lost_reason is not None:
                return
            self._lost_reason = reason
        if not self._released:
            log.warning("GPU lease lost", extra={"fence": self.fence, "holder": self.holder, "reason": reason})
        self._notify("lost")
        with contextlib.suppress(RuntimeError):  # the loop may be closed at exit
            self._loop.call_soon_threadsafe(self._lost_async.set)

    def confirm(self, sent_at: float, renewal: Renewal) -> None:
        with self._lock:
            self._last_sent = max(self._last_sent, sent_at)
        self.free_memory = renewal.free_memory
        if renewal.yield_requested:
            self.on_yield()
        self._notify("renewed")

    # -- renewal thread ----------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def _renew_loop(self) -> None:
        interval = self._ttl_s / 3
        retry = min(0.25, interval / 4)
        wait = max(0.0, self._last_sent + interval - time.monotonic())
        while True:
            self._renew_soon.wait(wait)
            self._renew_soon.clear()
            if self._released:
                return
            if self._lost_reason is not None or time.monotonic() >= self.deadline:
                self.mark_lost("not renewed in time")
                self._ask_verdict()
                return
            sent = time.monotonic()
            try:
                response = self._line.renew(self.lease_id)
            except (httpx.TransportError, RuntimeError) as exc:  # RuntimeError: the client was closed
                log.warning("lease renewal failed; retrying", extra={"fence": self.fence, "error": type(exc).__name__})
                wait = retry
                continue
            if response.status_code == 200:
                self.confirm(sent, Renewal.model_validate_json(response.content))
                wait = max(0.0, sent + interval - time.monotonic())
            elif response.status_code == 410:
                self.mark_lost(_error_code(response) or "gone")
                return
            else:
                log.warning(
                    "lease renewal refused; retrying", extra={"fence": self.fence, "status": response.status_code}
                )
                wait = retry

    def _ask_verdict(self) -> None:
        """After losing the lease locally, one renewal to learn (and log) what the coordinator says."""
        try:
            response = self._line.renew(self.lease_id)
        except (httpx.TransportError, RuntimeError):
            return
        self.verdict = (
            "renewed" if response.status_code == 200 else (_error_code(response) or str(response.status_code))
        )
        log.info("coordinator's verdict on a lost lease", extra={"fence": self.fence, "verdict": self.verdict})

    # -- release -------------------------------------------------------------------

    async def release(self, handover: Handover | None = None, handover_ms: float = 0.0) -> None:
        """Give the card back (idempotent). Never raises for a lease already gone.
        ``handover``: what was done with the device, for the coordinator's history."""
        if self._released:
            return
        self._released = True
        self._renew_soon.set()
        self._line.forget(self.fence)
        if self._lost_reason in ("expired", "released"):
            return  # nothing left to give back; a revoked lease is still released early
        params = {"handover": handover, "handover_ms": f"{handover_ms:.3f}"} if handover else None
        try:
            response = await self._line.give_back(self.lease_id, params)
        except httpx.TransportError as exc:
            log.warning(
                "lease release failed; it will expire", extra={"fence": self.fence, "error": type(exc).__name__}
            )
            return
        finally:
            self.mark_lost("released")
        if response.status_code not in (204, 410):
            log.warning("lease release refused", extra={"fence": self.fence, "status": response.status_code})
