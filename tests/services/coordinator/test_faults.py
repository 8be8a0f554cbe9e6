"""Faults with real processes: many holders, kill -9, SIGSTOP, Redis and coordinator restarts."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from harness.servers import REPO_ROOT, RedisServer, ServiceProcess, free_port
from shared.gpu import GpuClient, LeaseRequest
from tests.services.coordinator.conftest import Api, StartCoordinator

pytestmark = pytest.mark.slow

ApiFactory = Callable[[ServiceProcess], Api]


def worker(*args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "harness.lease_worker", *args],
        cwd=REPO_ROOT,
        env=os.environ,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_event(process: subprocess.Popen[str], timeout_s: float = 60) -> dict[str, Any]:
    """The worker's next JSON line (blocks in a thread, bounded by a deadline)."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.startswith("{"):
            return json.loads(line)
        if not line and process.poll() is not None:
            raise AssertionError(
                f"worker exited {process.returncode}: {process.stderr.read() if process.stderr else ''}"
            )
    raise TimeoutError("no event from the worker")


@contextmanager
def reaped(*processes: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()


def test_many_processes_never_overlap(start_coordinator: StartCoordinator, tmp_path: Path) -> None:
    coordinator = start_coordinator()
    workers, cycles = 8, 200
    outputs = [tmp_path / f"w{i}.jsonl" for i in range(workers)]
    procs = [
        worker(
            "cycles",
            "--url",
            coordinator.url,
            "--holder",
            f"w{i}",
            "--cycles",
            str(cycles),
            "--out",
            str(out),
            stdout=subprocess.DEVNULL,
        )
        for i, out in enumerate(outputs)
    ]
    with reaped(*procs):
        for proc in procs:
            assert proc.wait(timeout=600) == 0, proc.stderr.read() if proc.stderr else ""
    records = [json.loads(line) for out in outputs for line in out.read_text().splitlines()]
    assert len(records) == workers * cycles
    records.sort(key=lambda r: r["start"])
    for before, after in itertools.pairwise(records):
        assert after["start"] >= before["end"], f"overlap: {before} and {after}"
        assert after["fence"] > before["fence"], f"fence went down: {before} then {after}"
    assert len({r["fence"] for r in records}) == len(records)


async def test_kill_9_holder_next_waiter_within_ttl_plus_1s(
    start_coordinator: StartCoordinator, gpu_factory: Callable[..., GpuClient], api_factory: ApiFactory
) -> None:
    coordinator = start_coordinator()
    api = api_factory(coordinator)
    ttl_s = 2.0
    holder = worker("hold", "--url", coordinator.url, "--holder", "victim", "--ttl-ms", "2000")
    with reaped(holder):
        acquired = read_event(holder)
        waiter = asyncio.create_task(
            gpu_factory(coordinator, "next").acquire(LeaseRequest("next", "interactive", wait_s=30))
        )
        await api.wait_queue(1)
        killed_at = time.monotonic()
        holder.kill()
        lease = await waiter
        elapsed = time.monotonic() - killed_at
    assert elapsed <= ttl_s + 1.0, elapsed
    assert lease.fence > acquired["fence"]
    history = await api.history(limit=2)
    assert (history[1]["holder"], history[1]["end"]) == ("victim", "expired")
    await lease.release()


async def test_sigstop_holder_loses_its_lease_and_cannot_write(
    start_coordinator: StartCoordinator,
    gpu_factory: Callable[..., GpuClient],
    redis_server: RedisServer,
    key_prefix: str,
) -> None:
    from harness.lease_worker import FENCED_WRITE

    coordinator = start_coordinator()
    register = key_prefix + "register"
    ttl_s = 1.5
    holder = worker(
        "hold",
        "--url",
        coordinator.url,
        "--holder",
        "paused",
        "--ttl-ms",
        str(int(ttl_s * 1000)),
        "--redis",
        redis_server.url,
        "--register",
        register,
    )
    store = redis_server.client()
    fenced_write = store.register_script(FENCED_WRITE)
    with reaped(holder):
        old = read_event(holder)
        async with asyncio.timeout(10):
            while store.llen(register + ":log") < 3:  # it is working
                await asyncio.sleep(0.01)
        stopped_at = time.monotonic()
        holder.send_signal(signal.SIGSTOP)
        lease = await gpu_factory(coordinator, "next").acquire(LeaseRequest("next", "interactive", wait_s=30))
        granted_after = time.monotonic() - stopped_at
        assert fenced_write(keys=[register, register + ":log"], args=[lease.fence, "next"]) == "accepted"
        await asyncio.sleep(max(0.0, 2 * ttl_s - (time.monotonic() - stopped_at)))  # the pause lasts 2 x TTL
        holder.send_signal(signal.SIGCONT)
        lost = read_event(holder)
    assert granted_after >= ttl_s - 1.0  # not before the paused lease's TTL (minus the last renew's age)
    assert lost["event"] == "lost"
    assert lost["verdict"] == "expired"  # its renewal after the pause got 410
    assert lost["lost_reason"] in ("not renewed in time", "expired")
    log = [entry.split() for entry in store.lrange(register + ":log", 0, -1)]
    accepted = [int(fence) for fence, _, verdict in log if verdict == "accepted"]
    assert accepted == sorted(accepted), "an accepted write went back in fences"
    new_first = next(i for i, (_, who, _) in enumerate(log) if who == "next")
    assert all(verdict == "refused" for _, who, verdict in log[new_first:] if who == "paused")
    assert lease.fence > old["fence"]
    await lease.release()


async def test_redis_restart_without_data_quarantines_and_fences_go_up(
    start_coordinator: StartCoordinator, gpu_factory: Callable[..., GpuClient], api_factory: ApiFactory, tmp_path: Path
) -> None:
    redis = RedisServer(tmp_path / "volatile").start()
    try:
        quarantine_s = 3.0
        coordinator = start_coordinator(
            redis_url=redis.url, max_ttl_ms=int(quarantine_s * 1000), default_ttl_ms=3000, redis_timeout_ms=500
        )
        api = api_factory(coordinator)
        before = (await api.acquire("holder", ttl_ms=3000)).json()
        redis.kill()
        down = await api.http.get("/v1/gpu")
        assert down.status_code == 503 and down.json()["error"]["code"] == "store_unavailable"
        assert "127.0.0.1" not in down.text and str(redis.port) not in down.text  # no internal address
        redis.start()  # same port, empty
        restarted_at = time.time()
        refused = await api.acquire("during", wait_ms=0)
        assert refused.status_code == 503
        state = await api.gpu()
        assert state["holder"] is None
        assert state["quarantine_until"] == pytest.approx(restarted_at + quarantine_s, abs=1.0)
        lost = await api.renew(before["lease_id"])
        assert lost.status_code == 410
        after = await api.acquire("after", wait_ms=10000)
        assert after.status_code == 201
        grant = after.json()
        assert grant["granted_at"] >= state["quarantine_until"] - 0.002
        assert grant["fence"] > before["fence"]
    finally:
        redis.stop()


async def test_coordinator_restart_keeps_the_lease_and_the_queue(
    start_coordinator: StartCoordinator, gpu_factory: Callable[..., GpuClient], api_factory: ApiFactory
) -> None:
    port = free_port()
    first = start_coordinator(port=port, waiter_heartbeat_ms=3000)
    holder = gpu_factory(first, "holder")
    lease = await holder.acquire(LeaseRequest("holder", "batch", wait_s=5, ttl_ms=4000))
    api = api_factory(first)
    w1 = asyncio.create_task(gpu_factory(first, "w1").acquire(LeaseRequest("w1", "batch", wait_s=60)))
    await api.wait_queue(1)
    w2 = asyncio.create_task(gpu_factory(first, "w2").acquire(LeaseRequest("w2", "batch", wait_s=60)))
    await api.wait_queue(2)

    first.kill()  # kill -9: no goodbye
    down_at = time.monotonic()
    second = start_coordinator(port=port, waiter_heartbeat_ms=3000)
    restarted_in = time.monotonic() - down_at
    state = await api_factory(second).wait_queue(2)
    assert state["holder"] == "holder" and state["fence"] == lease.fence
    assert [w["holder"] for w in state["queue"]] == ["w1", "w2"]

    deadline_before = lease.deadline
    async with asyncio.timeout(10):
        while lease.deadline <= deadline_before:  # until a renewal through the new process succeeded
            await asyncio.sleep(0.05)
    lease.check()
    assert restarted_in < 4.0

    await lease.release()
    got1 = await w1
    assert (got1.holder, got1.fence) == ("w1", lease.fence + 1)
    await got1.release()
    got2 = await w2
    assert (got2.holder, got2.fence) == ("w2", lease.fence + 2)
    await got2.release()


async def test_twenty_waiters_at_the_instant_of_expiry_one_winner(
    start_coordinator: StartCoordinator, api_factory: ApiFactory
) -> None:
    api = api_factory(start_coordinator())
    await api.acquire("dying", ttl_ms=1500)  # never renewed
    waiters = [asyncio.create_task(api.acquire(f"w{i:02}", "interactive", wait_ms=30000)) for i in range(20)]
    await api.wait_queue(20)
    done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    winner = next(iter(done)).result().json()
    state = await api.gpu()
    assert state["holder"] == winner["holder"] and len(state["queue"]) == 19
    assert all(not task.done() for task in pending)
    # Drain: each release grants exactly one more, never two at once.
    lease_id = winner["lease_id"]
    while pending:
        await api.release(lease_id)
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        lease_id = next(iter(done)).result().json()["lease_id"]
    await api.release(lease_id)
    history = await api.history(limit=21)
    spans = sorted((h["granted_at"], h["ended_at"]) for h in history)
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end
