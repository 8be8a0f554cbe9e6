"""HTTP routes of the coordinator: thin; the work is in :mod:`leases`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi import Path as FastApiPath
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from services.coordinator.leases import (
    CallerGone,
    LeaseGone,
    LeaseManager,
    QueueFull,
    StoreUnavailable,
    WaitOver,
    Withdrawn,
)
from services.coordinator.settings import CoordinatorSettings
from shared.auth import SERVICE_SUBJECT_PREFIX
from shared.errors import APIError, BadRequest, Gone, NotAllowed, ServiceUnavailable, TooManyRequests
from shared.openapi import answers
from shared.protocol.coordinator import WAITER_ID, GpuStatus, Handover, HistoryEntry, LeaseGrant, LeaseRequest, Renewal
from shared.web import Caller, calling, signed_in, stream_slot, until_disconnected
from shared.web import principal as principal_of

MAX_LEASE_ID = 128


GONE: dict[int | str, dict[str, Any]] = {
    410: {"description": "The lease is gone: expired, revoked, released or unknown"}
}
"""What a holder's lease routes add to the statuses every route can give."""


DOMAIN_ERRORS: dict[type[Exception], Callable[[Any], APIError]] = {
    StoreUnavailable: lambda exc: ServiceUnavailable(
        f"the lease store is unavailable: {exc}", retry_after_s=1, code="store_unavailable"
    ),
    LeaseGone: lambda exc: Gone(f"this lease is gone ({exc.reason})", code=exc.reason),
    QueueFull: lambda exc: TooManyRequests("the GPU queue is full", retry_after_s=exc.retry_after_s),
    WaitOver: lambda exc: ServiceUnavailable(
        "the GPU was not granted within wait_ms", retry_after_s=exc.retry_after_s, code="wait_over"
    ),
    Withdrawn: lambda exc: Gone("this ask was withdrawn (DELETE /v1/waiters/{waiter_id})", code="withdrawn"),
}
"""How the lease manager's errors are answered (the app maps them once: shared.errors.map_errors)."""


def manager_of(request: Request) -> LeaseManager:
    found: LeaseManager = request.app.state.manager
    return found


def settings_of(request: Request) -> CoordinatorSettings:
    found: CoordinatorSettings = request.app.state.settings
    return found


async def service_name(request: Request, caller: Annotated[Caller, Depends(calling("gpu"))]) -> str:
    """The holder: only services hold the GPU; users with scope gpu may watch it."""
    principal = principal_of(request)
    if not principal.is_service:
        raise NotAllowed(
            "only a service token (sub service:<name>) may hold the GPU; scope gpu lets users watch it",
            code="not_a_service",
        )
    return principal.subject.removeprefix(SERVICE_SUBJECT_PREFIX)


Manager = Annotated[LeaseManager, Depends(manager_of)]
Settings = Annotated[CoordinatorSettings, Depends(settings_of)]
Service = Annotated[str, Depends(service_name)]

router = APIRouter(prefix="/v1", tags=["gpu"])
readers = [Depends(signed_in("gpu", "admin"))]


def _lease_id(lease_id: str) -> str:
    if len(lease_id) > MAX_LEASE_ID:
        raise Gone("unknown lease", code="unknown")
    return lease_id


@router.post(
    "/leases",
    status_code=201,
    response_model=LeaseGrant,
    responses={410: {"description": "The ask was withdrawn before this request of it arrived"}},
)
async def acquire(
    body: LeaseRequest, request: Request, name: Service, manager: Manager, settings: Settings
) -> Response:
    if body.holder != name:
        raise NotAllowed(f"this token holds the GPU as {name!r} only", param="holder", code="holder_mismatch")
    if body.priority == "interactive" and settings.priorities.get(name, settings.other_services) == "batch":
        raise NotAllowed(
            f"{name!r} may ask for batch priority only (COORDINATOR_PRIORITIES)",
            param="priority",
            code="priority_not_allowed",
        )
    ttl_ms = body.ttl_ms or settings.default_ttl_ms
    if ttl_ms > settings.max_ttl_ms:
        raise BadRequest(f"ttl_ms must be at most {settings.max_ttl_ms}", param="ttl_ms")
    try:
        grant = await manager.acquire(
            body.holder,
            body.priority,
            ttl_ms,
            body.wait_ms,
            body.waiter_id,
            lambda: until_disconnected(request),
            vram_mb=body.vram_mb,
        )
    except CallerGone:
        return Response(status_code=499)  # the caller left; nobody reads this
    # Dumped, not validated again: the grant was built from the script's own output.
    return JSONResponse(grant.model_dump(exclude={"requested_at"}), status_code=201)


@router.delete("/waiters/{waiter_id}", status_code=204)
async def withdraw(
    waiter_id: Annotated[str, FastApiPath(pattern=WAITER_ID, description="The ask's waiter_id.")],
    _: Service,
    manager: Manager,
) -> Response:
    """Take an ask back: it leaves the queue, a lease already granted to it is released,
    and the ask arriving later is refused. For a holder that stopped reading its
    ``POST /v1/leases`` (cancelled) and cannot know whether the grant was made."""
    await manager.withdraw(waiter_id)
    return Response(status_code=204)


@router.post("/leases/{lease_id}/renew", responses=GONE)
async def renew(lease_id: str, _: Service, manager: Manager) -> Renewal:
    return await manager.renew(_lease_id(lease_id))


@router.delete("/leases/{lease_id}", status_code=204, responses=GONE)
async def release(
    lease_id: str,
    _: Service,
    manager: Manager,
    handover: Annotated[
        Handover | None,
        Query(description="What the holder did with the device before releasing; kept in the history."),
    ] = None,
    handover_ms: Annotated[float, Query(ge=0, le=3_600_000, description="How long that took.")] = 0.0,
) -> Response:
    await manager.release(_lease_id(lease_id), handover or "", handover_ms if handover else 0.0)
    return Response(status_code=204)


@router.get("/gpu", dependencies=readers)
async def gpu(manager: Manager) -> GpuStatus:
    return GpuStatus(**await manager.status())


@router.get("/history", dependencies=readers)
async def history(manager: Manager, limit: int = Query(default=50, ge=1, le=10000)) -> list[HistoryEntry]:
    return [HistoryEntry(**item) for item in await manager.history(limit)]


@router.get(
    "/events",
    dependencies=readers,
    response_class=EventSourceResponse,
    responses=answers("text/event-stream", description="The lease's events as they happen (subscribed first)"),
)
async def events(request: Request, manager: Manager) -> EventSourceResponse:
    slot = await stream_slot(request)  # a user watching counts against their streams

    async def stream() -> AsyncIterator[dict[str, Any]]:
        try:
            async with manager.bus.subscribe() as queue:
                # Tells the client its subscription is live: nothing before this is missed.
                yield {"event": "subscribed", "data": json.dumps({"epoch": manager.epoch})}
                while (event := await queue.get()) is not None:
                    yield {"event": event["type"], "data": json.dumps(event)}
        finally:
            # The client left: this scope is cancelled, so give the slot back shielded.
            # (A stream never started keeps its slot until it expires.)
            with anyio.CancelScope(shield=True):
                await slot.close()

    return EventSourceResponse(stream(), ping=15)
