from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Priority = Literal["interactive", "batch"]


class LeaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    holder: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$", description="Who asks (a service name).")
    priority: Priority
    ttl_ms: int | None = Field(default=None, ge=1000, le=120000, description="Default COORDINATOR_DEFAULT_TTL_MS.")
    wait_ms: int = Field(default=0, ge=0, le=300000, description="How long to wait in the queue; 0 tries once.")
    waiter_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{8,64}$",
        description="Idempotency key: asking again with the same id keeps the place in the queue "
        "(and returns the grant if it was made while the connection was broken).",
    )


class LeaseGrant(BaseModel):
    lease_id: str
    fence: int
    holder: str
    priority: Priority
    ttl_ms: int
    granted_at: float
    expires_at: float
    waited_ms: int
    yield_requested: bool


class Renewal(BaseModel):
    fence: int
    expires_at: float
    yield_requested: bool


class QueueEntry(BaseModel):
    holder: str
    priority: Priority
    waiting_ms: int


class GpuStatus(BaseModel):
    holder: str | None
    fence: int | None
    priority: Priority | None
    granted_at: float | None
    expires_at: float | None
    yield_requested: bool
    revoked: bool = False
    queue: list[QueueEntry]
    quarantine_until: float | None


class HistoryEntry(BaseModel):
    fence: int
    holder: str
    priority: Priority
    requested_at: float
    granted_at: float
    ended_at: float | None
    end: Literal["released", "expired", "revoked"] | None
