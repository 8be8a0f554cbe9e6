"""The command-line client's HTTP: reads wait out a rate limit, uploads do not."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from baton.stack import Stack, check
from harness.servers import UvicornThread


def limited_app(refusals: int) -> tuple[FastAPI, list[str]]:
    """Refuses the first ``refusals`` requests with 429 and Retry-After: 1."""
    app = FastAPI()
    seen: list[str] = []

    @app.api_route("/v1/jobs", methods=["GET", "POST"])
    async def jobs() -> JSONResponse:
        seen.append("x")
        if len(seen) <= refusals:
            return JSONResponse(
                {"error": {"message": "more than 600 requests per minute", "type": "rate_limited"}},
                status_code=429,
                headers={"Retry-After": "1"},
            )
        return JSONResponse({"data": []})

    return app, seen


def test_a_read_waits_out_the_rate_limit() -> None:
    app, seen = limited_app(refusals=2)
    with UvicornThread(app) as server:
        stack = Stack({"transcription": server.url}, "token")
        with stack.client("transcription") as http:
            assert check(http.get("/v1/jobs"), "transcription").json() == {"data": []}
    assert len(seen) == 3


def test_an_upload_is_refused_at_once_with_the_services_reason() -> None:
    app, seen = limited_app(refusals=1)
    with UvicornThread(app) as server:
        stack = Stack({"transcription": server.url}, "token")
        with stack.client("transcription") as http:
            response = http.post("/v1/jobs", files={"file": ("a.ogg", b"123")})
    assert response.status_code == 429 and len(seen) == 1
