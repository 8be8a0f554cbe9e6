"""The coordinator's API: what a lease request, a grant, a renewal, the card's state and
its history look like on the wire. The coordinator answers with these models and
shared/gpu/ reads its answers with them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Priority = Literal["interactive", "batch"]
Handover = Literal["pause", "checkpoint", "restart", "unload", "offload", "keep"]
"""What a holder did with the device when it released: paused its work with the memory
left in place, checkpointed the memory to the host (CUDA checkpoint API), ended its
worker (to restart from a checkpoint), moved its weights off (unload, offload), or kept
everything (nothing needed the memory)."""


WAITER_ID = r"^[A-Za-z0-9_-]{8,64}$"
"""A waiter id: the client's own, random (shared.gpu's are 24 hex digits)."""


class LeaseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    holder: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$", description="Who asks (a service name).")
    priority: Priority
    ttl_ms: int | None = Field(default=None, ge=1000, le=120000, description="Default COORDINATOR_DEFAULT_TTL_MS.")
    wait_ms: int = Field(default=0, ge=0, le=300000, description="How long to wait in the queue; 0 tries once.")
    vram_mb: int = Field(
        default=0,
        ge=0,
        le=1_048_576,
        description="Device memory the holder needs, in MB (0: none declared). With the card's size it "
        "decides whether holders must free their memory when they hand the card over.",
    )
    waiter_id: str | None = Field(
        default=None,
        pattern=WAITER_ID,
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
    vram_mb: int = 0
    free_memory: bool = Field(
        default=False, description="Free the device memory before releasing (the card cannot hold both)."
    )


class Renewal(BaseModel):
    """The answer to a renewal: the lease goes on, and whether someone waits for it."""

    fence: int
    expires_at: float
    yield_requested: bool
    free_memory: bool = False


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
    vram_mb: int = 0
    free_memory: bool = False
    card_mb: int = Field(default=0, description="The card's memory in MB; 0 when unknown (no card: never free).")
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
    vram_mb: int = 0
    free_memory: bool = False
    handover: Handover | None = Field(
        default=None, description="What the holder did with the device when it released, as it reported."
    )
    handover_ms: float | None = None
