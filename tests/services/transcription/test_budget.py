"""The memory budget that decoded audio shares, in process: who waits, who is refused,
and that nothing given back is lost, whatever happens to a waiter."""

from __future__ import annotations

import asyncio

import pytest

from services.transcription.audio import BudgetBusy, MemoryBudget, OverBudget, bytes_for


def test_more_than_the_whole_budget_is_refused_at_once() -> None:
    async def main() -> None:
        with pytest.raises(OverBudget, match="needs"):
            await MemoryBudget(100).take(101, wait_s=60)

    asyncio.run(main())


def test_a_waiter_gets_its_share_when_one_is_given_back_in_order() -> None:
    async def main() -> list[str]:
        budget = MemoryBudget(100)
        first = await budget.take(60, wait_s=None)
        order: list[str] = []

        async def wait(name: str, nbytes: int) -> None:
            held = await budget.take(nbytes, wait_s=None)
            order.append(name)
            held.release()

        waiters = [asyncio.create_task(wait("big", 70)), asyncio.create_task(wait("small", 10))]
        await asyncio.sleep(0)  # both are queued; the small one may not pass the big one
        assert order == [] and budget.used == 60
        first.release()
        first.release()  # twice is harmless
        await asyncio.gather(*waiters)
        assert budget.used == 0
        return order

    assert asyncio.run(main()) == ["big", "small"]


def test_a_waiter_that_times_out_or_is_cancelled_leaves_nothing_held() -> None:
    async def main() -> None:
        budget = MemoryBudget(100)
        held = await budget.take(100, wait_s=None)
        with pytest.raises(BudgetBusy):
            await budget.take(50, wait_s=0.01)
        cancelled = asyncio.create_task(budget.take(50, wait_s=None))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        held.release()
        assert budget.used == 0
        again = await budget.take(100, wait_s=0)
        assert budget.used == 100
        again.release()

    asyncio.run(main())


def test_four_hours_take_under_a_gigabyte() -> None:
    assert 0.9e9 < bytes_for(4 * 3600) < 0.93e9
