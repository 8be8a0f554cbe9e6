"""GpuPolicy's decisions, in process: when the LLM keeps the card after an answer, when it
gives it back, when it moves its layers off first, and how a running batch hands the
card over mid-stream. The coordinator is not the point here, so leases come from a
scripted stand-in; the engine records its reloads and its holds."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from services.llm.engine import Engine
from services.llm.gpu_policy import GpuPolicy, GpuPolicyMetrics
from services.llm.settings import LLMSettings
from shared.gpu import GpuUnavailable, Handover, LeaseRequest, Listener
from shared.metrics import Metrics

LAYERS = 12


class RecordingScheduler:
    def __init__(self) -> None:
        self.holds = 0
        self.held_ever = 0
        self.fenced = 0
        self.may_step: Any = None
        self.on_blocked: Any = None

    def hold(self) -> None:
        self.holds += 1
        self.held_ever += 1

    def open(self) -> None:
        self.holds -= 1

    def unfence(self) -> None:
        self.fenced += 1

    def wake(self) -> None:
        return None


class RecordingEngine:
    def __init__(self) -> None:
        self.gpu_layers = 0
        self.loads: list[int] = []
        self.scheduler = RecordingScheduler()

    def load(self, gpu_layers: int) -> float:
        self.loads.append(gpu_layers)
        self.gpu_layers = gpu_layers
        return 0.0


class ScriptedLease:
    def __init__(self, fence: int) -> None:
        self.fence = fence
        self.yield_seen_at: float | None = None
        self.lost_reason: str | None = None
        self.free_memory = False
        self.deadline = float("inf")
        self._yield = asyncio.Event()
        self.released = asyncio.Event()
        self.handover: Handover | None = None
        self.listeners: list[Listener] = []

    @property
    def lost(self) -> bool:
        return self.lost_reason is not None

    @property
    def yield_requested(self) -> bool:
        return self._yield.is_set()

    def ask_to_yield(self, free_memory: bool = False) -> None:
        self.free_memory = free_memory
        self._yield.set()
        for listener in self.listeners:
            listener("yield")

    def check(self) -> None:
        return None

    def listen(self, listener: Listener) -> None:
        self.listeners.append(listener)

    async def wait_yield(self) -> None:
        await self._yield.wait()

    async def release(self, handover: Handover | None = None, handover_ms: float = 0.0) -> None:
        self.handover = handover
        self.released.set()


class ScriptedGpu:
    """Grants at once, unless told to refuse the next ``refusals`` asks."""

    def __init__(self) -> None:
        self.leases: list[ScriptedLease] = []
        self.refusals = 0
        self.asked = 0
        self.waiting = 0
        """Asks in flight now; the most there ever were at once."""
        self.most_waiting = 0
        self.gate: asyncio.Event | None = None
        """Set: grants wait until it is."""

    async def acquire(self, request: LeaseRequest) -> ScriptedLease:
        assert (request.holder, request.priority) == ("llm", "interactive")
        self.asked += 1
        self.waiting += 1
        self.most_waiting = max(self.most_waiting, self.waiting)
        try:
            if self.refusals:
                self.refusals -= 1
                await asyncio.sleep(request.wait_s)
                raise GpuUnavailable("busy", retry_after_s=0.01, reason="wait_over")
            if self.gate is not None:
                await self.gate.wait()
            self.leases.append(ScriptedLease(len(self.leases) + 1))
            return self.leases[-1]
        finally:
            self.waiting -= 1

    async def aclose(self) -> None:
        return None


def policy(**settings: Any) -> tuple[GpuPolicy, ScriptedGpu, RecordingEngine]:
    gpu, engine = ScriptedGpu(), RecordingEngine()
    values = {"gpu_layers": LAYERS, "force_reload": True, "keep_alive_s": 30.0, **settings}
    chosen = LLMSettings(**values)
    made = GpuPolicy(cast(Engine, engine), cast(Any, gpu), chosen, GpuPolicyMetrics(Metrics("test_llm")))
    made.attach()
    return made, gpu, engine


async def answer(made: GpuPolicy, *, client_gone: bool = False) -> ScriptedLease:
    placement = await made.place(made.want())
    await made.finish(placement, client_gone=client_gone)
    return cast(ScriptedLease, placement.lease)


async def test_the_card_is_kept_between_answers_and_the_layers_stay() -> None:
    made, gpu, engine = policy()
    first = await answer(made)
    second = await answer(made)
    assert second is first and len(gpu.leases) == 1  # one grant for both answers
    assert engine.loads == [LAYERS]  # loaded once, not per answer
    assert not first.released.is_set()
    first.ask_to_yield()  # someone waits: the keep-alive gives the card back
    await asyncio.wait_for(first.released.wait(), 10)
    assert first.handover == "keep" and engine.loads == [LAYERS]  # the card had room: no offload
    await made.close()


async def test_asked_to_yield_mid_batch_with_no_room_it_offloads_releases_and_takes_it_back() -> None:
    made, gpu, engine = policy()
    placement = await made.place(made.want())
    lease = cast(ScriptedLease, placement.lease)
    scheduler = engine.scheduler
    assert scheduler.may_step() is True
    lease.ask_to_yield(free_memory=True)  # asked while the batch runs
    assert scheduler.may_step() is False  # the fence: no step after the one under way
    await asyncio.wait_for(lease.released.wait(), 10)
    assert lease.handover == "offload"
    for _ in range(100):
        if len(gpu.leases) == 2 and engine.loads[-1] == LAYERS and scheduler.holds == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.loads == [LAYERS, 0, LAYERS]  # off the card for the other holder, then back
    assert len(gpu.leases) == 2 and scheduler.holds == 0 and scheduler.fenced >= 1  # the streams go on
    assert scheduler.may_step() is True
    await made.finish(placement, client_gone=False)
    await made.close()


async def test_asked_to_yield_with_room_it_pauses_without_moving_the_layers() -> None:
    made, _gpu, engine = policy()
    placement = await made.place(made.want())
    lease = cast(ScriptedLease, placement.lease)
    lease.ask_to_yield(free_memory=False)
    await asyncio.wait_for(lease.released.wait(), 10)
    assert lease.handover == "pause" and engine.loads == [LAYERS]
    await made.finish(placement, client_gone=False)
    await made.close()


@pytest.mark.parametrize(
    ("settings", "client_gone", "released"),
    [
        ({"keep_alive_s": 0.0}, False, True),  # no keep-alive: give it back after each answer
        ({}, True, True),  # the client left and nobody here waits: nothing to keep it for
        ({}, False, False),  # an answer delivered and nobody else waits: keep it
    ],
)
async def test_after_an_answer(settings: dict[str, Any], client_gone: bool, released: bool) -> None:
    made, _, _ = policy(**settings)
    lease = await answer(made, client_gone=client_gone)
    for _ in range(50):
        if lease.released.is_set() is released:
            break
        await asyncio.sleep(0.01)
    assert lease.released.is_set() is released
    await made.close()
    assert lease.released.is_set()  # closing the service always gives it back


async def test_the_keep_alive_runs_out() -> None:
    made, _, _ = policy(keep_alive_s=0.05)
    lease = await answer(made)
    await asyncio.wait_for(lease.released.wait(), 10)
    assert lease.handover == "keep"
    await made.close()


async def test_the_ask_goes_out_when_the_request_arrives_and_is_withdrawn_when_not_needed() -> None:
    made, gpu, _ = policy()
    ask = made.want()
    await asyncio.sleep(0)  # the ask is under way before anything else of the request
    for _ in range(50):
        if gpu.leases:
            break
        await asyncio.sleep(0.01)
    assert gpu.asked == 1 and len(gpu.leases) == 1
    ask.withdraw()  # a cached answer: nobody needs the card
    await asyncio.wait_for(gpu.leases[0].released.wait(), 10)  # client_gone-like: given back, not kept
    await made.close()


async def test_not_granted_in_time_it_serves_on_the_cpu_and_moves_to_the_card_once_granted() -> None:
    made, gpu, engine = policy(gpu_wait_ms=50)
    gpu.refusals = 1
    placement = await made.place(made.want())
    assert placement.fallback and placement.lease is None and placement.device == "cpu"
    for _ in range(200):
        if gpu.leases and engine.loads == [LAYERS]:
            break
        await asyncio.sleep(0.01)
    assert engine.loads == [LAYERS]  # the ask went on, and the engine moved once it was granted
    await made.finish(placement, client_gone=False)
    await made.close()


async def test_a_hand_over_and_a_request_arriving_meanwhile_make_one_ask_not_two() -> None:
    """The soak's 10 s stalls: the hand-over took the card back with an ask of its own
    while a new request's ask was out too; the coordinator granted one, and the other
    waited for a card its own process held."""
    made, gpu, _ = policy()
    placement = await made.place(made.want())
    lease = cast(ScriptedLease, placement.lease)
    gpu.gate = asyncio.Event()  # the card is someone else's for a while
    lease.ask_to_yield()
    await asyncio.wait_for(lease.released.wait(), 10)
    arriving = made.want()  # a new request while the streams wait for the card back
    async with asyncio.timeout(10):
        while gpu.waiting == 0:
            await asyncio.sleep(0.01)
    gpu.gate.set()
    second = await made.place(arriving)
    assert gpu.most_waiting == 1  # one ask for both
    assert second.lease is gpu.leases[-1] and len(gpu.leases) == 2
    await made.finish(second, client_gone=False)
    await made.finish(placement, client_gone=False)
    await made.close()
