"""Leases for a stack without coordination: never asked to yield, never lost. For
comparisons only (benchmarks/stack.py runs the services fighting over the card)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from shared.gpu.api import LeaseRequest, Listener
from shared.protocol.coordinator import Handover


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

    async def release(self, handover: Handover | None = None, handover_ms: float = 0.0) -> None:
        return None


class NoCoordinator:
    """For comparisons only (benchmarks/stack.py): services that take no lease fight
    over the card (on the CPU, over the cores)."""

    async def acquire(self, request: LeaseRequest) -> NoLease:
        return NoLease()

    @asynccontextmanager
    async def lease(self, request: LeaseRequest) -> AsyncIterator[NoLease]:
        yield NoLease()

    async def aclose(self) -> None:
        return None
