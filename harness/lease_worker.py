"""A GPU holder in its own process, for the coordinator's multi-process tests.

    python -m harness.lease_worker cycles --url U --holder w1 --cycles 200 --out F
        acquire / hold / release N times; one JSON line per cycle in F:
        {"fence", "start", "end"} on CLOCK_MONOTONIC (one clock for every process).

    python -m harness.lease_worker hold --url U --holder h [--redis R --register K]
        acquire, print {"event": "acquired", "fence"}, then work every 10 ms (a fenced
        write to the register, if given) until the lease is lost; print what happened.

The token comes from JWT_SECRET in the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

import redis

from shared.auth import SCOPES, TokenIssuer
from shared.gpu import GpuClient, LeaseLost, LeaseRequest, Priority
from shared.settings import AuthSettings, load_settings

# Accept a write only if its fence is at least the highest seen: what a fenced
# resource does (Kleppmann). Every attempt is logged with its verdict.
FENCED_WRITE = """
local highest = tonumber(redis.call('GET', KEYS[1]) or '0')
local fence = tonumber(ARGV[1])
local verdict = 'refused'
if fence >= highest then
  redis.call('SET', KEYS[1], ARGV[1])
  verdict = 'accepted'
end
redis.call('RPUSH', KEYS[2], ARGV[1] .. ' ' .. ARGV[2] .. ' ' .. verdict)
return verdict
"""


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def client(url: str, ttl_ms: int, holder: str) -> GpuClient:
    issuer = TokenIssuer(load_settings(AuthSettings))
    token = issuer.mint(f"service:{holder}", SCOPES, 3600)  # only services hold, under their own name
    return GpuClient(url, lambda: token, default_ttl_ms=ttl_ms)


async def cycles(args: argparse.Namespace) -> None:
    gpu = client(args.url, args.ttl_ms, args.holder)
    rng = random.Random(args.holder)
    with open(args.out, "w") as out:
        for _ in range(args.cycles):
            priority: Priority = "interactive" if rng.random() < 0.5 else "batch"
            async with gpu.lease(LeaseRequest(args.holder, priority, wait_s=120)) as lease:
                start = time.monotonic()
                lease.check()
                time.sleep(rng.random() * 0.001)  # the "GPU work": blocks, like a kernel would
                end = time.monotonic()
            out.write(json.dumps({"fence": lease.fence, "start": start, "end": end, "holder": args.holder}) + "\n")
    await gpu.aclose()


async def hold(args: argparse.Namespace) -> None:
    gpu = client(args.url, args.ttl_ms, args.holder)
    store = redis.Redis.from_url(args.redis) if args.redis else None
    write = store.register_script(FENCED_WRITE) if store else None
    lease = await gpu.acquire(LeaseRequest(args.holder, args.priority, wait_s=60))
    say(event="acquired", fence=lease.fence, ttl_ms=lease.ttl_ms)
    writes = 0
    try:
        while True:
            lease.check()
            if write is not None:
                write(keys=[args.register, args.register + ":log"], args=[lease.fence, args.holder])
            writes += 1
            await asyncio.sleep(0.01)
    except LeaseLost as exc:
        # Give the renewal thread the moment it needs to ask the coordinator.
        for _ in range(200):
            if lease.verdict is not None:
                break
            await asyncio.sleep(0.01)
        say(event="lost", reason=str(exc), lost_reason=lease.lost_reason, verdict=lease.verdict, writes=writes)
    finally:
        await lease.release()
        await gpu.aclose()
        if store is not None:
            store.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("cycles", "hold"))
    parser.add_argument("--url", required=True)
    parser.add_argument("--holder", required=True)
    parser.add_argument("--ttl-ms", type=int, default=5000)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--out")
    parser.add_argument("--priority", default="batch")
    parser.add_argument("--redis")
    parser.add_argument("--register")
    args = parser.parse_args()
    asyncio.run(cycles(args) if args.mode == "cycles" else hold(args))


if __name__ == "__main__":
    main()
