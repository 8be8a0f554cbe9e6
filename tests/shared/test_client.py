"""The service client retries only what cannot happen twice."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from harness.servers import UvicornThread, free_port
from shared.client import ServiceClient, ServiceUnreachable


@pytest.fixture(scope="module")
def flaky() -> Iterator[tuple[UvicornThread, dict[str, int]]]:
    """Answers 503 to the first two calls of each path, then 200."""
    hits: dict[str, int] = {}
    app = FastAPI()

    @app.api_route("/{name}", methods=["GET", "POST"])
    async def handler(name: str, request: Request) -> JSONResponse:
        hits[name] = hits.get(name, 0) + 1
        seen = {"auth": request.headers.get("authorization"), "rid": request.headers.get("x-request-id")}
        if hits[name] <= 2:
            return JSONResponse({"error": "busy"}, status_code=503)
        return JSONResponse({"hits": hits[name], **seen})

    with UvicornThread(app) as server:
        yield server, hits


async def test_idempotent_requests_are_retried_on_503(flaky: tuple[UvicornThread, dict[str, int]]) -> None:
    server, _ = flaky
    client = ServiceClient(server.url, token=lambda: "tok", backoff_s=0.01)
    response = await client.request("GET", "/get-thing")
    await client.aclose()
    assert response.status_code == 200
    assert response.json()["hits"] == 3
    assert response.json()["auth"] == "Bearer tok"


async def test_posts_are_not_retried_unless_declared_idempotent(flaky: tuple[UvicornThread, dict[str, int]]) -> None:
    server, hits = flaky
    client = ServiceClient(server.url, backoff_s=0.01)
    first = await client.request("POST", "/create-thing", json={})
    assert first.status_code == 503
    assert hits["create-thing"] == 1
    query = await client.request("POST", "/query-thing", json={}, idempotent=True)
    assert query.status_code == 200
    await client.aclose()


async def test_connection_refused_is_retried_then_reported() -> None:
    client = ServiceClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.01)
    with pytest.raises(ServiceUnreachable):
        await client.request("POST", "/anything", json={})
    await client.aclose()
