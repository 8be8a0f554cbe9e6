"""Device memory in leases: declared needs, the card's size, and whether a holder must
free its memory to hand the card over; hand-over reports; the batch slice."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable

from tests.services.coordinator.conftest import Api, Events, ServeCoordinator, Served

ApiFactory = Callable[[Served], Api]
EventsFor = Callable[[Served], Events]


async def test_vram_is_declared_and_shown(serve_coordinator: ServeCoordinator, api_factory: ApiFactory) -> None:
    api = api_factory(serve_coordinator(gpu_memory_mb=24000))
    grant = (await api.acquire("llm", vram_mb=2600)).json()
    assert (grant["vram_mb"], grant["free_memory"]) == (2600, False)
    state = await api.gpu()
    assert (state["vram_mb"], state["card_mb"]) == (2600, 24000)
    assert (await api.release(grant["lease_id"], handover="keep", handover_ms=0.4)).status_code == 204
    ended = (await api.history(1))[0]
    assert (ended["vram_mb"], ended["handover"], ended["handover_ms"]) == (2600, "keep", 0.4)


async def test_a_card_of_unknown_size_never_asks_to_free(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory, events_for: EventsFor
) -> None:
    coordinator = serve_coordinator(gpu_memory_mb=0)  # what NVML gives on a machine without a card
    api = api_factory(coordinator)
    async with events_for(coordinator) as events:
        job = (await api.acquire("transcription", "batch", vram_mb=900_000)).json()
        await api.acquire("llm", wait_ms=0, vram_mb=900_000)  # asks, gives up at once
        asked = await events.wait_for(lambda e: e["type"] == "yield_requested")
    assert asked["free_memory"] is False
    assert (await api.renew(job["lease_id"])).json()["free_memory"] is False


async def test_yield_requests_say_whether_memory_must_be_freed(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory, events_for: EventsFor
) -> None:
    coordinator = serve_coordinator(gpu_memory_mb=4000)
    api = api_factory(coordinator)
    async with events_for(coordinator) as events:
        # Both fit (2500 + 1000 <= 4000): pausing compute is enough.
        job = (await api.acquire("transcription", "batch", vram_mb=1000)).json()
        assert job["free_memory"] is False  # nobody else has declared a need yet
        await api.acquire("llm", vram_mb=2500)  # tries once, refused: the card is held
        asked = await events.wait_for(lambda e: e["type"] == "yield_requested" and e["fence"] == job["fence"])
        assert asked["free_memory"] is False
        assert (await api.release(job["lease_id"], handover="pause", handover_ms=1.5)).status_code == 204

        # The LLM now needs more than the card has beside the job's model.
        job = (await api.acquire("transcription", "batch", vram_mb=1000)).json()
        await api.acquire("llm", vram_mb=3500)
        asked = await events.wait_for(lambda e: e["type"] == "yield_requested" and e["fence"] == job["fence"])
        assert asked["free_memory"] is True
        assert (await api.renew(job["lease_id"])).json()["free_memory"] is True
        assert (await api.release(job["lease_id"], handover="restart", handover_ms=12.0)).status_code == 204

        # A new grant knows it at once, from the needs declared so far.
        llm = (await api.acquire("llm", vram_mb=3500)).json()
        assert llm["free_memory"] is True
    history = await api.history(3)
    assert [(h["holder"], h.get("handover"), h.get("handover_ms")) for h in history] == [
        ("llm", None, None),
        ("transcription", "restart", 12.0),
        ("transcription", "pause", 1.5),
    ]


async def test_a_starved_batch_holder_keeps_the_card_for_its_slice(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory, events_for: EventsFor
) -> None:
    coordinator = serve_coordinator(max_batch_wait_ms=200, batch_slice_ms=1500)
    api = api_factory(coordinator)
    async with events_for(coordinator) as events:
        chat = (await api.acquire("llm")).json()
        job_waits = asyncio.ensure_future(api.acquire("transcription", "batch", wait_ms=30000))
        async with asyncio.timeout(10):  # until the job has waited past max_batch_wait_ms: it starves
            while not (queue := (await api.gpu())["queue"]) or queue[0]["waiting_ms"] < 250:
                await asyncio.sleep(0.01)
        assert (await api.release(chat["lease_id"])).status_code == 204
        job = (await job_waits).json()
        next_chat = asyncio.ensure_future(api.acquire("llm", wait_ms=30000))
        await events.wait_for(lambda e: e["type"] == "queued" and e["holder"] == "llm")
        assert (await api.gpu())["yield_requested"] is False  # within its slice nobody asks
        asked = await events.wait_for(lambda e: e["type"] == "yield_requested" and e["fence"] == job["fence"])
        assert asked["at"] - job["granted_at"] >= 1.5  # not before its slice ended (coordinator clock)
        assert (await api.release(job["lease_id"])).status_code == 204
        assert (await next_chat).status_code == 201


async def test_grants_cut_short_by_chats_do_not_reset_a_batch_waiters_starvation(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory, events_for: EventsFor
) -> None:
    """A job handed the card between chats for moments at a time still starves once it
    has waited max_batch_wait_ms in all, and then keeps the card for its slice."""
    coordinator = serve_coordinator(max_batch_wait_ms=300, batch_slice_ms=1000)
    api = api_factory(coordinator)
    async with events_for(coordinator) as events:
        job = (await api.acquire("transcription", "batch")).json()
        started = job["granted_at"]
        held: list[float] = []
        for _ in range(2000):  # each round the job waits a few ms for the chat
            chat_waits = asyncio.ensure_future(api.acquire("llm", wait_ms=30000))
            fence = job["fence"]
            asked = await events.wait_for(lambda e: e["type"] == "yield_requested" and e["fence"] == fence)  # noqa: B023
            held.append(asked["at"] - job["granted_at"])
            assert (await api.release(job["lease_id"])).status_code == 204
            chat = (await chat_waits).json()
            if held[-1] >= 1.0:  # the slice: a chat had to wait for it
                break
            job_waits = asyncio.ensure_future(api.acquire("transcription", "batch", wait_ms=30000))
            await api.wait_queue(1)
            assert (await api.release(chat["lease_id"])).status_code == 204
            job = (await job_waits).json()
        assert held[-1] >= 1.0, held
        assert all(h < 0.5 for h in held[:-1])  # cut short every time before
        assert job["granted_at"] - started >= 0.3  # not before it had waited max_batch_wait_ms in all


async def test_three_looping_chats_cannot_hold_a_job_below_its_slice(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory, events_for: EventsFor
) -> None:
    """Three clients chat without pause while a job needs WORK_S of card time. The job
    waits at most MAX_WAIT_S in all before it starves, then holds the card for SLICE_S;
    each round costs at most MAX_WAIT_S + SLICE_S + the chats ahead of it (3 x CHAT_S).
    The bound stated and checked: ceil(WORK_S / SLICE_S) rounds, plus 5 s of slack for a
    busy machine: 3 x (0.5 + 1.0 + 0.3) + 5 = 10.4 s."""
    max_wait_s, slice_s, chat_s, work_s = 0.5, 1.0, 0.1, 3.0
    bound_s = math.ceil(work_s / slice_s) * (max_wait_s + slice_s + 3 * chat_s) + 5
    coordinator = serve_coordinator(max_batch_wait_ms=int(max_wait_s * 1000), batch_slice_ms=int(slice_s * 1000))
    api = api_factory(coordinator)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    answered = [0, 0, 0]

    async def chat(client: int) -> None:
        while not stop.is_set():
            lease = (await api.acquire(f"chat{client}", wait_ms=60000)).json()
            await asyncio.sleep(chat_s)  # the answer being generated
            assert (await api.release(lease["lease_id"])).status_code == 204
            answered[client] += 1

    async def job(events: Events) -> list[float]:
        held: list[float] = []
        while sum(held) < work_s:
            lease = (await api.acquire("transcription", "batch", wait_ms=60000)).json()
            granted, fence = loop.time(), lease["fence"]
            with contextlib.suppress(TimeoutError):  # decodes until asked to yield, or until done
                await events.wait_for(
                    lambda e: e["type"] == "yield_requested" and e["fence"] == fence,  # noqa: B023
                    timeout_s=work_s - sum(held),
                )
            held.append(loop.time() - granted)
            assert (await api.release(lease["lease_id"])).status_code == 204
        return held

    async with events_for(coordinator) as events:
        chats = [asyncio.ensure_future(chat(i)) for i in range(3)]
        await api.wait_queue(2)  # the chats are looping: one holds, two wait
        started = loop.time()
        held = await asyncio.wait_for(job(events), timeout=bound_s)
        took = loop.time() - started
        stop.set()
        await asyncio.gather(*chats)
    assert took <= bound_s and sum(held) >= work_s
    assert [h for h in held if h >= slice_s * 0.9], held  # it got whole slices, not moments only
    assert all(n > 0 for n in answered), answered  # and the chats were answered meanwhile
