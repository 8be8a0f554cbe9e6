"""An httpx client for calls between services.

Each call carries the calling service's short-lived token and the current request
id. Retries happen only where they cannot do a thing twice: when the connection was
never made (any method), and for idempotent requests on a dropped connection or a
502/503/504.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx

from shared.logs import request_id_var

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
RETRY_STATUSES = frozenset({502, 503, 504})


class ServiceUnreachable(Exception):
    """The other service could not be reached (after any retries)."""


class ServiceClient:
    def __init__(
        self,
        base_url: str,
        token: Callable[[], str] | None = None,
        *,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 2.0,
        retries: int = 2,
        backoff_s: float = 0.1,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._retries = retries
        self._backoff_s = backoff_s
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            transport=transport,
        )

    def _headers(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = dict(extra or {})
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token()}"
        rid = request_id_var.get()
        if rid:
            headers.setdefault("X-Request-ID", rid)
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
        idempotent: bool | None = None,
    ) -> httpx.Response:
        """Send one request; ``idempotent`` overrides the method's default."""
        method = method.upper()
        safe = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
        timeout: Any = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
        attempt = 0
        while True:
            try:
                response = await self._client.request(
                    method, path, json=json, params=params, headers=self._headers(headers), timeout=timeout
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if attempt >= self._retries:
                    raise ServiceUnreachable(f"{self.base_url}: {type(exc).__name__}") from exc
            except httpx.TransportError as exc:
                if not safe or attempt >= self._retries:
                    raise ServiceUnreachable(f"{self.base_url}: {type(exc).__name__}") from exc
            else:
                if not (safe and response.status_code in RETRY_STATUSES and attempt < self._retries):
                    return response
                await response.aclose()
            await asyncio.sleep(self._delay(attempt))
            attempt += 1

    def _delay(self, attempt: int) -> float:
        return float(self._backoff_s * (2**attempt) * (0.5 + random.random()))  # noqa: S311

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> AsyncIterator[httpx.Response]:
        """A streamed response (SSE); never retried."""
        timeout: Any = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
        request = self._client.build_request(
            method.upper(), path, json=json, params=params, headers=self._headers(None), timeout=timeout
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"{self.base_url}: {type(exc).__name__}") from exc
        try:
            yield response
        finally:
            await response.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()
