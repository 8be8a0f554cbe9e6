"""Forwarding one request to the service that answers its path, streaming both ways.

The body goes up as it arrives and the answer comes back as the service sends it, byte
for byte (an SSE stream unbuffered, an upload without being held whole). A service's
early answer (a 413 while the upload is still coming) is passed on at once and the rest
of the body is not sent (services/gateway/upstream.py). A client that leaves closes the
service's connection, before the answer's head as after it, so the service sees the
disconnect as if the client had been its own. A stream whose service dies mid-answer
ends with an error event (``service_failed``) and ``[DONE]``, as every stream of
Baton's ends, instead of a cut body.

Headers pass untouched, ``Authorization`` included (each service checks its own
tokens), except the hop-by-hop ones, the client's forwarding headers (``X-Forwarded-For``
is the gateway's to set: it names the client's address), and ``date``/``server``, which
the gateway's own server writes. No FastAPI here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes, urlsplit

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from services.gateway.upstream import Answer, Upstream, UpstreamCut, UpstreamDown, UpstreamFailed
from shared.errors import BadRequest, NotFound, ServiceUnavailable
from shared.logs import request_id_var

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
FORWARDING = frozenset({"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "forwarded", "x-real-ip"})
"""The client's claims about where it is: dropped; the gateway writes X-Forwarded-For."""
WRITTEN_HERE = frozenset({"date", "server"})
"""Headers of the answer the gateway's own server writes (sending both doubled them)."""

REQUEST_ID = "x-request-id"
FAILED_EVENT = "service_failed"
UNREACHABLE = 502
"""``get_json``'s status (with no body) for a service that did not answer."""
RETRY_AFTER_S = 1.0
"""What a client is told to wait when a service is down: the supervisor starts it again
within seconds."""


def passed(headers: Iterable[tuple[str, str]], drop: frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() not in drop]


def checked_target(scope: Scope) -> tuple[str, bytes]:
    """(the decoded path to route by, the target to send as the client sent it).

    400 for a control character anywhere in the decoded path; 404 for a path that would
    leave where it points once decoded: ``.`` or ``..`` segments (``%2e%2e``), or an
    encoded slash or backslash that a service would read as a separator."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
    decoded = unquote_to_bytes(raw)
    if any(b < 0x20 or b == 0x7F for b in decoded):
        raise BadRequest("the path holds a control character", code="invalid_path")
    lowered = raw.lower()
    if b"%2f" in lowered or b"%5c" in lowered or b"\\" in decoded:
        raise NotFound("no service answers this path", code="not_found")
    if any(segment in (b".", b"..") for segment in decoded.split(b"/")):
        raise NotFound("no service answers this path", code="not_found")
    query: bytes = scope.get("query_string") or b""
    return decoded.decode("utf-8", "replace"), raw + (b"?" + query if query else b"")


def _has_body(request: Request) -> bool:
    return "content-length" in request.headers or "transfer-encoding" in request.headers


async def _client_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _failed_event(service: str) -> bytes:
    error = {
        "error": {
            "message": f"the {service} service stopped in the middle of the answer; ask again",
            "type": "server_error",
            "param": None,
            "code": FAILED_EVENT,
        }
    }
    return f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()


class Relayed(StreamingResponse):
    """The service's answer; its connection closed (or kept) however the relay ends."""

    def __init__(self, answer: Answer, service: str) -> None:
        headers = passed(answer.headers, WRITTEN_HERE | {REQUEST_ID})
        streamed = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers)
        super().__init__(self._pieces(answer, service, streamed), status_code=answer.status)
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        self._answer = answer

    @staticmethod
    async def _pieces(answer: Answer, service: str, streamed: bool) -> AsyncIterator[bytes]:
        try:
            async for piece in answer.body():
                yield piece
        except UpstreamCut as exc:
            log.warning("service connection cut mid-answer", extra={"upstream": service, "error": str(exc)})
            if not streamed:
                raise  # a body that cannot say so: cut it short too, so the client sees it is incomplete
            yield _failed_event(service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self._answer.aclose())


class Proxy:
    def __init__(self, upstreams: dict[str, str], connect_timeout_s: float) -> None:
        self.upstreams = upstreams
        self._services: dict[str, Upstream] = {}
        for name, url in upstreams.items():
            parts = urlsplit(url)
            self._services[name] = Upstream(parts.hostname or "127.0.0.1", parts.port or 80, connect_timeout_s)
        # Small GETs of the gateway's own (what /v1/models merges); no read timeout is
        # needed there, but a service that hangs must not hang them.
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=connect_timeout_s))

    async def forward(self, service: str, request: Request) -> Relayed:
        _, target = checked_target(request.scope)
        headers = [(k, v) for k, v in passed(request.headers.items(), FORWARDING | {REQUEST_ID}) if k.lower() != "host"]
        # The gateway's request id goes on (the client's, when it gave a valid one), so
        # the gateway's log line and the service's carry the same id.
        request_id = request_id_var.get()
        if request_id:
            headers.append((REQUEST_ID, request_id))
        peer = request.client.host if request.client is not None else None
        if peer:
            headers.append(("x-forwarded-for", peer))
        receive = request.receive
        body = _client_body(receive) if _has_body(request) else None
        try:
            answer = await self._services[service].exchange(
                request.method, target, headers, body, lambda: _until_disconnected(receive)
            )
        except UpstreamDown as exc:
            # A service the supervisor is starting again is back in seconds: 503 with
            # Retry-After, as a client should wait and ask again. The message names the
            # service, never its address.
            log.warning("service unreachable", extra={"upstream": service, "error": str(exc)})
            raise ServiceUnavailable(
                f"the {service} service is not answering (starting or restarting); try again shortly",
                retry_after_s=RETRY_AFTER_S,
                code="service_unavailable",
            ) from None
        except UpstreamFailed as exc:
            log.warning("service failed before answering", extra={"upstream": service, "error": str(exc)})
            raise ServiceUnavailable(
                f"the {service} service stopped before answering; ask again",
                retry_after_s=RETRY_AFTER_S,
                code=FAILED_EVENT,
            ) from None
        return Relayed(answer, service)

    async def get_json(self, service: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
        """A small GET of one service's, for what the gateway merges (``/v1/models``)."""
        try:
            response = await self.client.get(self.upstreams[service] + path, headers=headers)
        except httpx.TransportError:
            return UNREACHABLE, None
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None

    async def aclose(self) -> None:
        for upstream in self._services.values():
            upstream.close()
        await self.client.aclose()
