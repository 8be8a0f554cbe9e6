"""What every service shares, shown on the lightest one: per-user limits that hold
across processes (in Redis), the audit log, and what users are shown (/v1/info,
/openapi.json). Two coordinator processes on one Redis stand for two services."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from harness.servers import RedisServer, ServiceProcess
from tests.conftest import Mint
from tests.services.coordinator.conftest import Api, Events, StartCoordinator

pytestmark = pytest.mark.slow

ApiFactory = Callable[[ServiceProcess], Api]
EventsFor = Callable[[ServiceProcess], Events]


@pytest.fixture
def guarded(
    start_coordinator: StartCoordinator, redis_server: RedisServer, key_prefix: str
) -> tuple[ServiceProcess, ServiceProcess]:
    env = {
        "BATON_REDIS_URL": redis_server.url,
        "BATON_KEY_PREFIX": key_prefix,
        "BATON_LIMIT_RPM": "6",
        "BATON_LIMIT_STREAMS": "2",
    }
    return start_coordinator(env_extra=env), start_coordinator(env_extra=env)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def audit(service: ServiceProcess, admin: str, kind: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{service.url}/v1/audit", params={"kind": kind}, headers=bearer(admin))
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


def test_requests_per_minute_hold_across_processes(guarded: tuple[ServiceProcess, ServiceProcess], mint: Mint) -> None:
    one, two = guarded
    alice, bob = bearer(mint("gpu", sub="alice")), bearer(mint("gpu", sub="bob"))
    for service in (one, two, one, two, one, two):  # six, spread over both processes
        assert httpx.get(f"{service.url}/v1/gpu", headers=alice).status_code == 200
    refused = httpx.get(f"{two.url}/v1/gpu", headers=alice)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limited"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert httpx.get(f"{one.url}/v1/gpu", headers=bob).status_code == 200  # per user
    llm = bearer(mint("gpu", sub="service:llm"))  # services are not limited
    assert all(httpx.get(f"{one.url}/v1/gpu", headers=llm).status_code == 200 for _ in range(8))

    admin = mint("admin", sub="ops")
    [hit] = audit(one, admin, "rate_limited")[:1]
    assert hit["subject"] == "alice" and hit["status"] == 429 and hit["code"] == "rate_limited"


@contextlib.asynccontextmanager
async def watching(http: httpx.AsyncClient, url: str) -> AsyncIterator[httpx.Response]:
    async with http.stream("GET", f"{url}/v1/events") as response:
        yield response


async def test_streams_per_user_hold_across_processes(
    guarded: tuple[ServiceProcess, ServiceProcess], mint: Mint
) -> None:
    one, two = guarded
    async with (
        httpx.AsyncClient(headers=bearer(mint("gpu", sub="carol")), timeout=30) as carol,
        httpx.AsyncClient(headers=bearer(mint("gpu", sub="dave")), timeout=30) as dave,
    ):
        async with watching(carol, one.url) as first, watching(carol, two.url) as second:
            assert first.status_code == second.status_code == 200
            third = await carol.get(f"{one.url}/v1/events")
            assert third.status_code == 429
            assert third.json()["error"]["code"] == "too_many_streams" and "Retry-After" in third.headers
            async with watching(dave, two.url) as theirs:  # another user's count is their own
                assert theirs.status_code == 200
        # Closed streams give their slots back (once the service has seen the client go).
        async with asyncio.timeout(20):
            while True:
                async with watching(carol, one.url) as again, watching(carol, two.url) as and_again:
                    if again.status_code == and_again.status_code == 200:
                        break
                await asyncio.sleep(0.1)


def test_users_see_less_and_the_audit_log_records_refusals(
    guarded: tuple[ServiceProcess, ServiceProcess], mint: Mint
) -> None:
    one, _ = guarded
    user, admin = mint("gpu", sub="erin"), mint("admin", sub="ops")

    shown = httpx.get(f"{one.url}/v1/info", headers=bearer(user)).json()
    assert set(shown) == {"service", "version", "limits"}
    assert shown["limits"]["requests_per_minute"] == 6
    full = httpx.get(f"{one.url}/v1/info", headers=bearer(admin)).json()
    assert {"redis_url", "max_ttl_ms", "yield_grace_ms"} <= set(full)

    assert httpx.get(f"{one.url}/openapi.json", headers=bearer(user)).status_code == 403
    document = httpx.get(f"{one.url}/openapi.json", headers=bearer(admin)).json()
    lease = document["paths"]["/v1/leases"]["post"]
    assert {"400", "401", "403", "429", "503"} <= set(lease["responses"]) and "422" not in lease["responses"]
    assert lease["responses"]["400"]["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/Error"
    assert lease["security"] == [{"bearer": []}]
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "text/plain" in document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "security" not in document["paths"]["/health"]["get"]
    assert httpx.get(f"{one.url}/v1/audit", headers=bearer(user)).status_code == 403

    forged = user[:-4] + ("AAAA" if not user.endswith("AAAA") else "BBBB")
    assert httpx.get(f"{one.url}/v1/gpu", headers=bearer(forged)).status_code == 401
    assert (
        httpx.post(
            f"{one.url}/v1/leases", json={"holder": "llm", "priority": "interactive"}, headers=bearer(user)
        ).status_code
        == 403
    )

    refused = audit(one, admin, "token_refused")
    assert refused and refused[0]["path"] == "/v1/gpu" and refused[0]["source"] == "127.0.0.1"
    assert refused[0]["reason"] and all(forged not in str(event) for event in refused)
    forbidden = audit(one, admin, "forbidden")
    assert any(e["subject"] == "erin" and e["path"] == "/v1/leases" for e in forbidden)
    bad = httpx.get(f"{one.url}/v1/audit", params={"kind": "nope"}, headers=bearer(admin))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "kind"


async def test_a_revoked_lease_is_in_the_audit_log(
    start_coordinator: StartCoordinator,
    redis_server: RedisServer,
    key_prefix: str,
    api_factory: ApiFactory,
    events_for: EventsFor,
    mint: Mint,
) -> None:
    env = {"BATON_REDIS_URL": redis_server.url, "BATON_KEY_PREFIX": key_prefix}
    coordinator = start_coordinator(env_extra=env, yield_grace_ms=200)
    api = api_factory(coordinator)
    async with events_for(coordinator) as events:
        stubborn = (await api.acquire("transcription", "batch")).json()
        waiting = asyncio.ensure_future(api.acquire("llm", wait_ms=30000))
        await events.wait_for(lambda e: e["type"] == "revoked" and e["fence"] == stubborn["fence"])
        waiting.cancel()
    async with asyncio.timeout(10):
        while not (found := audit(coordinator, mint("admin", sub="ops"), "lease_revoked")):
            await asyncio.sleep(0.05)
    assert found[0]["holder"] == "transcription" and found[0]["fence"] == stubborn["fence"]
