"""GpuPolicy's decisions, in process: when the LLM keeps the card after an answer, when it
gives it back, and when it moves its layers off first. The coordinator is not the point
here, so leases come from a scripted stand-in; the engine records its reloads."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from services.llm.engine import Engine
from services.llm.placement import GpuPolicy, PlacementMetrics
from services.llm.settings import LLMSettings
from services.llm.slot import ModelSlot
from shared.gpu import Handover, Listener
from shared.metrics import Metrics

LAYERS = 12


class RecordingEngine:
    def __init__(self) -> None:
        self.gpu_layers = 0
        self.loads: list[int] = []

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

    @property
    def lost(self) -> bool:
        return self.lost_reason is not None

    @property
    def yield_requested(self) -> bool:
        return self._yield.is_set()

    def ask_to_yield(self, free_memory: bool = False) -> None:
        self.free_memory = free_memory
        self._yield.set()

    def check(self) -> None:
        return None

    def listen(self, listener: Listener) -> None:
        return None

    async def wait_yield(self) -> None:
        await self._yield.wait()

    async def wait_lost(self) -> None:
        await asyncio.Event().wait()

    async def release(self, handover: Handover | None = None, handover_ms: float = 0.0) -> None:
        self.handover = handover
        self.released.set()


class ScriptedGpu:
    def __init__(self) -> None:
        self.leases: list[ScriptedLease] = []

    async def acquire(self, holder: str, priority: str = "interactive", *args: Any, **kwargs: Any) -> ScriptedLease:
        assert (holder, priority) == ("llm", "interactive")
        self.leases.append(ScriptedLease(len(self.leases) + 1))
        return self.leases[-1]

    async def aclose(self) -> None:
        return None


def policy(**settings: Any) -> tuple[GpuPolicy, ScriptedGpu, RecordingEngine, ModelSlot]:
    gpu, engine, slot = ScriptedGpu(), RecordingEngine(), ModelSlot()
    values = {"gpu_layers": LAYERS, "force_reload": True, "keep_alive_s": 30.0, **settings}
    chosen = LLMSettings(**values)
    made = GpuPolicy(cast(Engine, engine), cast(Any, gpu), chosen, slot, PlacementMetrics(Metrics("test_llm")))
    return made, gpu, engine, slot


async def answer(made: GpuPolicy, slot: ModelSlot, *, client_gone: bool = False) -> ScriptedLease:
    async with slot:
        placement = await made.place()
        await made.finish(placement, client_gone=client_gone)
    return cast(ScriptedLease, placement.lease)


async def test_the_card_is_kept_between_answers_and_the_layers_stay() -> None:
    made, gpu, engine, slot = policy()
    first = await answer(made, slot)
    second = await answer(made, slot)
    assert second is first and len(gpu.leases) == 1  # one grant for both answers
    assert engine.loads == [LAYERS]  # loaded once, not per answer
    assert not first.released.is_set()
    first.ask_to_yield()  # someone waits: the keep-alive gives the card back
    await asyncio.wait_for(first.released.wait(), 10)
    assert first.handover == "keep" and engine.loads == [LAYERS]  # the card had room: no offload
    await made.close()


async def test_asked_to_yield_with_no_room_it_offloads_then_releases() -> None:
    made, _, engine, slot = policy()
    async with slot:
        placement = await made.place()
        lease = cast(ScriptedLease, placement.lease)
        lease.ask_to_yield(free_memory=True)  # asked while answering
        await made.finish(placement, client_gone=False)
    assert lease.released.is_set() and lease.handover == "offload"
    assert engine.loads == [LAYERS, 0]
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
    made, _, _, slot = policy(**settings)
    lease = await answer(made, slot, client_gone=client_gone)
    assert lease.released.is_set() is released
    await made.close()
    assert lease.released.is_set()  # closing the service always gives it back


async def test_the_keep_alive_runs_out() -> None:
    made, _, _, slot = policy(keep_alive_s=0.05)
    lease = await answer(made, slot)
    await asyncio.wait_for(lease.released.wait(), 10)
    assert lease.handover == "keep"
    await made.close()
