"""The GPU lease as services see it: what they ask for (``LeaseRequest``), what they hold
(``HeldLease``), where leases come from (``Gpu``), and how it fails. The coordinator's
client (``client.py``, with the held lease in ``lease.py``) and the stand-in for a stack
without coordination (``standin.py``) both speak it; the wire models are in
shared/protocol/coordinator.py, shared with the coordinator."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Literal, Protocol

from shared.protocol.coordinator import Handover, Priority

LeaseEvent = Literal["yield", "lost", "renewed"]
Listener = Callable[[LeaseEvent], None]


@dataclass(frozen=True)
class LeaseRequest:
    """What a holder asks the coordinator for."""

    holder: str
    """The service's name: its token's subject must be ``service:<holder>``."""
    priority: Priority = "interactive"
    wait_s: float = 30.0
    """How long to wait for the grant before GpuUnavailable."""
    ttl_ms: int | None = None
    """The lease's time to live between renewals (None: the client's default)."""
    vram_mb: int = 0
    """The device memory this holder needs (0: none declared)."""


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

    async def release(self, handover: Handover | None = None, handover_ms: float = 0.0) -> None: ...


class Gpu(Protocol):
    """Where leases come from: the coordinator (GpuClient), or nowhere (NoCoordinator)."""

    async def acquire(self, request: LeaseRequest) -> HeldLease: ...

    def lease(self, request: LeaseRequest) -> AbstractAsyncContextManager[HeldLease]:
        """``acquire``, and release on exit: also on errors and cancellation."""
        ...

    async def aclose(self) -> None: ...
