"""The gateway as a wall: each of the red team's findings, sent as they sent it, refused
or handled, then an ordinary request served. Real HTTP on loopback; the services are
stand-ins that record what reached them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from harness.servers import UvicornThread, free_port
from services.gateway.app import create_app
from services.gateway.settings import GatewaySettings
from shared.metrics import Metrics
from shared.runner import HttpTimeouts
from shared.web import RequestContextMiddleware

LIMIT_MB = 1
TIMEOUTS = HttpTimeouts(header_s=0.5, body_s=0.5, idle_s=5.0)


class Service:
    """A stand-in with the services' own middleware (its body limit: 1 MB), which records
    the requests that reached its routes and the bytes that reached its socket."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.disconnects = threading.Event()
        app = FastAPI()
        app.add_middleware(RequestContextMiddleware, metrics=Metrics("standin"), max_body_bytes=LIMIT_MB * 1_048_576)

        @app.get("/ready")
        async def ready() -> dict[str, str]:
            return {"status": "ready"}

        @app.post("/v1/audio/transcriptions")
        async def upload(request: Request) -> JSONResponse:
            body = await request.body()
            self.seen.append({"path": request.url.path, "bytes": str(len(body)), **request.headers})
            return JSONResponse({"text": "ok"})

        @app.post("/v1/sql")
        async def slow(request: Request) -> JSONResponse:
            """Answers only after its client left: the wait a slow question makes."""
            await request.body()
            while not await request.is_disconnected():
                await asyncio.sleep(0.01)
            self.disconnects.set()
            return JSONResponse({})

        @app.api_route("/{path:path}", methods=["GET", "POST"])
        async def anything(path: str, request: Request) -> JSONResponse:
            self.seen.append({"path": "/" + path, **request.headers})
            return JSONResponse({"path": "/" + path})

        self.server = UvicornThread(app)
        self.counter = ByteCounter(self.server.port)


class ByteCounter:
    """A TCP relay in front of a service that counts the bytes clients sent through it."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.received = 0
        self.uploads = 0
        """Upload requests that reached the service (their request lines)."""
        self._target = target_port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await reader.read(65536):
                    if count:
                        self.received += len(data)
                        self.uploads += data.count(b"POST /v1/audio/transcriptions ")
                    writer.write(data)
                    await writer.drain()
            with contextlib.suppress(OSError):
                writer.close()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

        async def main() -> None:
            await asyncio.start_server(serve, "127.0.0.1", self.port)
            self._ready.set()
            await asyncio.Event().wait()

        self._loop.run_until_complete(main())


class Dying:
    """A raw service that starts an SSE answer, sends one event, and dies."""

    def __init__(self) -> None:
        self.port = free_port()
        self._sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            conn, _ = self._sock.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                    b'15\r\ndata: {"token": 1}\n\n\r\n'
                )
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


@pytest.fixture(scope="module")
def service() -> Iterator[Service]:
    made = Service()
    with made.server:
        yield made


@pytest.fixture(scope="module")
def gateway(service: Service) -> Iterator[str]:
    counted = f"http://127.0.0.1:{service.counter.port}"
    dying = Dying()
    settings = GatewaySettings.model_validate(
        {"llm_url": service.server.url, "coordinator_url": f"http://127.0.0.1:{dying.port}"}
        | {"transcription_url": counted, "rag_url": service.server.url}
    )
    with UvicornThread(create_app(settings), timeouts=TIMEOUTS, edge=True) as server:
        yield server.url


def raw(port: int, request: bytes, timeout_s: float = 10) -> bytes:
    """Send bytes as they are (no client library would send these) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        answer = b""
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def served(gateway: str) -> None:
    """An ordinary request after the finding: still answered."""
    answer = httpx.get(f"{gateway}/v1/stats")
    assert answer.status_code == 200 and answer.json() == {"path": "/v1/stats"}


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/%2e%2e/%2e%2e/v1/audit",
        "/v1/jobs/%2e%2e/%2e%2e/metrics",
        "/v1/jobs/%2E%2E/%2e%2e/openapi.json",
        "/v1/jobs/%2e/../v1/audit",
        "/v1/jobs/x%2f..%2f..%2fv1%2faudit",
        "/v1/jobs/..%5c..%5cmetrics",
    ],
)
def test_a_path_that_leaves_its_route_is_404_and_reaches_nobody(gateway: str, service: Service, path: str) -> None:
    before = len(service.seen)
    started = time.monotonic()
    answer = raw(port_of(gateway), f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    assert b'"code":"not_found"' in answer.replace(b" ", b"")
    assert time.monotonic() - started < 5
    assert len(service.seen) == before
    served(gateway)


@pytest.mark.parametrize("character", ["%00", "%01", "%7f", "%1b"])
def test_a_control_character_in_the_path_is_400(gateway: str, character: str) -> None:
    answer = httpx.get(f"{gateway}/v1/jobs/a{character}b")
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_path"
    served(gateway)


def test_content_length_with_transfer_encoding_is_400(gateway: str, service: Service) -> None:
    before = len(service.seen)
    request = (
        b"POST /v1/stats HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /v1/gpu HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    answer = raw(port_of(gateway), request)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"ambiguous_framing" in answer
    assert answer.count(b"HTTP/1.1") == 1  # the smuggled second request was not answered
    assert len(service.seen) == before
    served(gateway)


def test_a_services_early_413_is_passed_through_and_the_rest_is_not_sent(gateway: str, service: Service) -> None:
    """The red team's 26 MB upload: 413 from the service, 502 from the gateway before."""
    size = 26 * 1_048_576
    before = service.counter.received
    answer = httpx.post(
        f"{gateway}/v1/audio/transcriptions",
        content=b"\0" * size,
        headers={"content-type": "application/octet-stream"},
        timeout=60,
    )
    assert answer.status_code == 413, answer.text
    assert answer.json()["error"]["code"] == "payload_too_large"
    sent_on = service.counter.received - before
    assert sent_on < size / 4, sent_on  # the gateway stopped sending once it had the answer
    served(gateway)


def test_the_openai_sdk_gets_the_413_and_uploads_once(gateway: str, service: Service) -> None:
    """The SDK retries a 502 (it uploaded the file three times); a 413 it does not retry."""
    before = service.counter.uploads
    client = openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=2, timeout=60)
    with pytest.raises(openai.APIStatusError) as refused:
        client.audio.transcriptions.create(model="whisper-1", file=("big.wav", b"\0" * (26 * 1_048_576)))
    assert refused.value.status_code == 413
    assert isinstance(refused.value.body, dict) and refused.value.body["code"] == "payload_too_large"
    assert service.counter.uploads - before == 1  # exactly one upload on the wire
    served(gateway)


def test_a_chunked_upload_over_the_limit_is_413_too(gateway: str) -> None:
    def pieces() -> Iterator[bytes]:
        for _ in range(40):
            yield b"\0" * 65536

    answer = httpx.post(f"{gateway}/v1/audio/transcriptions", content=pieces(), timeout=60)
    assert answer.status_code == 413, answer.text
    served(gateway)


def test_the_clients_forwarding_headers_are_replaced_by_its_address(gateway: str, service: Service) -> None:
    httpx.get(
        f"{gateway}/v1/query",
        headers={"X-Forwarded-For": "6.6.6.6", "Forwarded": "for=6.6.6.6", "X-Real-IP": "6.6.6.6"},
    )
    seen = service.seen[-1]
    assert seen["path"] == "/v1/query"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert "forwarded" not in seen and "x-real-ip" not in seen


def test_date_and_server_are_sent_once(gateway: str) -> None:
    answer = httpx.get(f"{gateway}/v1/stats")
    assert len(answer.headers.get_list("date")) == 1
    assert len(answer.headers.get_list("server")) == 1


def test_connections_that_never_finish_their_headers_are_closed(gateway: str) -> None:
    """300 of them, as the red team opened; each closed by the header timeout."""
    socks = []
    for _ in range(300):
        sock = socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=10)
        sock.sendall(b"GET /v1/stats HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(sock)
    try:
        for sock in socks:
            assert sock.recv(1024) == b""  # closed by the gateway, not by us
    finally:
        for sock in socks:
            sock.close()
    served(gateway)


def test_a_body_that_stops_arriving_is_cut(gateway: str) -> None:
    with socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=10) as sock:
        sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nhalf")
        assert sock.recv(1024) == b""
    served(gateway)


def test_a_client_that_leaves_before_the_answer_closes_the_services_request(gateway: str, service: Service) -> None:
    """The red team's text-to-SQL client left after 15 s and the request ran on for 52."""
    service.disconnects.clear()
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(f"{gateway}/v1/sql", json={"question": "?"}, timeout=0.5)
    assert service.disconnects.wait(10), "the service never saw the client leave"
    served(gateway)


def test_a_stream_whose_service_dies_ends_with_an_error_event_and_done(gateway: str) -> None:
    with httpx.stream("GET", f"{gateway}/v1/events", timeout=10) as answer:
        lines = [line for line in answer.iter_lines() if line]
    assert lines[0] == 'data: {"token": 1}'
    error = json.loads(lines[1].removeprefix("data: "))
    assert error["error"]["code"] == "service_failed"
    assert lines[-1] == "data: [DONE]"
    served(gateway)


def gateway_before_one_shot_rag(answer: bytes) -> UvicornThread:
    """A gateway whose RAG service reads one request's head, sends ``answer`` (perhaps
    nothing) and closes the connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while b"\r\n\r\n" not in conn.recv(65536):
                pass
            conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    settings = GatewaySettings.model_validate({"rag_url": f"http://127.0.0.1:{listener.getsockname()[1]}"})
    return UvicornThread(create_app(settings))


def test_a_plain_answer_cut_short_stays_cut() -> None:
    """A JSON body cannot carry an error event: the client sees it incomplete."""
    cut = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"a":'
    with gateway_before_one_shot_rag(cut) as server, pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{server.url}/v1/stats", timeout=10)


def test_a_service_that_dies_before_its_answer_is_503_service_failed() -> None:
    with gateway_before_one_shot_rag(b"") as server:
        answer = httpx.get(f"{server.url}/v1/stats", timeout=10)
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "service_failed"
    assert answer.headers["retry-after"] == "1"
