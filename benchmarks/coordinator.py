"""GPU coordinator vs redis-py's Lock (defaults), one run, real Redis on loopback.

    .venv/bin/python -m benchmarks.coordinator [--iterations 300] [--seconds 5]

Figures, each beside the same figure for ``redis.lock.Lock``:
- uncontended acquire + release round trip (ours over HTTP, the Lock straight to Redis);
- handoff: the holder starts its release -> the next waiter's acquire returns;
- yield signal: an interactive request is sent -> the holder sees ``yield_requested``
  (a Lock cannot ask its holder to yield: no figure);
- grants per second with 8 contending client processes, and how evenly they shared.

Times are CLOCK_MONOTONIC, one clock for every thread and process of the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from benchmarks.support import coordinated, dev_token, ratio, save, service_token, summary_ms, table
from shared.gpu import GpuClient, LeaseRequest

LOCK_NAME = "bench:lock"


# -- ours -------------------------------------------------------------------------------


def ours_round_trips(url: str, n: int) -> list[float]:
    samples = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {service_token('llm')}"}) as http:
        for _ in range(n):
            start = time.monotonic()
            grant = http.post("/v1/leases", json={"holder": "llm", "priority": "interactive", "ttl_ms": 15000})
            http.delete(f"/v1/leases/{grant.json()['lease_id']}")
            samples.append(time.monotonic() - start)
    return samples


class _Role:
    """A client in its own process (as services are), driven over a pipe."""

    def __init__(self, target: Any, *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=target, args=(child, *args), daemon=True)
        self.process.start()

    def ask(self, *command: Any) -> Any:
        self.conn.send(command)
        return self.conn.recv()

    def send(self, *command: Any) -> None:
        self.conn.send(command)

    def recv(self) -> Any:
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(("stop",))
        self.process.join(timeout=30)


def ours_handoff_role(conn: Any, url: str, token: str) -> None:
    """acquire (blocking until granted) -> reply the grant time; release -> reply the release start."""
    token = service_token(f"p{os.getpid()}")  # each process a service of its own
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        lease_id = ""
        while True:
            command = conn.recv()
            if command[0] == "acquire":
                body = {"holder": f"p{os.getpid()}", "priority": "batch", "wait_ms": 60000}
                lease_id = http.post("/v1/leases", json=body).json()["lease_id"]
                conn.send(time.monotonic())
            elif command[0] == "release":
                started = time.monotonic()
                http.delete(f"/v1/leases/{lease_id}")
                conn.send(started)
            else:
                return


def lock_handoff_role(conn: Any, redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    lock = client.lock(LOCK_NAME, timeout=15)
    while True:
        command = conn.recv()
        if command[0] == "acquire":
            lock.acquire()  # blocking; polls every 0.1 s (the default)
            conn.send(time.monotonic())
        elif command[0] == "release":
            started = time.monotonic()
            lock.release()
            conn.send(started)
        else:
            return


def handoffs(roles: tuple[_Role, _Role], n: int, queued: Any) -> list[float]:
    holder, waiter = roles
    holder.ask("acquire")
    samples = []
    for _ in range(n):
        waiter.send("acquire")
        queued()  # the waiter is waiting
        released_at = holder.ask("release")
        samples.append(waiter.recv() - released_at)
        holder, waiter = waiter, holder
    holder.ask("release")
    return samples


def ours_handoffs(url: str, token: str, n: int) -> list[float]:
    roles = (_Role(ours_handoff_role, url, token), _Role(ours_handoff_role, url, token))
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:

        def queued() -> None:
            while not http.get("/v1/gpu").json()["queue"]:
                time.sleep(0.001)
            time.sleep(random.random() * 0.1)  # the same random phase the Lock gets

        try:
            return handoffs(roles, n, queued)
        finally:
            for role in roles:
                role.close()


def lock_handoffs(redis_url: str, n: int) -> list[float]:
    roles = (_Role(lock_handoff_role, redis_url), _Role(lock_handoff_role, redis_url))
    try:
        return handoffs(roles, n, lambda: time.sleep(0.005 + random.random() * 0.1))
    finally:
        for role in roles:
            role.close()


def _seen_yield(lease: Any) -> float:
    lease.wait_yield_blocking(30)
    return time.monotonic()


def yield_holder_role(conn: Any, url: str, token: str) -> None:
    """Holds a batch lease; replies the monotonic time at which it saw the yield request."""

    async def run() -> None:
        holder = service_token("transcription")
        gpu = GpuClient(url, lambda: holder)
        await gpu.wait_subscribed()
        while conn.recv()[0] == "hold":
            lease = await gpu.acquire(LeaseRequest("transcription", "batch", wait_s=30))
            conn.send("holding")
            seen = await asyncio.to_thread(_seen_yield, lease)
            await lease.release()
            conn.send(seen)
        await gpu.aclose()

    asyncio.run(run())


def yield_asker_role(conn: Any, url: str, token: str) -> None:
    token = service_token("llm")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        while conn.recv()[0] == "ask":
            sent = time.monotonic()
            grant = http.post("/v1/leases", json={"holder": "llm", "priority": "interactive", "wait_ms": 30000})
            http.delete(f"/v1/leases/{grant.json()['lease_id']}")
            conn.send(sent)


def ours_yield_signals(url: str, token: str, n: int) -> list[float]:
    holder = _Role(yield_holder_role, url, token)
    asker = _Role(yield_asker_role, url, token)
    samples = []
    try:
        for _ in range(n):
            assert holder.ask("hold") == "holding"
            sent = asker.ask("ask")
            samples.append(holder.recv() - sent)
    finally:
        holder.close()
        asker.close()
    return samples


def ours_contender(url: str, token: str, seconds: float, start_at: float, out: Any) -> None:
    async def run() -> int:
        count = 0
        holder = service_token(f"c{os.getpid()}")
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {holder}"}, timeout=60) as http:
            while time.monotonic() < start_at:
                await asyncio.sleep(0.001)
            end = start_at + seconds
            while time.monotonic() < end:
                body = {"holder": f"c{os.getpid()}", "priority": "batch", "wait_ms": 10000}
                response = await http.post("/v1/leases", json=body)
                if response.status_code == 201:
                    count += 1
                    await http.delete(f"/v1/leases/{response.json()['lease_id']}")
        return count

    out.put(asyncio.run(run()))


# -- redis-py's Lock, defaults ------------------------------------------------------------


def lock_round_trips(redis_url: str, n: int) -> list[float]:
    client = redis.Redis.from_url(redis_url)
    samples = []
    for _ in range(n):
        lock = client.lock(LOCK_NAME, timeout=15)
        start = time.monotonic()
        lock.acquire()
        lock.release()
        samples.append(time.monotonic() - start)
    client.close()
    return samples


def lock_contender(redis_url: str, seconds: float, start_at: float, out: Any) -> None:
    client = redis.Redis.from_url(redis_url)
    count = 0
    while time.monotonic() < start_at:
        time.sleep(0.001)
    end = start_at + seconds
    while time.monotonic() < end:
        lock = client.lock(LOCK_NAME, timeout=15)
        if lock.acquire(blocking_timeout=10):
            count += 1
            lock.release()
    out.put(count)


def contend(target: Any, args: tuple[Any, ...], clients: int, seconds: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start_at = time.monotonic() + 3.0  # every process started and connected
    procs = [ctx.Process(target=target, args=(*args, seconds, start_at, out)) for _ in range(clients)]
    for proc in procs:
        proc.start()
    counts = sorted(out.get(timeout=seconds + 60) for _ in procs)
    for proc in procs:
        proc.join()
    total = sum(counts)
    return {
        "grants_per_s": round(total / seconds, 1),
        "per_client": counts,
        "min_share": round(counts[0] / total, 3) if total else 0,
    }


# -- main ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--handoffs", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    token = dev_token()
    with tempfile.TemporaryDirectory() as tmp, coordinated(Path(tmp)) as (server, coordinator):
        print(f"redis {server.url}, coordinator {coordinator.url}; {os.cpu_count()} cores", file=sys.stderr)
        ours_rt = ours_round_trips(coordinator.url, args.iterations)
        lock_rt = lock_round_trips(server.url, args.iterations)
        ours_ho = ours_handoffs(coordinator.url, token, args.handoffs)
        lock_ho = lock_handoffs(server.url, args.handoffs)
        ours_ys = ours_yield_signals(coordinator.url, token, args.handoffs)
        ours_gps = contend(ours_contender, (coordinator.url, token), args.clients, args.seconds)
        lock_gps = contend(lock_contender, (server.url,), args.clients, args.seconds)

    results: dict[str, Any] = {
        "round_trip": {"baton": summary_ms(ours_rt), "redis_lock": summary_ms(lock_rt)},
        "handoff": {"baton": summary_ms(ours_ho), "redis_lock": summary_ms(lock_ho)},
        "yield_signal": {"baton": summary_ms(ours_ys), "redis_lock": None},
        "contended": {"clients": args.clients, "seconds": args.seconds, "baton": ours_gps, "redis_lock": lock_gps},
    }
    rows = [["figure", "baton p50", "baton p99", "Lock p50", "Lock p99", "Lock/baton p50", "Lock/baton p99"]]
    for name, label in (
        ("round_trip", "acquire+release (uncontended)"),
        ("handoff", "handoff (release -> next grant)"),
    ):
        ours, lock = results[name]["baton"], results[name]["redis_lock"]
        times = [f"{figures[q]:.2f} ms" for figures in (ours, lock) for q in ("p50_ms", "p99_ms")]
        rows.append([label, *times, ratio(lock["p50_ms"], ours["p50_ms"]), ratio(lock["p99_ms"], ours["p99_ms"])])
    ys = results["yield_signal"]["baton"]
    label = "yield signal (request -> holder sees it)"
    rows.append([label, f"{ys['p50_ms']:.2f} ms", f"{ys['p99_ms']:.2f} ms", "n/a", "n/a", "", ""])
    print(table(rows))
    print()
    speed = ratio(ours_gps["grants_per_s"], lock_gps["grants_per_s"])
    print(
        f"{args.clients} contending processes for {args.seconds:g} s: baton {ours_gps['grants_per_s']} grants/s "
        f"(smallest share {ours_gps['min_share']:.1%}), Lock {lock_gps['grants_per_s']} grants/s "
        f"(smallest share {lock_gps['min_share']:.1%}); baton/Lock = {speed}"
    )
    print(
        f"targets: handoff p99 < 5 ms: {'met' if results['handoff']['baton']['p99_ms'] < 5 else 'NOT met'}; "
        f"yield signal p99 < 10 ms: {'met' if ys['p99_ms'] < 10 else 'NOT met'}"
    )
    print(f"written to {save('coordinator', results)}")


if __name__ == "__main__":
    main()
