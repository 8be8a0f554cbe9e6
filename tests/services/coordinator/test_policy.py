"""Who goes next, and when a holder is asked (then forced) to give the card back: through
the API, and on the lease manager with a test clock where the rule is about time (the
grace periods are stepped through, never waited out)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from services.coordinator.leases import LeaseGone
from shared.gpu import GpuClient, LeaseLost, LeaseRequest
from tests.services.coordinator.conftest import Api, Events, MakeLeases, ServeCoordinator, Served, next_event

ApiFactory = Callable[[Served], Api]


async def enqueue(api: Api, holder: str, priority: str, position: int) -> asyncio.Task[httpx.Response]:
    """Start a waiting acquire and return once it is queued at ``position`` (1-based)."""
    task = asyncio.create_task(api.acquire(holder, priority, wait_ms=60000))
    await api.wait_queue(position)
    return task


async def test_interactive_before_batch_and_fifo_within_each(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory
) -> None:
    api = api_factory(serve_coordinator())
    held = (await api.acquire("first")).json()
    arrivals = [("b1", "batch"), ("i1", "interactive"), ("b2", "batch"), ("i2", "interactive"), ("b3", "batch")]
    tasks = {name: await enqueue(api, name, priority, n) for n, (name, priority) in enumerate(arrivals, start=1)}
    assert [w["holder"] for w in (await api.gpu())["queue"]] == ["i1", "i2", "b1", "b2", "b3"]

    order = []
    lease_id = held["lease_id"]
    pending = dict(tasks)
    while pending:
        assert (await api.release(lease_id)).status_code == 204
        done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1  # one release, one grant
        name = next(name for name, task in pending.items() if task in done)
        order.append(name)
        lease_id = pending.pop(name).result().json()["lease_id"]
    await api.release(lease_id)
    assert order == ["i1", "i2", "b1", "b2", "b3"]
    history = await api.history(limit=6)
    fences = [h["fence"] for h in reversed(history)]
    assert fences == sorted(fences) and len(set(fences)) == 6


async def test_a_starving_batch_waiter_goes_first(leases: MakeLeases) -> None:
    gpu = await leases(max_batch_wait_ms=400, yield_grace_ms=60000)
    held = await gpu.acquire("llm")
    batch = await gpu.enqueue("transcription", "batch", 1)

    # Until the batch waiter has waited long enough, an interactive newcomer goes first...
    await gpu.advance(399)
    assert (await gpu.manager.status())["queue"][0]["waiting_ms"] < 400
    interactive = await gpu.enqueue("chat", "interactive", 2)
    assert await gpu.queue() == ["chat", "transcription"]

    # ...once it has waited COORDINATOR_MAX_BATCH_WAIT_MS, it is next.
    await gpu.advance(1)
    assert await gpu.queue() == ["transcription", "chat"]
    await gpu.manager.release(held.lease_id)
    granted = await batch
    assert granted.holder == "transcription"
    assert granted.waited_ms >= 400
    await gpu.manager.release(granted.lease_id)
    assert (await interactive).holder == "chat"


async def test_yield_is_requested_at_once_and_cleared_when_nobody_waits(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory, events_for: Callable[[Served], Events]
) -> None:
    coordinator = serve_coordinator()
    api = api_factory(coordinator)
    held = (await api.acquire("transcription", "batch", ttl_ms=5000)).json()
    assert (await api.renew(held["lease_id"])).json()["yield_requested"] is False  # sticky while idle

    async with events_for(coordinator) as events:
        waiter = asyncio.create_task(api.acquire("llm", "interactive", wait_ms=500))
        event = await events.wait_for(lambda e: e["type"] == "yield_requested")
    assert (event["fence"], event["holder"]) == (held["fence"], "transcription")
    assert (await api.renew(held["lease_id"])).json()["yield_requested"] is True
    assert (await api.gpu())["yield_requested"] is True

    assert (await waiter).status_code == 503  # it gave up; the holder may keep the card
    renewed = await api.renew(held["lease_id"])
    assert renewed.status_code == 200
    assert renewed.json()["yield_requested"] is False


async def test_a_holder_that_ignores_the_yield_is_revoked_and_the_waiter_waits_for_its_ttl(
    leases: MakeLeases,
) -> None:
    gpu = await leases(yield_grace_ms=300)
    stubborn = await gpu.acquire("transcription", "batch", ttl_ms=2000)
    async with gpu.manager.bus.subscribe() as events:
        waiter = await gpu.enqueue("llm", "interactive", 1)
        await next_event(events, "yield_requested")
        # It keeps renewing, but does not release.
        last_expiry = stubborn.expires_at
        with pytest.raises(LeaseGone) as gone:
            for _ in range(100):  # 5 s of its clock, far past the grace
                await gpu.advance(50)
                last_expiry = (await gpu.manager.renew(stubborn.lease_id)).expires_at
        revoked = await next_event(events, "revoked")
    assert gone.value.reason == "revoked"
    assert revoked["fence"] == stubborn.fence
    await gpu.until(last_expiry - 0.001)
    assert await gpu.holder() == "transcription"  # revoked, yet its TTL still runs
    await gpu.until(last_expiry)
    grant = await waiter
    assert grant.holder == "llm"
    assert grant.granted_at >= last_expiry - 0.002  # never before the revoked lease's TTL ran out
    history = await gpu.manager.history(2)
    assert history[1]["end"] == "revoked"
    assert history[1]["ended_at"] >= last_expiry - 0.002


async def test_a_holder_that_ignores_a_batch_waiter_is_revoked_too(leases: MakeLeases) -> None:
    """Any waiter starts the grace period once the holder has had its turn: an
    interactive holder cannot keep a job queued by ignoring its yield requests."""
    gpu = await leases(yield_grace_ms=200, max_batch_wait_ms=60000, turn_ms=300)
    held = await gpu.acquire("llm", "interactive", ttl_ms=2000)
    waiter = await gpu.enqueue("transcription", "batch", 1)
    asked = []
    expiry = held.expires_at
    with pytest.raises(LeaseGone) as gone:
        for _ in range(100):  # 5 s of its clock, far past its turn and the grace
            await gpu.advance(50)
            renewed = await gpu.manager.renew(held.lease_id)
            asked.append(renewed.yield_requested)
            expiry = renewed.expires_at
    assert asked == sorted(asked), "once asked, asked until it gives the card back"
    assert True in asked and False in asked
    assert gone.value.reason == "revoked"
    await gpu.until(expiry)
    grant = await waiter
    assert grant.holder == "transcription"
    revoked = (await gpu.manager.history(2))[1]
    assert revoked["end"] == "revoked"
    assert revoked["ended_at"] - revoked["granted_at"] >= 0.3 + 0.2  # its turn, then the grace


@pytest.mark.parametrize(
    ("holder", "waiter", "at_once"),
    [
        (("transcription", "interactive"), ("llm", "interactive"), True),  # a chat during an upload
        (("transcription", "batch"), ("transcription", "interactive"), True),  # an upload during a job
        (("transcription", "batch"), ("llm", "interactive"), True),
        (("transcription", "interactive"), ("transcription", "interactive"), False),  # two uploads
        (("transcription", "interactive"), ("transcription", "batch"), False),  # a job behind an upload
        (("llm", "interactive"), ("transcription", "batch"), False),  # a job behind the LLM's keep-alive
    ],
    ids=["chat-upload", "upload-job", "chat-job", "upload-upload", "job-upload", "job-llm"],
)
async def test_only_a_waiter_that_outranks_the_holder_asks_before_its_turn(
    serve_coordinator: ServeCoordinator,
    api_factory: ApiFactory,
    holder: tuple[str, str],
    waiter: tuple[str, str],
    at_once: bool,
) -> None:
    """Holders that pause at once would swap the card every few milliseconds with a
    peer (two uploads, an upload and a job): a peer asks after the holder's turn."""
    api = api_factory(serve_coordinator(turn_ms=60000, max_batch_wait_ms=120000))
    held = (await api.acquire(*holder)).json()
    queued = await enqueue(api, *waiter, 1)
    if at_once:
        async with asyncio.timeout(10):  # far below the 60 s turn
            while not (await api.renew(held["lease_id"])).json()["yield_requested"]:
                await asyncio.sleep(0.02)
    else:
        for _ in range(3):
            assert (await api.renew(held["lease_id"])).json()["yield_requested"] is False
    await api.release(held["lease_id"])
    assert (await queued).json()["holder"] == waiter[0]


async def test_an_interactive_holder_keeps_the_card_its_least_hold_before_another_service_asks(
    leases: MakeLeases,
) -> None:
    """The soak's swap storm: the LLM and an upload, each asked to yield the instant it
    was granted. A batch holder is still asked at once (the upload-job case above)."""
    gpu = await leases(min_hold_ms=1000, turn_ms=60000)
    held = await gpu.acquire("transcription", "interactive", ttl_ms=5000)
    queued = await gpu.enqueue("llm", "interactive", 1)
    assert (await gpu.manager.renew(held.lease_id)).yield_requested is False  # within its least hold
    for _ in range(100):  # 5 s of its clock
        if (await gpu.manager.renew(held.lease_id)).yield_requested:
            break
        await gpu.advance(50)
    asked_after = gpu.clock.ms / 1000 - held.granted_at
    assert asked_after >= 1.0  # not before the least hold
    assert asked_after < 30  # and long before the turn
    assert asked_after == pytest.approx(1.0, abs=0.002)  # at its first renewal past it
    await gpu.manager.release(held.lease_id)
    assert (await queued).holder == "llm"


async def test_a_peer_gets_the_card_after_the_holders_turn(leases: MakeLeases) -> None:
    gpu = await leases(turn_ms=1000)
    held = await gpu.acquire("transcription", "interactive", ttl_ms=5000)
    queued = await gpu.enqueue("transcription", "interactive", 1)
    for _ in range(100):  # 5 s of its clock
        if (await gpu.manager.renew(held.lease_id)).yield_requested:
            break
        await gpu.advance(50)
    assert (await gpu.manager.status())["yield_requested"]
    assert gpu.clock.ms / 1000 - held.granted_at >= 1.0 - 0.001
    await gpu.manager.release(held.lease_id)
    assert (await queued).holder == "transcription"


async def test_the_client_sees_the_yield_and_hands_over(
    serve_coordinator: ServeCoordinator, gpu_factory: Callable[..., GpuClient]
) -> None:
    coordinator = serve_coordinator()
    holder, asker = gpu_factory(coordinator, "transcription"), gpu_factory(coordinator, "llm")
    lease = await holder.acquire(LeaseRequest("transcription", "batch", wait_s=5))
    assert not lease.yield_requested
    asking = asyncio.create_task(asker.acquire(LeaseRequest("llm", "interactive", wait_s=10)))
    async with asyncio.timeout(5):
        await lease.wait_yield()
    assert lease.yield_requested
    await lease.release()
    granted = await asking
    assert granted.fence == lease.fence + 1
    assert lease.lost_reason == "released"
    with pytest.raises(LeaseLost):
        lease.check()
    await granted.release()


async def test_the_manager_stops_even_when_its_timer_wakes_as_it_is_cancelled(leases: MakeLeases) -> None:
    """Python 3.11's asyncio.wait_for swallows a cancellation that arrives as its wait
    ends: a timer woken at that moment went on, and a teardown waited on it for 600 s."""
    for _ in range(20):
        gpu = await leases()
        held = await gpu.acquire("llm")  # a deadline: the timer has something to wait for
        gpu.manager._wake.set()  # the timer's wait ends in the same turn as the cancel
        stopping = asyncio.create_task(gpu.manager.stop())
        done, _ = await asyncio.wait({stopping}, timeout=10)
        assert stopping in done, "the manager's timer went on after it was cancelled"
        await gpu.manager.release(held.lease_id)
