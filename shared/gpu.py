"""The GPU lease client every service uses.

    async with gpu.lease(holder="llm", priority="interactive", wait_s=5) as lease:
        lease.check()            # raises LeaseLost once the lease cannot be trusted
        ... GPU work, checking between steps ...
        if lease.yield_requested: ...   # or: await lease.wait_yield()

Renewals run on their own thread with their own HTTP client, so a busy event loop
(or a model holding the GIL between tokens) cannot starve them. The client fences
itself: once no renewal has succeeded by (time the last successful renewal was
*sent* + TTL - margin) on the monotonic clock, the lease counts as lost, whatever
the network says. Yield requests arrive within milliseconds over the coordinator's
event stream (read on another thread), and in every renewal answer as a fallback.

A holder whose GPU work runs in another process registers a listener
(``lease.listen(fn)``): it is called on the thread that learns of a yield request, a
loss or a renewal, so that the work can be paused without waiting for the event loop.
A lease also says whether its holder must free its device memory before releasing
(``free_memory``), and the release reports what the holder did (``handover``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Literal, Protocol

import httpx

from shared.aio import Interrupted, unless
from shared.protocol.coordinator import Handover, LeaseGrant, Priority, Renewal
from shared.sse_reader import read_events

log = logging.getLogger(__name__)

LeaseEvent = Literal["yield", "lost", "renewed"]
Listener = Callable[[LeaseEvent], None]


class LeaseLost(Exception):
    """The lease expired, was revoked or released, or could not be renewed in time."""


class GpuUnavailable(Exception):
    """No lease: the wait ran out, the queue was full, or the coordinator is unreachable."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason


CUDA_CONTEXT_MB = 300
"""Device memory a process's CUDA context and buffers take beside its weights (estimate)."""


def vram_estimate_mb(weights_bytes: int, copies: int = 1) -> int:
    """What a holder declares when no setting says: its weights plus a fifth (activations,
    caches), plus one CUDA context per process that holds a copy."""
    per_copy = weights_bytes * 1.2 / 1_048_576 + CUDA_CONTEXT_MB
    return int(per_copy * copies + 0.5)


def _retry_after(response: httpx.Response) -> float:
    try:
        return float(response.headers.get("retry-after", "1"))
    except ValueError:
        return 1.0


class Lease:
    """One grant. Thread-safe to read; ``check()`` may be called from worker threads."""

    def __init__(
        self,
        client: GpuClient,
        grant: LeaseGrant,
        sent_at: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._client = client
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
        self.margin_s = client.margin_for(self._ttl_s)
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

    async def wait_lost(self) -> None:
        await self._lost_async.wait()

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
                response = self._client.post_renewal(self.lease_id)
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
            response = self._client.post_renewal(self.lease_id)
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
        self._client.forget(self)
        if self._lost_reason in ("expired", "released"):
            return  # nothing left to give back; a revoked lease is still released early
        params = {"handover": handover, "handover_ms": f"{handover_ms:.3f}"} if handover else None
        try:
            response = await self._client.http.delete(
                f"/v1/leases/{self.lease_id}", headers=self._client.auth_headers(), params=params
            )
        except httpx.TransportError as exc:
            log.warning(
                "lease release failed; it will expire", extra={"fence": self.fence, "error": type(exc).__name__}
            )
            return
        finally:
            self.mark_lost("released")
        if response.status_code not in (204, 410):
            log.warning("lease release refused", extra={"fence": self.fence, "status": response.status_code})


def _error_code(response: httpx.Response) -> str | None:
    with contextlib.suppress(ValueError, KeyError, TypeError):
        return str(response.json()["error"]["code"])
    return None


class GpuClient:
    """Talks to the coordinator for one service process."""

    def __init__(
        self,
        base_url: str,
        token: Callable[[], str],
        *,
        default_ttl_ms: int = 15000,
        timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        watch_events: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.default_ttl_ms = default_ttl_ms
        self._timeout_s = timeout_s
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s, transport=transport)
        self._leases: dict[int, Lease] = {}
        self._leases_lock = threading.Lock()
        self._watch = watch_events
        self._events_thread: threading.Thread | None = None
        self._events_http: httpx.Client | None = None
        self._subscribed = threading.Event()
        self._closed = threading.Event()
        # The blocking client the renewal threads share (httpx clients are thread-safe).
        # Made once, here: building one loads the TLS trust store, about 25 ms of CPU
        # that each new lease would otherwise steal from the first tokens it was taken for.
        self._sync_http = httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token()}"}

    @staticmethod
    def margin_for(ttl_s: float) -> float:
        """Safety margin before the TTL: a fifth of it, at most one second."""
        return min(1.0, ttl_s / 5)

    def post_renewal(self, lease_id: str) -> httpx.Response:
        """The one renewal request, blocking (renewal threads). Raises httpx.TransportError,
        or RuntimeError once the client is closed."""
        return self._sync_http.post(f"/v1/leases/{lease_id}/renew", headers=self.auth_headers())

    # -- events --------------------------------------------------------------------

    def _ensure_events(self) -> None:
        if self._watch and self._events_thread is None:
            self._events_thread = threading.Thread(target=self._events_loop, name="gpu-events", daemon=True)
            self._events_thread.start()

    async def wait_subscribed(self, timeout_s: float = 2.0) -> bool:
        """Start the event watcher and wait until it is live."""
        self._ensure_events()
        if not self._watch:
            return False
        if self._subscribed.is_set():  # the usual case: no hop to a worker thread
            return True
        return await asyncio.to_thread(self._subscribed.wait, timeout_s)

    def _events_loop(self) -> None:
        backoff = 0.2
        while not self._closed.is_set():
            try:
                self._events_http = httpx.Client(base_url=self.base_url, timeout=httpx.Timeout(5.0, read=45.0))
                with (
                    self._events_http as http,
                    http.stream("GET", "/v1/events", headers=self.auth_headers()) as response,
                ):
                    if response.status_code != 200:
                        log.warning("cannot watch GPU events", extra={"status": response.status_code})
                    else:
                        backoff = 0.2
                        for event in read_events(response.iter_lines()):
                            self._on_event(event.name, event.data)
            except (httpx.HTTPError, OSError, RuntimeError) as exc:
                if self._closed.is_set():
                    return
                log.info("GPU event stream interrupted", extra={"error": type(exc).__name__})
            finally:
                self._subscribed.clear()
            self._closed.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _on_event(self, event: str, data: str) -> None:
        if event == "subscribed":
            self._subscribed.set()
            # Anything may have happened while we were not listening: renew now.
            with self._leases_lock:
                for lease in self._leases.values():
                    lease.renew_soon()
            return
        try:
            body = json.loads(data)
            fence = int(body.get("fence") or 0)
        except (ValueError, TypeError, AttributeError):
            return
        with self._leases_lock:
            target = self._leases.get(fence)
        if target is None:
            return
        if event == "yield_requested":
            free = body.get("free_memory")
            target.on_yield(bool(free) if free is not None else None)
        elif event in ("revoked", "expired"):
            target.mark_lost(event)

    # -- leases --------------------------------------------------------------------

    async def acquire(
        self,
        holder: str,
        priority: Priority = "interactive",
        wait_s: float = 30.0,
        ttl_ms: int | None = None,
        vram_mb: int = 0,
    ) -> Lease:
        """Wait for the GPU; raises GpuUnavailable if it is not granted in ``wait_s``.
        ``vram_mb``: the device memory this holder needs (0: none declared)."""
        if self._watch:
            await self.wait_subscribed()
        ttl_ms = ttl_ms or self.default_ttl_ms
        waiter_id = secrets.token_hex(12)
        give_up = time.monotonic() + wait_s
        while True:
            remaining = max(0.0, give_up - time.monotonic())
            body = {
                "holder": holder,
                "priority": priority,
                "ttl_ms": ttl_ms,
                "wait_ms": int(remaining * 1000),
                "waiter_id": waiter_id,
                "vram_mb": vram_mb,
            }
            sent = time.monotonic()
            try:
                response = await self.http.post(
                    "/v1/leases", json=body, headers=self.auth_headers(), timeout=remaining + self._timeout_s
                )
            except httpx.TransportError as exc:
                # The coordinator may be restarting: ask again with the same waiter id.
                if time.monotonic() >= give_up:
                    raise GpuUnavailable(
                        f"coordinator unreachable: {type(exc).__name__}", reason="unreachable"
                    ) from None
                await asyncio.sleep(0.2)
                continue
            if response.status_code == 201:
                return await self._adopt(LeaseGrant.model_validate_json(response.content), sent)
            if response.status_code == 429:
                raise GpuUnavailable("GPU queue full", retry_after_s=_retry_after(response), reason="queue_full")
            if response.status_code == 503 and time.monotonic() < give_up and _error_code(response) != "wait_over":
                await asyncio.sleep(min(0.2, max(0.0, give_up - time.monotonic())))
                continue
            raise GpuUnavailable(
                f"GPU not granted ({response.status_code} {_error_code(response)})",
                retry_after_s=_retry_after(response),
                reason=_error_code(response) or str(response.status_code),
            )

    async def _adopt(self, grant: LeaseGrant, sent: float) -> Lease:
        lease = Lease(self, grant, sent, asyncio.get_running_loop())
        with self._leases_lock:
            self._leases[lease.fence] = lease
        ttl_s = lease.ttl_ms / 1000.0
        if time.monotonic() - sent > (ttl_s - lease.margin_s) / 2:
            # We waited long: our only safe base (the send time) is old. Renew once now.
            sent = time.monotonic()
            response = await asyncio.to_thread(self.post_renewal, lease.lease_id)
            if response.status_code != 200:
                await lease.release()
                raise GpuUnavailable("the lease was lost right after it was granted", reason="lost")
            lease.confirm(sent, Renewal.model_validate_json(response.content))
        lease.start()
        return lease

    def forget(self, lease: Lease) -> None:
        with self._leases_lock:
            self._leases.pop(lease.fence, None)

    @asynccontextmanager
    async def lease(
        self,
        holder: str,
        priority: Priority = "interactive",
        wait_s: float = 30.0,
        ttl_ms: int | None = None,
        vram_mb: int = 0,
    ) -> AsyncIterator[Lease]:
        """Acquire, and release on exit: also on errors and cancellation."""
        lease = await self.acquire(holder, priority, wait_s, ttl_ms, vram_mb)
        try:
            yield lease
        finally:
            await asyncio.shield(lease.release())

    async def aclose(self) -> None:
        self._closed.set()
        with self._leases_lock:
            leases = list(self._leases.values())
        for lease in leases:
            await lease.release()
        for http in (self._events_http, self._sync_http):
            if http is not None:
                with contextlib.suppress(Exception):
                    http.close()
        await self.http.aclose()


class HeldLease(Protocol):
    """What a service holds while it may use the GPU."""

    @property
    def fence(self) -> int: ...

    @property
    def yield_seen_at(self) -> float | None: ...

    @property
    def lost_reason(self) -> str | None: ...

    @property
    def lost(self) -> bool: ...

    @property
    def yield_requested(self) -> bool: ...

    @property
    def free_memory(self) -> bool: ...

    @property
    def deadline(self) -> float: ...

    def check(self) -> None: ...

    def listen(self, listener: Listener) -> None: ...

    async def wait_yield(self) -> None: ...

    async def wait_lost(self) -> None: ...

    async def release(self, handover: Handover | None = None, handover_ms: float = 0.0) -> None: ...


class Gpu(Protocol):
    """Where leases come from: the coordinator, or nowhere (NoCoordinator)."""

    async def acquire(
        self,
        holder: str,
        priority: Priority = "interactive",
        wait_s: float = 30.0,
        ttl_ms: int | None = None,
        vram_mb: int = 0,
    ) -> HeldLease: ...

    def lease(
        self,
        holder: str,
        priority: Priority = "interactive",
        wait_s: float = 30.0,
        ttl_ms: int | None = None,
        vram_mb: int = 0,
    ) -> AbstractAsyncContextManager[HeldLease]:
        """``acquire``, and release on exit: also on errors and cancellation."""
        ...

    async def aclose(self) -> None: ...


class NoLease:
    """Held when coordination is off: never asked to yield, never lost."""

    def __init__(self) -> None:
        self.fence = 0
        self.yield_seen_at: float | None = None
        self.lost_reason: str | None = None

    @property
    def lost(self) -> bool:
        return False

    @property
    def yield_requested(self) -> bool:
        return False

    @property
    def free_memory(self) -> bool:
        return False

    @property
    def deadline(self) -> float:
        return float("inf")

    def check(self) -> None:
        return None

    def listen(self, listener: Listener) -> None:
        return None

    async def wait_yield(self) -> None:
        await asyncio.Event().wait()  # nobody ever asks

    async def wait_lost(self) -> None:
        await asyncio.Event().wait()  # never lost

    async def release(self, handover: Handover | None = None, handover_ms: float = 0.0) -> None:
        return None


class NoCoordinator:
    """For comparisons only (benchmarks/stack.py): services that take no lease fight
    over the card (on the CPU, over the cores)."""

    async def acquire(
        self,
        holder: str,
        priority: Priority = "interactive",
        wait_s: float = 30.0,
        ttl_ms: int | None = None,
        vram_mb: int = 0,
    ) -> NoLease:
        return NoLease()

    @asynccontextmanager
    async def lease(
        self,
        holder: str,
        priority: Priority = "interactive",
        wait_s: float = 30.0,
        ttl_ms: int | None = None,
        vram_mb: int = 0,
    ) -> AsyncIterator[NoLease]:
        yield NoLease()

    async def aclose(self) -> None:
        return None
