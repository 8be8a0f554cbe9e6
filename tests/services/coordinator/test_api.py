"""The coordinator's HTTP contract, against a real coordinator process and Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest

from harness.routes import misanswered, walk
from shared.gpu import GpuClient, LeaseRequest
from tests.conftest import Mint
from tests.services.coordinator.conftest import Api, Events, ServeCoordinator, Served

ApiFactory = Callable[[Served], Api]


async def test_grant_renew_release(serve_coordinator: ServeCoordinator, api_factory: ApiFactory) -> None:
    api = api_factory(serve_coordinator())
    granted = await api.acquire("llm", ttl_ms=5000)
    assert granted.status_code == 201
    grant = granted.json()
    assert set(grant) == {
        "lease_id",
        "fence",
        "holder",
        "priority",
        "ttl_ms",
        "granted_at",
        "expires_at",
        "waited_ms",
        "yield_requested",
        "vram_mb",
        "free_memory",
    }
    assert (grant["holder"], grant["priority"], grant["ttl_ms"]) == ("llm", "interactive", 5000)
    assert len(grant["lease_id"]) == 32
    assert grant["expires_at"] == pytest.approx(grant["granted_at"] + 5, abs=0.01)
    assert abs(grant["granted_at"] - time.time()) < 5

    state = await api.gpu()
    assert (state["holder"], state["fence"], state["priority"]) == ("llm", grant["fence"], "interactive")
    assert "lease_id" not in state and grant["lease_id"] not in str(state)

    renewed = await api.renew(grant["lease_id"])
    assert renewed.status_code == 200
    assert renewed.json()["fence"] == grant["fence"]
    assert renewed.json()["expires_at"] >= grant["expires_at"]
    assert renewed.json()["yield_requested"] is False

    assert (await api.release(grant["lease_id"])).status_code == 204
    assert (await api.release(grant["lease_id"])).status_code == 410
    gone = await api.renew(grant["lease_id"])
    assert gone.status_code == 410
    assert gone.json()["error"]["code"] == "released"
    assert (await api.gpu())["holder"] is None

    again = await api.acquire("transcription", "batch")
    assert again.json()["fence"] > grant["fence"]


async def test_stale_and_forged_lease_ids_leave_the_lease_alone(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory
) -> None:
    api = api_factory(serve_coordinator())
    old = (await api.acquire("old")).json()
    assert (await api.release(old["lease_id"])).status_code == 204
    current = (await api.acquire("current", ttl_ms=5000)).json()
    for lease_id in (old["lease_id"], "0" * 32, "forged", "x" * 500):
        assert (await api.renew(lease_id)).status_code == 410
        assert (await api.release(lease_id)).status_code == 410
    state = await api.gpu()
    assert (state["holder"], state["fence"]) == ("current", current["fence"])
    assert (await api.renew(current["lease_id"])).status_code == 200


async def test_wait_over_is_503_with_retry_after(serve_coordinator: ServeCoordinator, api_factory: ApiFactory) -> None:
    api = api_factory(serve_coordinator())
    assert (await api.acquire("holder")).status_code == 201
    tried_once = await api.acquire("other", wait_ms=0)
    assert tried_once.status_code == 503
    assert int(tried_once.headers["retry-after"]) >= 1
    assert tried_once.json()["error"]["code"] == "wait_over"
    started = time.monotonic()
    waited = await api.acquire("other", wait_ms=300)
    assert waited.status_code == 503
    assert time.monotonic() - started >= 0.3
    assert (await api.gpu())["queue"] == []


async def test_queue_full_is_429_with_retry_after(serve_coordinator: ServeCoordinator, api_factory: ApiFactory) -> None:
    api = api_factory(serve_coordinator(max_queue=2))
    held = (await api.acquire("holder")).json()
    waiters = [asyncio.create_task(api.acquire(f"w{i}", wait_ms=30000)) for i in range(2)]
    await api.wait_queue(2)
    full = await api.acquire("third", wait_ms=30000)
    assert full.status_code == 429
    assert int(full.headers["retry-after"]) >= 1
    assert full.json()["error"]["type"] == "rate_limit_error"
    await api.release(held["lease_id"])
    first = await waiters[0]
    await api.release(first.json()["lease_id"])
    second = await waiters[1]
    assert second.status_code == 201


async def test_a_waiter_whose_connection_drops_leaves_the_queue(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory, events_for: Callable[[Served], Events]
) -> None:
    coordinator = serve_coordinator()
    api = api_factory(coordinator)
    await api.acquire("holder")
    async with events_for(coordinator) as events:
        waiter = asyncio.create_task(api.acquire("impatient", wait_ms=60000))
        await api.wait_queue(1)
        waiter.cancel()  # closes that HTTP connection
        left = await events.wait_for(lambda e: e["type"] == "left_queue", timeout_s=2)
    assert (left["holder"], left["reason"]) == ("impatient", "disconnected")
    assert (await api.gpu())["queue"] == []


async def test_a_withdrawn_ask_leaves_the_card_free_whenever_it_was_granted(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory
) -> None:
    """``DELETE /v1/waiters/{id}``: for a holder that stopped reading its ask's answer.
    Granted already: the lease is released. Still queued: it leaves the queue. Not
    arrived yet: it is refused when it does."""
    api = api_factory(serve_coordinator())
    granted = await api.acquire("llm", waiter_id="granted-before-the-withdrawal")
    assert granted.status_code == 201
    assert (await api.http.delete("/v1/waiters/granted-before-the-withdrawal")).status_code == 204
    assert (await api.gpu())["holder"] is None
    assert (await api.history(1))[0]["end"] == "released"

    holder = (await api.acquire("transcription", "batch")).json()
    queued = asyncio.create_task(api.acquire("llm", wait_ms=60000, waiter_id="queued-then-withdrawn"))
    await api.wait_queue(1)
    assert (await api.http.delete("/v1/waiters/queued-then-withdrawn")).status_code == 204
    assert (await api.gpu())["queue"] == []
    queued.cancel()  # as its client does: it stopped reading
    await api.release(holder["lease_id"])
    assert (await api.gpu())["holder"] is None

    assert (await api.http.delete("/v1/waiters/overtaken-by-its-withdrawal")).status_code == 204
    late = await api.acquire("llm", waiter_id="overtaken-by-its-withdrawal")
    assert late.status_code == 410 and late.json()["error"]["code"] == "withdrawn"
    assert (await api.gpu())["holder"] is None
    assert (await api.http.delete("/v1/waiters/x")).status_code == 400  # not a waiter id


class UnreadGrants(httpx.AsyncBaseTransport):
    """Forwards each request; the answer to ``POST /v1/leases`` is received and never
    handed on: its caller is cancelled between the grant and reading it."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.granted = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST" and request.url.path == "/v1/leases":
            await response.aread()
            self.granted.set()
            await asyncio.Event().wait()  # until cancelled
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_client_cancelled_as_its_lease_is_granted_leaves_the_card_free(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory, gpu_factory: Callable[..., GpuClient]
) -> None:
    """The LLM asks for the card as a request arrives and takes the ask back when the
    request needs none (a cached answer, a remote backend): cancelled as the grant was
    on its way, it held the card, unused, for the lease's TTL (found: a transcription
    waited 8 s behind a chat answered by a backend)."""
    coordinator = serve_coordinator()
    api = api_factory(coordinator)
    transport = UnreadGrants()
    client = gpu_factory(coordinator, "llm", transport=transport, watch_events=False)
    asking = asyncio.create_task(client.acquire(LeaseRequest("llm", wait_s=10, ttl_ms=60000)))
    await asyncio.wait_for(transport.granted.wait(), 10)
    assert (await api.gpu())["holder"] == "llm"
    asking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asking
    await client.aclose()  # it waits for the withdrawal it sent
    assert (await api.gpu())["holder"] is None
    assert (await api.history(1))[0]["end"] == "released"


async def test_history_records_how_each_grant_ended(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory
) -> None:
    api = api_factory(serve_coordinator())
    first = (await api.acquire("a", ttl_ms=1000)).json()
    await api.release(first["lease_id"])
    second = (await api.acquire("b", "batch", ttl_ms=1000)).json()
    third = await api.acquire("c", wait_ms=5000)  # granted when b's lease expires
    assert third.status_code == 201
    history = await api.history(limit=3)
    assert [(h["fence"], h["holder"], h["end"]) for h in history] == [
        (third.json()["fence"], "c", None),
        (second["fence"], "b", "expired"),
        (first["fence"], "a", "released"),
    ]
    expired = history[1]
    assert expired["ended_at"] >= second["expires_at"] - 0.001
    assert history[0]["granted_at"] >= expired["ended_at"]
    assert set(expired) >= {"fence", "holder", "priority", "requested_at", "granted_at", "ended_at", "end"}
    assert (expired["vram_mb"], expired["handover"]) == (0, None)
    assert len(await api.history(limit=1)) == 1


async def test_events_stream_every_transition(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory, events_for: Callable[[Served], Events]
) -> None:
    coordinator = serve_coordinator()
    api = api_factory(coordinator)
    async with events_for(coordinator) as events:
        first = (await api.acquire("a")).json()
        waiter = asyncio.create_task(api.acquire("b", "batch", wait_ms=5000))
        await events.wait_for(lambda e: e["type"] == "yield_requested")
        await api.release(first["lease_id"])
        second = (await waiter).json()
        await events.wait_for(lambda e: e["type"] == "granted" and e["fence"] == second["fence"])
    kinds = [(e["type"], e["holder"]) for e in events.items]
    assert kinds[:5] == [
        ("queued", "a"),
        ("granted", "a"),
        ("queued", "b"),
        ("yield_requested", "a"),
        ("released", "a"),
    ]
    assert ("granted", "b") in kinds
    for event in events.items:
        assert {"type", "fence", "holder", "priority", "at"} <= set(event)
        assert "lease_id" not in event
    assert events.of("granted")[0]["fence"] == first["fence"]


@pytest.mark.parametrize(
    "body",
    [
        {"holder": "a", "priority": "urgent"},
        {"holder": "a", "priority": "batch", "ttl_ms": 999},
        {"holder": "a", "priority": "batch", "ttl_ms": 120001},
        {"holder": "a", "priority": "batch", "wait_ms": -1},
        {"holder": "a", "priority": "batch", "wait_ms": 300001},
        {"holder": "", "priority": "batch"},
        {"holder": "a b", "priority": "batch"},
        {"priority": "batch"},
        {"holder": "a", "priority": "batch", "x": 1},
    ],
)
async def test_bad_requests_are_400_envelopes(
    serve_coordinator: ServeCoordinator, api_factory: ApiFactory, body: dict[str, object]
) -> None:
    api = api_factory(serve_coordinator())
    response = await api.http.post("/v1/leases", json=body)
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_scopes(serve_coordinator: ServeCoordinator, mint: Mint) -> None:
    coordinator = serve_coordinator()
    body = {"holder": "a", "priority": "batch"}
    async with httpx.AsyncClient(base_url=coordinator.url) as http:
        admin = {"Authorization": f"Bearer {mint('admin')}"}
        chat = {"Authorization": f"Bearer {mint('chat')}"}
        assert (await http.post("/v1/leases", json=body, headers=admin)).status_code == 403
        assert (await http.get("/v1/gpu", headers=admin)).status_code == 200
        assert (await http.get("/v1/history", headers=admin)).status_code == 200
        assert (await http.get("/v1/gpu", headers=chat)).status_code == 403
        assert (await http.post("/v1/leases", json=body)).status_code == 401


async def test_only_services_hold_the_gpu_under_their_own_name(serve_coordinator: ServeCoordinator, mint: Mint) -> None:
    coordinator = serve_coordinator(other_services="batch")

    def as_(token: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=coordinator.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    async with (
        as_(mint("gpu", sub="alice")) as user,
        as_(mint("gpu", "admin", sub="ops")) as admin,
        as_(mint("gpu", sub="service:llm")) as llm,
        as_(mint("gpu", sub="service:scraper")) as scraper,
    ):
        for who in (user, admin):  # users watch; they never hold, whatever they claim to be
            refused = await who.post("/v1/leases", json={"holder": "transcription", "priority": "interactive"})
            assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_a_service"
            assert (await who.get("/v1/gpu")).status_code == 200
            assert (await who.get("/v1/history")).status_code == 200
        posing = await llm.post("/v1/leases", json={"holder": "transcription", "priority": "batch"})
        assert posing.status_code == 403 and posing.json()["error"]["code"] == "holder_mismatch"
        too_high = await scraper.post("/v1/leases", json={"holder": "scraper", "priority": "interactive"})
        assert too_high.status_code == 403 and too_high.json()["error"]["code"] == "priority_not_allowed"
        batch = await scraper.post("/v1/leases", json={"holder": "scraper", "priority": "batch"})
        assert batch.status_code == 201
        assert (await scraper.delete(f"/v1/leases/{batch.json()['lease_id']}")).status_code == 204
        grant = (await llm.post("/v1/leases", json={"holder": "llm", "priority": "interactive"})).json()
        assert (await user.post(f"/v1/leases/{grant['lease_id']}/renew")).status_code == 403
        assert (await user.delete(f"/v1/leases/{grant['lease_id']}")).status_code == 403
        assert (await llm.delete(f"/v1/leases/{grant['lease_id']}")).status_code == 204


async def test_every_route_answers_as_documented(serve_coordinator: ServeCoordinator, mint: Mint) -> None:
    """Each operation of /openapi.json asked once with the least a client sends (an empty
    body, ``x`` for an id), with every scope, the app served from a thread (its event
    stream never ends, which ASGITransport cannot hold): no 5xx, no 405, each status
    documented."""
    coordinator = serve_coordinator()
    headers = {"Authorization": f"Bearer {mint(sub='service:llm')}"}
    async with httpx.AsyncClient(base_url=coordinator.url, headers=headers, timeout=30) as http:
        document = (await http.get("/openapi.json")).json()
        answers = await walk(http, document)
    assert misanswered(answers, document) == []
    assert len(answers) >= 10
