"""The coordinator on a real Redis: its lease manager alone on a test clock
(``leases``: the policy's grace periods stepped through, never waited out), its app
served in this process over real HTTP (``serve_coordinator``: a thread, started in
milliseconds), or a real process (``start_coordinator``) for the tests about processes
(restarts, limits across processes); and helpers to drive them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.servers import RedisServer, Served, ServiceProcess, UvicornThread
from services.coordinator.app import create_app
from services.coordinator.leases import Grant, LeaseManager
from services.coordinator.settings import CoordinatorSettings
from shared.events import EventBus, Subscription
from shared.gpu import GpuClient
from shared.settings import AuthSettings
from shared.sse_reader import aread_events
from shared.store import open_redis
from tests.conftest import Mint

StartCoordinator = Callable[..., ServiceProcess]


@pytest.fixture
def start_coordinator(redis_server: RedisServer, key_prefix: str, log_dir: Path) -> Iterator[StartCoordinator]:
    started: list[ServiceProcess] = []

    def start(
        redis_url: str | None = None,
        port: int | None = None,
        env_extra: dict[str, str] | None = None,
        **settings: object,
    ) -> ServiceProcess:
        env = {
            "COORDINATOR_REDIS_URL": redis_url or redis_server.url,
            "COORDINATOR_KEY_PREFIX": key_prefix,
            # Tests name holders freely (a, b, w1...): let any service ask for interactive.
            "COORDINATOR_OTHER_SERVICES": "interactive",
        }
        env.update({f"COORDINATOR_{name.upper()}": str(value) for name, value in settings.items()})
        env.update(env_extra or {})
        service = ServiceProcess("coordinator", env, log_dir, port=port).start()
        started.append(service)
        return service

    yield start
    for service in started:
        service.stop()


class Clock:
    """A test's time in milliseconds: it moves only when the test moves it."""

    def __init__(self) -> None:
        self.ms = int(time.time() * 1000)

    def __call__(self) -> int:
        return self.ms


class Leases:
    """One ``LeaseManager`` on the real Redis and the real script, timed by a ``Clock``."""

    def __init__(self, manager: LeaseManager, clock: Clock) -> None:
        self.manager = manager
        self.clock = clock
        self.waiting: list[asyncio.Task[Grant]] = []

    async def advance(self, ms: int) -> None:
        """Move the clock, then run the script as the manager's timer would at a deadline."""
        self.clock.ms += ms
        await self.manager.tick()

    async def until(self, at_s: float) -> None:
        """Move the clock to ``at_s`` (a timestamp the manager gave, in seconds)."""
        await self.advance(round(at_s * 1000) - self.clock.ms)

    async def acquire(self, holder: str, priority: str = "interactive", ttl_ms: int = 60000) -> Grant:
        return await self.manager.acquire(holder, priority, ttl_ms, wait_ms=0)  # type: ignore[arg-type]

    async def enqueue(self, holder: str, priority: str, position: int, ttl_ms: int = 60000) -> asyncio.Task[Grant]:
        """A waiting acquire, once it is queued at ``position`` (1-based)."""
        task = asyncio.create_task(self.manager.acquire(holder, priority, ttl_ms, wait_ms=60000))  # type: ignore[arg-type]
        self.waiting.append(task)
        async with asyncio.timeout(10):
            while len(await self.queue()) != position:
                await asyncio.sleep(0)
        return task

    async def queue(self) -> list[str]:
        return [waiter["holder"] for waiter in (await self.manager.status())["queue"]]

    async def holder(self) -> str | None:
        found: str | None = (await self.manager.status())["holder"]
        return found


async def next_event(events: Subscription, kind: str) -> dict[str, Any]:
    """The next event of ``kind`` on a subscription of the manager's bus."""
    async with asyncio.timeout(10):
        while (event := await events.get()) is not None:
            if event["type"] == kind:
                return event
    raise AssertionError(f"the bus ended before a {kind} event")


MakeLeases = Callable[..., Awaitable[Leases]]


@pytest.fixture
async def leases(redis_server: RedisServer, key_prefix: str, auth_settings: AuthSettings) -> AsyncIterator[MakeLeases]:
    """``leases(**settings)``: a started manager on a test clock. A waiter's heartbeat
    lasts a minute of that clock, so the steps a test takes never drop it."""
    made: list[Leases] = []
    redis = open_redis(redis_server.url, 5.0)

    async def make(**settings: Any) -> Leases:
        defaults: dict[str, Any] = {"waiter_heartbeat_ms": 60000, "other_services": "interactive"}
        chosen = CoordinatorSettings(
            auth=auth_settings, redis_url=redis_server.url, key_prefix=key_prefix, **(defaults | settings)
        )
        clock = Clock()
        manager = LeaseManager(redis, chosen, EventBus(), clock=clock)
        await manager.start()
        made.append(Leases(manager, clock))
        return made[-1]

    yield make
    for gpu in made:
        for task in gpu.waiting:  # a test that failed may leave one waiting
            task.cancel()
        await asyncio.gather(*gpu.waiting, return_exceptions=True)
        await gpu.manager.stop()
    await redis.aclose()


ServeCoordinator = Callable[..., Served]


@pytest.fixture
def serve_coordinator(
    redis_server: RedisServer, key_prefix: str, auth_settings: AuthSettings
) -> Iterator[ServeCoordinator]:
    """``create_app(settings)`` on loopback in a thread of the test process: the same app
    and the same HTTP as the process, without starting Python again."""
    served: list[UvicornThread] = []

    def serve(redis_url: str | None = None, **settings: Any) -> Served:
        # Tests name holders freely (a, b, w1...): let any service ask for interactive.
        settings = {"other_services": "interactive"} | settings
        chosen = CoordinatorSettings(
            auth=auth_settings, redis_url=redis_url or redis_server.url, key_prefix=key_prefix, **settings
        )
        server = UvicornThread(create_app(chosen)).__enter__()
        served.append(server)
        return server

    yield serve
    for server in served:
        server.__exit__()


@pytest.fixture
def gpu_token(mint: Mint) -> str:
    return mint("gpu", sub="service:test")


class Api:
    """The coordinator's HTTP API, one call per method (async). Each holder acquires
    with a token of its own service (only services hold, under their own name)."""

    def __init__(self, url: str, token: str, mint: Mint) -> None:
        self.url = url
        self.mint = mint
        self.http = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    async def acquire(
        self, holder: str, priority: str = "interactive", wait_ms: int = 0, **extra: object
    ) -> httpx.Response:
        return await self.http.post(
            "/v1/leases",
            json={"holder": holder, "priority": priority, "wait_ms": wait_ms, **extra},
            headers={"Authorization": f"Bearer {self.mint('gpu', sub=f'service:{holder}')}"},
        )

    async def renew(self, lease_id: str) -> httpx.Response:
        return await self.http.post(f"/v1/leases/{lease_id}/renew")

    async def release(self, lease_id: str, **params: str | float) -> httpx.Response:
        return await self.http.delete(f"/v1/leases/{lease_id}", params=params)

    async def gpu(self) -> dict[str, Any]:
        response = await self.http.get("/v1/gpu")
        assert response.status_code == 200, response.text
        return response.json()

    async def history(self, limit: int = 50) -> list[dict[str, Any]]:
        response = await self.http.get("/v1/history", params={"limit": limit})
        assert response.status_code == 200, response.text
        return response.json()

    async def wait_queue(self, length: int, timeout_s: float = 10) -> dict[str, Any]:
        """Until the queue has ``length`` waiters (polls the state, never a blind sleep)."""
        async with asyncio.timeout(timeout_s):
            while True:
                state = await self.gpu()
                if len(state["queue"]) == length:
                    return state
                await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        await self.http.aclose()


@pytest.fixture
async def api_factory(gpu_token: str, mint: Mint) -> AsyncIterator[Callable[[Served], Api]]:
    made: list[Api] = []

    def make(coordinator: Served) -> Api:
        api = Api(coordinator.url, gpu_token, mint)
        made.append(api)
        return api

    yield make
    for api in made:
        await api.aclose()


@pytest.fixture
async def gpu_factory(mint: Mint) -> AsyncIterator[Callable[..., GpuClient]]:
    made: list[GpuClient] = []

    def make(coordinator: Served, holder: str, **options: Any) -> GpuClient:
        """The client of service ``holder``: it acquires as ``holder`` only."""
        token = mint("gpu", sub=f"service:{holder}")
        client = GpuClient(coordinator.url, lambda: token, **options)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


class Events:
    """Reads the coordinator's SSE stream into a list, in a background task."""

    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.token = token
        self.items: list[dict[str, Any]] = []
        self._changed = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Events:
        self._task = asyncio.create_task(self._read())
        async with asyncio.timeout(10):
            await self._subscribed.wait()
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _read(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http,
            http.stream("GET", f"{self.url}/v1/events", headers=headers) as response,
        ):
            async for event in aread_events(response.aiter_lines()):
                if event.name == "subscribed":
                    self._subscribed.set()
                else:
                    self.items.append(event.json())
                    self._changed.set()

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = 10) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                for item in self.items:
                    if predicate(item):
                        return item
                self._changed.clear()
                await self._changed.wait()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [item for item in self.items if item["type"] == kind]


@pytest.fixture
def events_for(gpu_token: str) -> Callable[[Served], Events]:
    return lambda coordinator: Events(coordinator.url, gpu_token)
