"""Forwarding one request to the service that answers its path, streaming both ways.

The body goes up as it arrives and the answer comes back as the service sends it, byte
for byte (an SSE stream unbuffered, an upload without being held whole). A client that
leaves closes the upstream response, so the service sees the disconnect as if the
client had been its own. Headers pass untouched, ``Authorization`` included (each
service checks its own tokens), except the hop-by-hop ones. No FastAPI here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from shared.errors import BadGateway
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

REQUEST_ID = "x-request-id"


def passed(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]


class Relayed(StreamingResponse):
    """The service's answer, its upstream response closed however the relay ends."""

    def __init__(self, upstream: httpx.Response) -> None:
        super().__init__(upstream.aiter_raw(), status_code=upstream.status_code)
        headers = [(k, v) for k, v in passed(upstream.headers.multi_items()) if k.lower() != REQUEST_ID]
        self.raw_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        self._upstream = upstream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await asyncio.shield(self._upstream.aclose())


class Proxy:
    def __init__(self, upstreams: dict[str, str], connect_timeout_s: float) -> None:
        self.upstreams = upstreams
        # No read timeout: a stream may be quiet for as long as its service is thinking.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )

    async def forward(self, service: str, request: Request) -> Relayed:
        url = httpx.URL(self.upstreams[service] + request.url.path, query=request.url.query.encode("latin-1"))
        body: Any = request.stream() if request.method not in ("GET", "HEAD", "OPTIONS") else None
        # The gateway's request id goes on (the client's, when it gave a valid one), so
        # the gateway's log line and the service's carry the same id.
        headers = [(k, v) for k, v in passed(request.headers.items()) if k.lower() != REQUEST_ID]
        request_id = request_id_var.get()
        if request_id:
            headers.append((REQUEST_ID, request_id))
        upstream_request = self.client.build_request(request.method, url, headers=headers, content=body)
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except httpx.TransportError as exc:
            # The message names the service, never its address.
            log.warning("service unreachable", extra={"upstream": service, "error": type(exc).__name__})
            raise BadGateway(f"the {service} service cannot be reached", code="service_unreachable") from None
        return Relayed(upstream)

    async def get_json(self, service: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
        """A small GET of one service's, for what the gateway merges (``/v1/models``)."""
        try:
            response = await self.client.get(self.upstreams[service] + path, headers=headers)
        except httpx.TransportError:
            return 502, None
        try:
            return response.status_code, response.json()
        except ValueError:
            return response.status_code, None

    async def aclose(self) -> None:
        await self.client.aclose()
