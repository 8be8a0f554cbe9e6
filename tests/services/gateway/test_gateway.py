"""The gateway against real HTTP servers on loopback: the routing table, streams passed
through unbuffered, a client's disconnect passed on, headers untouched, the models
merged, and errors in the envelope without an address."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from harness.routes import walk
from harness.servers import REPO_ROOT, UvicornThread, free_port
from services.gateway.app import create_app
from services.gateway.parts import build
from services.gateway.proxy import Proxy
from services.gateway.routes import ROUTES, service_for
from services.gateway.settings import GatewaySettings
from shared.openapi import honest_openapi


@pytest.mark.parametrize(
    ("path", "service"),
    [
        ("/v1/chat/completions", "llm"),
        ("/chat", "llm"),
        ("/chat/stream", "llm"),
        ("/v1/sql", "llm"),
        ("/v1/conversations/abc", "llm"),
        ("/v1/audio/transcriptions", "transcription"),
        ("/v1/jobs", "transcription"),
        ("/v1/jobs/j1/events", "transcription"),
        ("/v1/embeddings", "rag"),
        ("/v1/documents/d1", "rag"),
        ("/v1/segments", "rag"),
        ("/v1/query", "rag"),
        ("/v1/stats", "rag"),
        ("/v1/leases/l1/renew", "coordinator"),
        ("/v1/waiters/w1", "coordinator"),
        ("/v1/gpu", "coordinator"),
        ("/v1/events", "coordinator"),
        ("/v1/history", "coordinator"),
        ("/v1/jobsx", None),
        ("/chatty", None),
        ("/v1/gpu/x", None),
        ("/v1/info", None),
        ("/metrics", None),
    ],
)
def test_the_routing_table(path: str, service: str | None) -> None:
    assert service_for(path) == service


def test_the_api_docs_list_every_route() -> None:
    docs = (REPO_ROOT / "docs" / "api.md").read_text()
    section = docs[docs.index("## One address: the gateway") :]
    section = section[: section.index("\n## ")]
    for route in ROUTES:
        assert f"`{route.path}" in section, route.path


def test_no_path_is_routed_twice() -> None:
    paths = [r.path for r in ROUTES]
    assert len(paths) == len(set(paths))
    for route in ROUTES:
        others = {r.service for r in ROUTES if r.matches(route.path)}
        assert others == {route.service}, route


class Upstream:
    """A stand-in service: what it was sent, and a stream the test releases piece by piece."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[dict[str, str]] = []
        self.release = threading.Event()
        self.stream_closed = threading.Event()
        app = FastAPI()

        @app.get("/ready")
        async def ready() -> dict[str, str]:
            return {"status": "ready"}

        @app.get("/v1/models")
        async def models(request: Request) -> JSONResponse:
            if request.headers.get("authorization") != "Bearer good":
                return JSONResponse({"error": {"message": "no"}}, status_code=401)
            return JSONResponse({"object": "list", "data": [{"id": f"{name}-model", "object": "model"}]})

        @app.get("/v1/models/{model_id}")
        async def model(model_id: str, request: Request) -> JSONResponse:
            if request.headers.get("authorization") != "Bearer good":
                return JSONResponse({"error": {"message": "no"}}, status_code=401)
            if model_id != f"{name}-model":
                return JSONResponse({"error": {"code": "model_not_found"}}, status_code=404)
            return JSONResponse({"id": model_id, "object": "model", "created": 1})

        @app.api_route("/{path:path}", methods=["GET", "POST", "DELETE"])
        async def anything(path: str, request: Request) -> StreamingResponse:
            body = await request.body()
            self.seen.append({"path": "/" + path, "query": request.url.query, "body": body.decode(), **request.headers})

            async def pieces() -> AsyncIterator[bytes]:
                try:
                    yield b"data: first\n\n"
                    while not self.release.is_set():  # the test holds the rest back
                        await asyncio.sleep(0.01)
                    yield b"data: second\n\n"
                finally:
                    self.stream_closed.set()

            return StreamingResponse(pieces(), media_type="text/event-stream", headers={"X-From": name})

        self.server = UvicornThread(app)


@pytest.fixture(scope="module")
def upstreams() -> Iterator[dict[str, Upstream]]:
    made = {name: Upstream(name) for name in ("llm", "coordinator", "transcription", "rag")}
    for upstream in made.values():
        upstream.server.__enter__()
    yield made
    for upstream in made.values():
        upstream.server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def gateway(upstreams: dict[str, Upstream]) -> Iterator[str]:
    settings = GatewaySettings.model_validate({f"{name}_url": u.server.url for name, u in upstreams.items()})
    with UvicornThread(create_app(settings)) as server:
        yield server.url


def test_a_stream_passes_through_unbuffered_with_its_headers(gateway: str, upstreams: dict[str, Upstream]) -> None:
    jobs = upstreams["transcription"]
    jobs.release.clear()
    headers = {"Authorization": "Bearer abc.def", "X-Request-ID": "req-0123456789abcdef"}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{gateway}/v1/jobs/j1/events?after=3", headers=headers, content=b"hello") as answer,
    ):
        lines = answer.iter_lines()
        assert next(lines) == "data: first"  # before the service has sent the rest
        jobs.release.set()
        assert [line for line in lines if line] == ["data: second"]
    assert answer.headers["x-from"] == "transcription"
    assert answer.headers["content-type"].startswith("text/event-stream")
    assert answer.headers.get_list("x-request-id") == ["req-0123456789abcdef"]
    seen = jobs.seen[-1]
    assert seen["path"] == "/v1/jobs/j1/events" and seen["query"] == "after=3" and seen["body"] == "hello"
    assert seen["authorization"] == "Bearer abc.def" and seen["x-request-id"] == "req-0123456789abcdef"


def test_a_client_that_leaves_closes_the_upstream_stream(gateway: str, upstreams: dict[str, Upstream]) -> None:
    llm = upstreams["llm"]
    llm.release.clear()
    llm.stream_closed.clear()
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", f"{gateway}/v1/chat/completions", content=b"{}") as answer,
    ):
        assert next(answer.iter_lines()) == "data: first"
    # The client is gone while the service still holds its second piece back.
    assert llm.stream_closed.wait(10), "the service never saw the client leave"
    llm.release.set()


def test_models_are_merged_and_the_llms_refusal_is_the_answer(gateway: str) -> None:
    merged = httpx.get(f"{gateway}/v1/models", headers={"Authorization": "Bearer good"}).json()
    assert [m["id"] for m in merged["data"]] == ["llm-model", "transcription-model", "rag-model"]
    refused = httpx.get(f"{gateway}/v1/models", headers={"Authorization": "Bearer bad"})
    assert refused.status_code == 401 and refused.json() == {"error": {"message": "no"}}


def test_a_model_is_retrieved_from_the_service_that_serves_it(gateway: str) -> None:
    good = {"Authorization": "Bearer good"}
    for name in ("llm", "transcription", "rag"):
        found = httpx.get(f"{gateway}/v1/models/{name}-model", headers=good)
        assert found.status_code == 200 and found.json()["id"] == f"{name}-model"
    missing = httpx.get(f"{gateway}/v1/models/gpt-9", headers=good)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    refused = httpx.get(f"{gateway}/v1/models/llm-model", headers={"Authorization": "Bearer bad"})
    assert refused.status_code == 401


def test_an_unknown_path_is_404_in_the_envelope(gateway: str) -> None:
    answer = httpx.get(f"{gateway}/v1/nothing")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"


def test_a_service_that_is_down_is_503_with_retry_after_and_without_its_address(upstreams: dict[str, Upstream]) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    urls = {f"{name}_url": u.server.url for name, u in upstreams.items()} | {"rag_url": closed}
    with UvicornThread(create_app(GatewaySettings.model_validate(urls))) as server:
        answer = httpx.post(f"{server.url}/v1/embeddings", json={"input": "x"})
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "service_unavailable"
        assert answer.headers["retry-after"] == "1"
        assert "127.0.0.1" not in answer.text and closed.rsplit(":", 1)[1] not in answer.text
        ready = httpx.get(f"{server.url}/ready").json()
        assert ready["status"] == "ready" and ready["services"]["rag"] == "not ready"
        assert ready["services"]["llm"] == "ready"


class CannedProxy(Proxy):
    """A proxy whose services answer from a table, so the gateway's own routes run in
    this process without a service listening anywhere."""

    def __init__(self, answers: dict[tuple[str, str], tuple[int, Any]]) -> None:
        super().__init__({name: "http://services.invalid" for name in ("llm", "transcription", "rag")}, 1.0)
        self.answers = answers

    async def get_json(self, service: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
        return self.answers.get((service, path), (502, None))


async def test_the_gateway_built_from_parts_uses_the_proxy_it_is_given() -> None:
    listed = {"object": "list", "data": [{"id": "gemma", "object": "model"}]}
    proxy = CannedProxy({("llm", "/v1/models"): (200, listed), ("llm", "/ready"): (200, {"status": "ready"})})
    app = create_app(build(GatewaySettings(), proxy=proxy))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http,
    ):
        assert (await http.get("/v1/models")).json()["data"] == listed["data"]
        states = (await http.get("/ready")).json()["services"]
        assert states["llm"] == "ready" and states["rag"] == "not ready"
    assert proxy.client.is_closed  # the app's end closed the parts it was given


async def test_every_route_of_the_gateways_own_answers_in_process_as_documented() -> None:
    """Its own routes, each asked once through the app built from parts, every service
    down: a model list it cannot ask for is 503 in the envelope (it was a bare 502 ``{}``),
    and a model it cannot look up is 503, not a guess of 404."""
    app = create_app(build(GatewaySettings(), proxy=CannedProxy({})))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http,
    ):
        answers = await walk(http, honest_openapi(app))
        down = await http.get("/v1/models/gemma")
    assert {(a.method, a.path) for a in answers} == {
        ("GET", "/health"),
        ("GET", "/ready"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/{model_id}"),
    }
    assert [a for a in answers if (a.status >= 500 and a.status != 503) or not a.as_documented] == []
    assert {a.path: a.status for a in answers}["/v1/models"] == 503
    assert down.status_code == 503 and down.json()["error"]["code"] == "service_unavailable"
    assert down.headers["retry-after"] == "1" and "services.invalid" not in down.text
