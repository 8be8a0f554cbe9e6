"""One error envelope: validation, unknown routes, body limits, crashes, failed streams."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field

from harness.servers import UvicornThread
from shared.auth import TokenVerifier
from shared.errors import BadRequest
from shared.metrics import Metrics
from shared.settings import AuthSettings
from shared.sse import frame, sse_response
from shared.web import Auth, create_service_app
from tests.conftest import Mint

ENVELOPE_KEYS = {"message", "type", "param", "code"}


class Item(BaseModel):
    name: str = Field(min_length=1)
    count: int = Field(ge=1, le=10)


def build_app(settings: AuthSettings) -> FastAPI:
    auth = Auth(TokenVerifier(settings))
    app = create_service_app(name="errtest", auth=auth, metrics=Metrics("errtest"), max_body_bytes=1024)
    user = [Depends(auth.require())]

    @app.post("/items", dependencies=user)
    async def create(item: Item) -> Item:
        return item

    @app.get("/items/{name}", dependencies=user)
    async def read(name: str) -> Item:
        return Item(name=name, count=1)

    @app.delete("/items/{name}", dependencies=user, status_code=204)
    async def delete(name: str) -> None:
        return None

    @app.get("/boom", dependencies=user)
    async def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    @app.get("/stream", dependencies=user)
    async def stream(fail: str = "none"):
        async def frames() -> AsyncIterator[str]:
            yield frame({"n": 1})
            if fail == "api":
                raise BadRequest("the model refused", code="refused")
            if fail == "crash":
                raise RuntimeError("kaboom")
            yield "data: [DONE]\n\n"

        return sse_response(frames())

    return app


@pytest.fixture(scope="module")
def server(auth_settings: AuthSettings) -> Iterator[UvicornThread]:
    with UvicornThread(build_app(auth_settings)) as running:
        yield running


@pytest.fixture
def http(server: UvicornThread, mint: Mint) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {mint()}"}) as client:
        yield client


def envelope_of(response: httpx.Response) -> dict[str, object]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == ENVELOPE_KEYS
    return body["error"]


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"name": "", "count": 1}, "name"),
        ({"name": "a", "count": 0}, "count"),
        ({"count": 1}, "name"),
        ({"name": "a", "count": "many"}, "count"),
    ],
)
def test_validation_errors_are_400_envelopes(http: httpx.Client, payload: dict[str, object], param: str) -> None:
    response = http.post("/items", json=payload)
    assert response.status_code == 400
    error = envelope_of(response)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "detail" not in response.text


def test_invalid_json_and_invalid_utf8(http: httpx.Client) -> None:
    for body in (b'{"name": ', b'{"name": "\xff\xfe", "count": 1}'):
        response = http.post("/items", content=body, headers={"content-type": "application/json"})
        assert response.status_code == 400
        assert envelope_of(response)["type"] == "invalid_request_error"


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert envelope_of(http.get("/nope"))["type"] == "not_found_error"
    response = http.delete("/items")
    assert response.status_code == 405
    envelope_of(response)


def test_405_names_every_method_of_the_path(http: httpx.Client) -> None:
    response = http.options("/items/pen")
    assert response.status_code == 405
    assert response.headers["allow"] == "DELETE, GET"
    envelope_of(response)


@pytest.mark.parametrize(
    "raw",
    [
        b"GET /items/pen HTTP/1.1\r\nHost: x\r\nX-Note: a\x00b\r\n\r\n",
        b"GET /items/pen HTTP/1.1\r\nHost: x\r\nX-Note\xff: b\r\n\r\n",
        b"GET /items/pen HTTP/9.9 and more\r\n\r\n",
    ],
    ids=["nul-in-value", "0xff-in-name", "request-line"],
)
def test_bytes_that_are_not_http_get_the_envelope(server: UvicornThread, raw: bytes) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert set(error) == ENVELOPE_KEYS and error["code"] == "malformed_request"


def test_body_over_the_limit_is_413(http: httpx.Client) -> None:
    response = http.post("/items", json={"name": "x" * 2000, "count": 1})
    assert response.status_code == 413
    assert envelope_of(response)["code"] == "payload_too_large"


def test_body_over_the_limit_without_content_length_is_413(http: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'", "count": 1}'

    response = http.post("/items", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    envelope_of(response)


def test_crash_is_a_500_envelope_without_internals(http: httpx.Client) -> None:
    response = http.get("/boom")
    assert response.status_code == 500
    error = envelope_of(response)
    assert error["type"] == "server_error"
    assert response.headers["x-request-id"] in str(error["message"])
    assert "hunter2" not in response.text and "Traceback" not in response.text


@pytest.mark.parametrize(("fail", "code"), [("api", "refused"), ("crash", "internal_error")])
def test_a_stream_that_fails_ends_with_an_error_event_then_done(http: httpx.Client, fail: str, code: str) -> None:
    response = http.get("/stream", params={"fail": fail})
    assert response.status_code == 200
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[0] == '{"n": 1}'
    assert f'"code": "{code}"' in events[1]
    assert events[-1] == "[DONE]"
    assert "kaboom" not in response.text


def test_request_id_is_echoed(http: httpx.Client) -> None:
    response = http.get("/v1/info", headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    generated = http.get("/v1/info", headers={"X-Request-ID": "bad id with spaces"})
    assert generated.headers["x-request-id"] != "bad id with spaces"
