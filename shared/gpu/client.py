"""The coordinator's client, one per service process: asks for leases, renews and
releases them (each ``Lease`` through this client as its ``Line``), and watches the
coordinator's event stream on a thread of its own so that a yield request reaches the
holder within milliseconds, whatever its event loop is doing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx

from shared.gpu.api import GpuUnavailable, LeaseRequest
from shared.gpu.lease import Lease, _error_code
from shared.protocol.coordinator import LeaseGrant, Renewal
from shared.sse_reader import read_events

log = logging.getLogger(__name__)


def _retry_after(response: httpx.Response) -> float:
    try:
        return float(response.headers.get("retry-after", "1"))
    except ValueError:
        return 1.0


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
        self._withdrawals: set[asyncio.Task[None]] = set()
        self._watch = watch_events
        self._events_thread: threading.Thread | None = None
        self._events_http: httpx.Client | None = None
        self._events_response: httpx.Response | None = None
        self._subscribed = threading.Event()
        self._closed = threading.Event()
        # The blocking client the renewal threads share (httpx clients are thread-safe).
        # Made once, here: building one loads the TLS trust store, about 25 ms of CPU
        # that each new lease would otherwise steal from the first tokens it was taken for.
        self._sync_http = httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._token()}"}

    # -- the leases' line (shared.gpu.lease.Line) ----------------------------------

    def renew(self, lease_id: str) -> httpx.Response:
        """The one renewal request, blocking (renewal threads). Raises httpx.TransportError,
        or RuntimeError once the client is closed. Sent once more on a fresh connection when
        the kept one turns out closed ("Server disconnected without sending a response":
        the coordinator closes idle connections, and a renewal can meet one as it closes;
        in the soak that failed an upload with a 500). A renewal only extends the same
        lease, so sending it twice is harmless; the caller's send time, taken before,
        stays the safe base of the deadline."""
        try:
            return self._sync_http.post(f"/v1/leases/{lease_id}/renew", headers=self.auth_headers())
        except httpx.RemoteProtocolError:
            return self._sync_http.post(f"/v1/leases/{lease_id}/renew", headers=self.auth_headers())

    async def give_back(self, lease_id: str, params: dict[str, str] | None) -> httpx.Response:
        return await self.http.delete(f"/v1/leases/{lease_id}", headers=self.auth_headers(), params=params)

    def forget(self, fence: int) -> None:
        with self._leases_lock:
            self._leases.pop(fence, None)

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
                    self._events_response = response
                    if self._closed.is_set():  # closed while this connection was opened
                        return
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
                self._events_response = None
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

    async def acquire(self, request: LeaseRequest) -> Lease:
        """Wait for the GPU; raises GpuUnavailable if it is not granted in ``request.wait_s``."""
        if self._watch:
            await self.wait_subscribed()
        ttl_ms = request.ttl_ms or self.default_ttl_ms
        waiter_id = secrets.token_hex(12)
        give_up = time.monotonic() + request.wait_s
        while True:
            remaining = max(0.0, give_up - time.monotonic())
            body = {
                "holder": request.holder,
                "priority": request.priority,
                "ttl_ms": ttl_ms,
                "wait_ms": int(remaining * 1000),
                "waiter_id": waiter_id,
                "vram_mb": request.vram_mb,
            }
            sent = time.monotonic()
            try:
                response = await self.http.post(
                    "/v1/leases", json=body, headers=self.auth_headers(), timeout=remaining + self._timeout_s
                )
            except asyncio.CancelledError:
                # The coordinator may have granted the lease as we stopped reading: ask it
                # to take the ask back, or the card stays held, unused, until its TTL.
                self._withdraw_soon(waiter_id)
                raise
            except httpx.TransportError as exc:
                # The coordinator may be restarting: ask again with the same waiter id.
                if time.monotonic() >= give_up:
                    raise GpuUnavailable(
                        f"coordinator unreachable: {type(exc).__name__}", reason="unreachable"
                    ) from None
                await asyncio.sleep(0.2)
                continue
            if response.status_code == 201:
                grant = LeaseGrant.model_validate_json(response.content)
                try:
                    return await self._adopt(grant, sent)
                except asyncio.CancelledError:
                    self.forget(grant.fence)
                    self._withdraw_soon(waiter_id)
                    raise
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

    def _withdraw_soon(self, waiter_id: str) -> None:
        """Take an ask back in the background (its caller was cancelled): the coordinator
        drops it from the queue, or releases what it granted to it."""
        task = asyncio.get_running_loop().create_task(self._withdraw(waiter_id), name="gpu-withdraw")
        self._withdrawals.add(task)
        task.add_done_callback(self._withdrawals.discard)

    async def _withdraw(self, waiter_id: str) -> None:
        for attempt in range(3):
            try:
                response = await self.http.delete(f"/v1/waiters/{waiter_id}", headers=self.auth_headers())
            except httpx.TransportError as exc:
                log.info("could not withdraw a GPU ask yet", extra={"error": type(exc).__name__})
                await asyncio.sleep(0.2 * (attempt + 1))
                continue
            if response.status_code != 204:
                log.warning("the coordinator refused to withdraw a GPU ask", extra={"status": response.status_code})
            return

    async def _adopt(self, grant: LeaseGrant, sent: float) -> Lease:
        lease = Lease(self, grant, sent, asyncio.get_running_loop())
        with self._leases_lock:
            self._leases[lease.fence] = lease
        ttl_s = lease.ttl_ms / 1000.0
        if time.monotonic() - sent > (ttl_s - lease.margin_s) / 2:
            # We waited long: our only safe base (the send time) is old. Renew once now.
            sent = time.monotonic()
            try:
                response = await asyncio.to_thread(self.renew, lease.lease_id)
            except (httpx.TransportError, RuntimeError):
                await lease.release()
                raise GpuUnavailable(
                    "the coordinator did not answer right after the grant", reason="unreachable"
                ) from None
            if response.status_code != 200:
                await lease.release()
                raise GpuUnavailable("the lease was lost right after it was granted", reason="lost")
            lease.confirm(sent, Renewal.model_validate_json(response.content))
        lease.start()
        return lease

    @asynccontextmanager
    async def lease(self, request: LeaseRequest) -> AsyncIterator[Lease]:
        """Acquire, and release on exit: also on errors and cancellation."""
        lease = await self.acquire(request)
        try:
            yield lease
        finally:
            await asyncio.shield(lease.release())

    def _hang_up_events(self) -> None:
        """End the event stream now. Closing its client does not wake the thread blocked
        reading it, so the connection stayed open until the coordinator's next ping or
        shutdown: a coordinator shutting down waited for it (15 s in the tests)."""
        response = self._events_response
        stream = response.extensions.get("network_stream") if response is not None else None
        sock = stream.get_extra_info("socket") if stream is not None else None
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    async def aclose(self) -> None:
        if self._withdrawals:  # a moment, so that no ask outlives the client
            await asyncio.wait(set(self._withdrawals), timeout=self._timeout_s)
        self._closed.set()
        self._hang_up_events()
        with self._leases_lock:
            leases = list(self._leases.values())
        for lease in leases:
            await lease.release()
        for http in (self._events_http, self._sync_http):
            if http is not None:
                with contextlib.suppress(Exception):
                    http.close()
        await self.http.aclose()
