"""The GPU lease on Redis: one atomic Lua call per transition, wake-ups in process.

Redis holds the truth (lease, queue, fence counter, epoch, history) and its clock
times everything. This process adds what makes hand-overs fast: a waiter blocked in
``acquire`` is woken by the very script call that freed the card, and one timer
task runs the script again at the next deadline (expiry, revocation, heartbeat,
end of quarantine). Nothing here imports FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.coordinator.settings import CoordinatorSettings
from shared.aio import Interrupted, unless
from shared.audit import Audit
from shared.events import EventBus
from shared.metrics import Metrics
from shared.protocol.coordinator import LeaseGrant, Priority, Renewal

log = logging.getLogger(__name__)

_SCRIPT = files("services.coordinator").joinpath("lease.lua").read_text(encoding="utf-8")
_PRIVATE_GRANT_FIELDS = ("lease_id", "ttl_ms", "requested_at", "granted_at", "expires_at")
_KEYS = ("lease", "fence", "epoch", "q:interactive", "q:batch", "waiters", "history", "seq", "meta")


class StoreUnavailable(Exception):
    """Redis cannot be reached (or answered garbage)."""


class QueueFull(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__("the GPU queue is full")
        self.retry_after_s = retry_after_s


class WaitOver(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__("the GPU was not granted within the wait")
        self.retry_after_s = retry_after_s


WITHDRAWN_KEPT_MS = 600_000
"""How long a withdrawn waiter's id is refused: longer than any request can take to
reach the store (its wait is at most 5 minutes)."""


class CallerGone(Exception):
    """The caller disconnected while waiting; it left the queue."""


class Withdrawn(Exception):
    """The ask was taken back (``withdraw``) before this request of it arrived."""


class LeaseGone(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(f"lease is gone ({reason})")
        self.reason = reason


class Grant(LeaseGrant):
    """A grant as the coordinator keeps it: the wire's, and when it was asked for (for the
    history; not sent)."""

    requested_at: float


def _items(value: Any) -> list[Any]:
    """A list from the script (cjson encodes an empty list as ``{}``)."""
    return value if isinstance(value, list) else []


def _seconds(ms: float) -> float:
    return round(ms / 1000.0, 3)


def _grant_from(data: dict[str, Any]) -> Grant:
    # From the script's own output: no validation on the hand-over's critical path.
    return Grant.model_construct(
        lease_id=data["lease_id"],
        fence=int(data["fence"]),
        holder=data["holder"],
        priority=data["priority"],
        ttl_ms=int(data["ttl_ms"]),
        requested_at=_seconds(data["requested_at"]),
        granted_at=_seconds(data["granted_at"]),
        expires_at=_seconds(data["expires_at"]),
        waited_ms=int(data["waited_ms"]),
        yield_requested=bool(data.get("yield_requested", False)),
        vram_mb=int(data.get("vram_mb") or 0),
        free_memory=bool(data.get("free_memory", False)),
    )


class CoordinatorMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.grants = metrics.counter("gpu_grants_total", "Leases granted.", ("priority",))
        self.ends = metrics.counter("gpu_lease_ends_total", "Leases ended, by how.", ("end",))
        self.yields = metrics.counter("gpu_yield_requests_total", "Holders asked to yield.")
        self.revocations = metrics.counter("gpu_revocations_total", "Holders revoked after the grace period.")
        self.left = metrics.counter("gpu_waiters_left_total", "Waiters that left the queue.", ("reason",))
        self.wait = metrics.histogram("gpu_wait_seconds", "Time from request to grant.", ("priority",))
        self.queue = metrics.gauge("gpu_queue_depth", "Waiters in the queue.")
        self.fence = metrics.gauge("gpu_fence", "Fence of the last grant.")
        self.quarantines = metrics.counter("gpu_quarantines_total", "Times Redis was found without lease data.")
        self.store_errors = metrics.counter("gpu_store_errors_total", "Failed calls to Redis.")
        self.handovers = metrics.histogram(
            "gpu_handover_seconds",
            "What a releasing holder did with the device, and how long it took.",
            ("path",),
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )


class _Waiter:
    """The callers in this process waiting under one waiter id."""

    def __init__(self) -> None:
        self.future: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        self.callers = 0


class LeaseManager:
    def __init__(
        self,
        redis: Redis,
        settings: CoordinatorSettings,
        bus: EventBus,
        metrics: CoordinatorMetrics | None = None,
        card_mb: int = 0,
        audit: Audit | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        """``clock``: the time in milliseconds, for a test that steps through the policy's
        grace periods; by default every timestamp and deadline is Redis' own clock."""
        self._redis = redis
        self._clock = clock
        self._audit = audit
        self._audits: set[asyncio.Task[None]] = set()
        self._settings = settings
        self.card_mb = card_mb
        """The card's memory in MB; 0 when unknown (a CPU): nobody ever must free memory."""
        self.bus = bus
        self._metrics = metrics
        self._script = redis.register_script(_SCRIPT)
        self._keys = [settings.key_prefix + key for key in _KEYS]
        self._epoch: str | None = None
        self._min_fence = 0
        self._init_lock = asyncio.Lock()
        self._waiters: dict[str, _Waiter] = {}
        self._deadline: float | None = None  # loop time of the next script run
        self._wake = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None
        self._stopping = False
        self._next_heartbeat = 0.0

    # -- life cycle ---------------------------------------------------------

    async def start(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self._init()  # Redis may come later; the ticker keeps trying.
        self._ticker = asyncio.create_task(self._tick_loop(), name="lease-ticker")

    async def stop(self) -> None:
        """Stop timers. Waiters stay queued in Redis: callers retry with their waiter id."""
        self._stopping = True
        self._wake.set()
        if self._ticker is not None:
            # Cancelling alone is not enough on Python 3.11: asyncio.wait_for swallows a
            # cancellation that arrives as its wait ends (the timer firing, or the wake
            # above), and the loop went on; a test's teardown waited on it for 600 s.
            # The loop also stops at its next turn once ``_stopping`` is set.
            self._ticker.cancel()
            # gather: the timer's CancelledError is a result here, while one that cancels
            # the caller of stop still reaches it (suppressing it swallowed both).
            await asyncio.gather(self._ticker, return_exceptions=True)

    @property
    def epoch(self) -> str | None:
        return self._epoch

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (RedisError, OSError):
            return False

    # -- the script ---------------------------------------------------------

    async def _eval(self, op: str, *args: str | int) -> dict[str, Any]:
        s = self._settings
        argv: list[str | int] = [
            op,
            self._epoch or "",
            s.max_batch_wait_ms,
            s.yield_grace_ms,
            s.history_size,
            s.max_queue,
            self._min_fence,
            s.key_prefix,
            "" if self._clock is None else self._clock(),
            *args,
        ]
        try:
            raw = await self._script(keys=self._keys, args=argv)
        except (RedisError, OSError) as exc:
            if self._metrics:
                self._metrics.store_errors.inc()
            # The log has the cause; the message, which clients see, names no address.
            log.warning("lease store unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
            raise StoreUnavailable(f"Redis: {type(exc).__name__}") from None
        result: dict[str, Any] = json.loads(raw)
        return result

    async def _init(self) -> None:
        async with self._init_lock:
            known = self._epoch or ""
            result = await self._eval(
                "init",
                secrets.token_hex(8),
                known,
                self._settings.max_ttl_ms,
                self._settings.waiter_heartbeat_ms,
                self.card_mb,
                self._settings.batch_slice_ms,
                self._settings.turn_ms,
                self._settings.min_hold_ms,
            )
            self._epoch = result["epoch"]
            if result.get("lost"):
                if self._metrics:
                    self._metrics.quarantines.inc()
                log.warning(
                    "Redis lost the lease data; granting nothing until the quarantine ends",
                    extra={"quarantine_until": _seconds(result["quarantine_until"]), "min_fence": self._min_fence},
                )
            elif known != self._epoch:
                log.info("lease store ready", extra={"epoch": self._epoch})
            self._dispatch(result)

    async def _call(self, op: str, *args: str | int) -> dict[str, Any]:
        if self._epoch is None:
            await self._init()
        for _ in range(3):
            seen = self._epoch
            result = await self._eval(op, *args)
            if result.get("error") == "epoch":
                if self._epoch == seen:  # nobody here re-initialised in the meantime
                    log.warning("the lease store lost or changed its epoch", extra={"epoch": seen})
                    await self._init()
                continue
            if "error" in result:
                raise StoreUnavailable(f"lease script: {result['error']}")
            self._dispatch(result)
            return result
        raise StoreUnavailable("the lease store keeps changing its epoch")

    # -- results: events, wake-ups, timers -----------------------------------

    def _dispatch(self, result: dict[str, Any]) -> None:
        events = _items(result.get("events"))
        # First wake the caller a grant was made for: that is the hand-over's critical path.
        granted: dict[str, Grant] = {}
        for event in events:
            if event["type"] == "granted":
                # The lease id and timings go to the waiting caller only, never to the bus.
                waiter = event.pop("waiter")
                details = {key: event.pop(key) for key in _PRIVATE_GRANT_FIELDS}
                event["fence"] = int(event["fence"])
                granted[waiter] = _grant_from({**event, **details})
            elif event["type"] == "yield_requested":
                for waiter, grant in granted.items():
                    if grant.fence == event["fence"]:
                        granted[waiter] = grant.model_copy(update={"yield_requested": True})
        for waiter_id, grant in granted.items():
            pending = self._waiters.get(waiter_id)
            if pending is not None and not pending.future.done():
                pending.future.set_result(grant)
        for event in events:
            if event.get("fence") is not None:
                self._min_fence = max(self._min_fence, int(event["fence"]))
            self._observe(event)
            event["at"] = _seconds(event["at"])
            self.bus.publish(event)
        if "fence" in result and isinstance(result["fence"], int | float):
            self._min_fence = max(self._min_fence, int(result["fence"]))
        if self._metrics and "queue_len" in result:
            self._metrics.queue.set(result["queue_len"])
        next_at = result.get("next_at") or 0
        if next_at:
            at = asyncio.get_running_loop().time() + max(0.0, (next_at - result["now"]) / 1000.0)
            if self._deadline is None or at < self._deadline:
                self._deadline = at
                self._wake.set()

    def _observe(self, event: dict[str, Any]) -> None:
        m = self._metrics
        kind = event["type"]
        if kind == "granted":
            log.info(
                "granted", extra={"fence": event["fence"], "holder": event["holder"], "waited_ms": event["waited_ms"]}
            )
            if m:
                m.grants.labels(event["priority"]).inc()
                m.wait.labels(event["priority"]).observe(event["waited_ms"] / 1000.0)
                m.fence.set(event["fence"])
        elif kind in ("released", "expired"):
            log.info(kind, extra={"fence": event["fence"], "holder": event["holder"], "end": event.get("end")})
            if m:
                m.ends.labels(event.get("end", kind)).inc()
        elif kind == "yield_requested":
            log.info(
                "yield requested",
                extra={"fence": event["fence"], "holder": event["holder"], "free_memory": event.get("free_memory")},
            )
            if m:
                m.yields.inc()
        elif kind == "revoked":
            log.warning("revoked after the grace period", extra={"fence": event["fence"], "holder": event["holder"]})
            if m:
                m.revocations.inc()
            if self._audit is not None:
                task = asyncio.get_running_loop().create_task(
                    self._audit.write("lease_revoked", holder=event["holder"], fence=event["fence"])
                )
                self._audits.add(task)
                task.add_done_callback(self._audits.discard)
        elif kind == "left_queue" and m:
            m.left.labels(event.get("reason", "")).inc()

    async def _tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        heartbeat_every = self._settings.waiter_heartbeat_ms / 3000.0
        while not self._stopping:
            now = loop.time()
            wake_at = self._deadline if self._deadline is not None else now + 5.0
            if self._waiters:
                wake_at = min(wake_at, self._next_heartbeat)
            if wake_at > now:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wake_at - now)
                continue
            self._deadline = None
            try:
                if self._waiters and loop.time() >= self._next_heartbeat:
                    self._next_heartbeat = loop.time() + heartbeat_every
                    await self._call("heartbeat", self._settings.waiter_heartbeat_ms, *self._waiters)
                else:
                    await self._call("advance")
            except StoreUnavailable as exc:
                log.warning("lease store unavailable; retrying", extra={"error": str(exc)})
                self._deadline = loop.time() + 0.5
            except Exception:
                log.exception("lease ticker failed; retrying")
                self._deadline = loop.time() + 0.5

    # -- operations ----------------------------------------------------------

    async def tick(self) -> None:
        """Bring the lease up to date now (expiry, grants, yield requests, revocation), as
        the timer does at each deadline; for a test whose clock has just moved."""
        await self._call("advance")

    async def acquire(
        self,
        holder: str,
        priority: Priority,
        ttl_ms: int,
        wait_ms: int,
        waiter_id: str | None = None,
        disconnected: Callable[[], Awaitable[object]] | None = None,
        vram_mb: int = 0,
    ) -> Grant:
        """Queue, and wait up to ``wait_ms`` for the grant.

        Raises QueueFull, WaitOver, CallerGone (after leaving the queue) or
        StoreUnavailable.
        """
        waiter_id = waiter_id or secrets.token_hex(12)
        waiter = self._waiters.get(waiter_id)
        if waiter is None:
            waiter = self._waiters[waiter_id] = _Waiter()
            self._next_heartbeat = asyncio.get_running_loop().time() + self._settings.waiter_heartbeat_ms / 3000.0
        waiter.callers += 1
        try:
            result = await self._call(
                "enqueue",
                waiter_id,
                holder,
                priority,
                ttl_ms,
                self._settings.waiter_heartbeat_ms,
                secrets.token_hex(16),
                vram_mb,
            )
            if result.get("full"):
                raise QueueFull(retry_after_s=1.0)
            if result.get("withdrawn"):
                raise Withdrawn()
            if "grant" in result:
                return _grant_from(result["grant"])
            waited = "no"
            if wait_ms > 0 and not waiter.future.done():
                waited = await self._wait(waiter.future, wait_ms / 1000.0, disconnected)
            if waited == "disconnected":
                if waiter.callers == 1:
                    await self._call("leave", waiter_id, "cancel")
                raise CallerGone()
            if waiter.future.done():
                return waiter.future.result()
            result = await self._call("leave", waiter_id, "take")
            if "grant" in result:
                return _grant_from(result["grant"])
            raise WaitOver(retry_after_s=1.0)
        except asyncio.CancelledError:
            if not self._stopping and waiter.callers == 1:
                with contextlib.suppress(StoreUnavailable):
                    await asyncio.shield(self._call("leave", waiter_id, "cancel"))
            raise
        finally:
            waiter.callers -= 1
            if waiter.callers == 0:
                self._waiters.pop(waiter_id, None)

    @staticmethod
    async def _wait(
        granted: asyncio.Future[Grant], timeout_s: float, disconnected: Callable[[], Awaitable[object]] | None
    ) -> Literal["granted", "timeout", "disconnected"]:
        stops = [disconnected()] if disconnected is not None else []
        try:
            # Shielded: the grant is shared by every caller of one waiter.
            await unless(asyncio.shield(granted), *stops, timeout_s=timeout_s)
        except Interrupted:
            return "disconnected"
        except TimeoutError:
            return "timeout"
        return "granted"

    async def renew(self, lease_id: str) -> Renewal:
        result = await self._call("renew", lease_id)
        if "gone" in result:
            raise LeaseGone(result["gone"])
        return Renewal.model_construct(
            fence=int(result["fence"]),
            expires_at=_seconds(result["expires_at"]),
            yield_requested=bool(result["yield_requested"]),
            free_memory=bool(result.get("free_memory", False)),
        )

    async def withdraw(self, waiter_id: str) -> None:
        """A caller takes back its ask, not knowing whether it was granted (it stopped
        reading the answer): the waiter leaves the queue, a lease granted to it is
        released, and a request of that waiter arriving later is refused."""
        await self._call("leave", waiter_id, "withdraw", WITHDRAWN_KEPT_MS)

    async def release(self, lease_id: str, handover: str = "", handover_ms: float = 0.0) -> None:
        """``handover``: what the holder did with the device (a ``Handover``), kept in the history."""
        result = await self._call("release", lease_id, handover, f"{handover_ms:.3f}")
        if "gone" in result:
            raise LeaseGone(result["gone"])
        if handover and self._metrics:
            self._metrics.handovers.labels(handover).observe(handover_ms / 1000.0)
        # Let the caller this release just granted the card answer first: the next
        # holder is waiting; the one releasing only waits for its 204.
        await asyncio.sleep(0)

    async def status(self) -> dict[str, Any]:
        result = await self._call("status")
        lease = result.get("lease")
        view: dict[str, Any] = {
            "holder": None,
            "fence": None,
            "priority": None,
            "granted_at": None,
            "expires_at": None,
            "yield_requested": False,
        }
        if lease:
            view.update(
                holder=lease["holder"],
                fence=int(lease["fence"]),
                priority=lease["priority"],
                granted_at=_seconds(lease["granted_at"]),
                expires_at=_seconds(lease["expires_at"]),
                yield_requested=bool(lease["yield_requested"]),
                revoked=bool(lease["revoked"]),
                vram_mb=int(lease.get("vram_mb") or 0),
                free_memory=bool(lease.get("free_memory", False)),
            )
        view["card_mb"] = self.card_mb
        view["queue"] = _items(result.get("queue"))
        quarantine = result.get("quarantine_until") or 0
        view["quarantine_until"] = _seconds(quarantine) if quarantine > result["now"] else None
        return view

    async def history(self, limit: int) -> list[dict[str, Any]]:
        result = await self._call("history", limit)
        items: list[dict[str, Any]] = _items(result.get("history"))
        for item in items:
            item["fence"] = int(item["fence"])
            for key in ("requested_at", "granted_at", "ended_at"):
                if isinstance(item.get(key), int | float):
                    item[key] = _seconds(item[key])
        return items
