"""Who goes next, and when a holder is asked (then forced) to give the card back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest

from shared.gpu import GpuClient, LeaseLost, LeaseRequest
from tests.services.coordinator.conftest import Api, Events, ServeCoordinator, Served

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


async def test_a_starving_batch_waiter_goes_first(serve_coordinator: ServeCoordinator, api_factory: ApiFactory) -> None:
    api = api_factory(serve_coordinator(max_batch_wait_ms=400, yield_grace_ms=60000))
    held = (await api.acquire("llm")).json()
    batch = await enqueue(api, "transcription", "batch", 1)

    # Until the batch waiter has waited long enough, an interactive newcomer goes first...
    state = await api.gpu()
    assert state["queue"][0]["waiting_ms"] < 400
    interactive = await enqueue(api, "chat", "interactive", 2)
    assert [w["holder"] for w in (await api.gpu())["queue"]] == ["chat", "transcription"]

    # ...once it has waited longer than COORDINATOR_MAX_BATCH_WAIT_MS, it is next.
    async with asyncio.timeout(5):
        while (await api.gpu())["queue"][0]["holder"] != "transcription":
            await asyncio.sleep(0.02)
    await api.release(held["lease_id"])
    granted = (await batch).json()
    assert granted["holder"] == "transcription"
    assert granted["waited_ms"] >= 400
    await api.release(granted["lease_id"])
    assert (await interactive).json()["holder"] == "chat"


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
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory, events_for: Callable[[Served], Events]
) -> None:
    coordinator = serve_coordinator(yield_grace_ms=300)
    api = api_factory(coordinator)
    stubborn = (await api.acquire("transcription", "batch", ttl_ms=2000)).json()
    async with events_for(coordinator) as events:
        waiter = asyncio.create_task(api.acquire("llm", "interactive", wait_ms=10000))
        await events.wait_for(lambda e: e["type"] == "yield_requested")
        # It keeps renewing, but does not release.
        last_expiry = stubborn["expires_at"]
        while True:
            renewed = await api.renew(stubborn["lease_id"])
            if renewed.status_code != 200:
                break
            last_expiry = renewed.json()["expires_at"]
            await asyncio.sleep(0.05)
        revoked = await events.wait_for(lambda e: e["type"] == "revoked")
    assert renewed.status_code == 410
    assert renewed.json()["error"]["code"] == "revoked"
    assert revoked["fence"] == stubborn["fence"]
    grant = (await waiter).json()
    assert grant["holder"] == "llm"
    assert grant["granted_at"] >= last_expiry - 0.002  # never before the revoked lease's TTL ran out
    history = await api.history(limit=2)
    assert history[1]["end"] == "revoked"
    assert history[1]["ended_at"] >= last_expiry - 0.002


async def test_a_holder_that_ignores_a_batch_waiter_is_revoked_too(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory
) -> None:
    """Any waiter starts the grace period once the holder has had its turn: an
    interactive holder cannot keep a job queued by ignoring its yield requests."""
    api = api_factory(serve_coordinator(yield_grace_ms=200, max_batch_wait_ms=60000, turn_ms=300))
    held = (await api.acquire("llm", "interactive", ttl_ms=2000)).json()
    waiter = await enqueue(api, "transcription", "batch", 1)
    asked = []
    async with asyncio.timeout(10):
        while (renewed := await api.renew(held["lease_id"])).status_code == 200:
            asked.append(renewed.json()["yield_requested"])
            await asyncio.sleep(0.05)
    assert asked == sorted(asked), "once asked, asked until it gives the card back"
    assert renewed.status_code == 410 and renewed.json()["error"]["code"] == "revoked"
    grant = (await waiter).json()
    assert grant["holder"] == "transcription"
    revoked = (await api.history(2))[1]
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
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory
) -> None:
    """The soak's swap storm: the LLM and an upload, each asked to yield the instant it
    was granted. A batch holder is still asked at once (the upload-job case above)."""
    api = api_factory(serve_coordinator(min_hold_ms=1000, turn_ms=60000))
    held = (await api.acquire("transcription", "interactive", ttl_ms=5000)).json()
    queued = await enqueue(api, "llm", "interactive", 1)
    assert (await api.renew(held["lease_id"])).json()["yield_requested"] is False  # within its least hold
    async with asyncio.timeout(20):
        while not (await api.renew(held["lease_id"])).json()["yield_requested"]:
            await asyncio.sleep(0.05)
    asked_after = time.time() - held["granted_at"]
    assert asked_after >= 1.0  # not before the least hold
    assert asked_after < 30  # and long before the turn
    await api.release(held["lease_id"])
    assert (await queued).json()["holder"] == "llm"


async def test_a_peer_gets_the_card_after_the_holders_turn(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory
) -> None:
    api = api_factory(serve_coordinator(turn_ms=1000))
    before = time.monotonic()
    held = (await api.acquire("transcription", "interactive", ttl_ms=5000)).json()
    queued = await enqueue(api, "transcription", "interactive", 1)
    async with asyncio.timeout(20):
        while not (await api.renew(held["lease_id"])).json()["yield_requested"]:
            await asyncio.sleep(0.05)
    assert time.monotonic() - before >= 1.0
    await api.release(held["lease_id"])
    assert (await queued).status_code == 201


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
