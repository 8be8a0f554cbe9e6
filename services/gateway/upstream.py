"""One HTTP/1.1 exchange with a service, the request body sent while the answer is read.

httpx sends the whole body before it reads the answer. A service that refuses early (a
413 for an upload over its limit, a 401 before the body) answers while the body is
still coming, and the gateway must pass that answer on at once and stop sending the
rest. So the exchange here runs both directions at the same time, on h11 over a plain
asyncio connection:

- the body is pumped up as it arrives from the client;
- the answer's head is awaited meanwhile; when it comes first, the pump stops (the
  service will not read the rest) and the connection is not reused;
- the answer's body is then read piece by piece (an SSE stream unbuffered).

Connections of requests without a body are kept for the next such request (a kept
connection the service has closed meanwhile is retried once on a new one: nothing was
sent that cannot be sent again); a request with a body always opens its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11
from starlette.requests import ClientDisconnect

KEEP_IDLE_S = 4.0
"""How long a kept connection is reused: under the services' idle timeout (5 s)."""
READ_CHUNK = 65536


class UpstreamFailed(Exception):
    """The service's connection broke before the answer's head."""


class UpstreamDown(UpstreamFailed):
    """The service did not take the connection: it is not running (starting, restarting)."""


class UpstreamCut(Exception):
    """The service's connection broke in the middle of the answer's body."""


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    h11: h11.Connection = field(default_factory=lambda: h11.Connection(h11.CLIENT))
    idle_since: float = 0.0

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Answer:
    """The service's answer: status and headers now, the body as it comes (``body()``)."""

    def __init__(self, pool: Upstream, connection: _Connection, response: h11.Response, reusable: bool) -> None:
        self._pool = pool
        self._connection = connection
        self.status = response.status_code
        self.headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers]
        self._reusable = reusable
        self._done = False

    async def body(self) -> AsyncIterator[bytes]:
        """The body's pieces; UpstreamCut if the connection breaks before its end."""
        connection = self._connection
        while True:
            event = await self._pool.next_event(connection, cut=True)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
                return

    async def aclose(self) -> None:
        """Give the connection back (a whole answer of a reusable exchange) or close it."""
        connection = self._connection
        if (
            self._done
            and self._reusable
            and connection.h11.our_state is h11.DONE
            and connection.h11.their_state is h11.DONE
        ):
            connection.h11.start_next_cycle()
            self._pool.keep(connection)
        else:
            connection.close()


class Upstream:
    """Exchanges with one service at ``host:port``."""

    def __init__(self, host: str, port: int, connect_timeout_s: float, keep: int = 64) -> None:
        self.host = host
        self.port = port
        self._connect_timeout_s = connect_timeout_s
        self._idle: list[_Connection] = []
        self._keep = keep

    async def _connect(self) -> _Connection:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=READ_CHUNK * 4), self._connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamDown(type(exc).__name__) from None
        return _Connection(reader, writer)

    def keep(self, connection: _Connection) -> None:
        connection.idle_since = asyncio.get_running_loop().time()
        if len(self._idle) < self._keep:
            self._idle.append(connection)
        else:
            connection.close()

    def _kept(self) -> _Connection | None:
        now = asyncio.get_running_loop().time()
        while self._idle:
            connection = self._idle.pop()
            if now - connection.idle_since < KEEP_IDLE_S and not connection.reader.at_eof():
                return connection
            connection.close()
        return None

    async def next_event(self, connection: _Connection, *, cut: bool = False) -> h11.Event:
        """The next event from the service; UpstreamCut (``cut``) or UpstreamFailed if the
        connection breaks or speaks no HTTP."""
        error = UpstreamCut if cut else UpstreamFailed
        while True:
            try:
                event = connection.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise error(str(exc)) from None
            if event is h11.PAUSED:
                raise error("the service sent more than one answer")
            if event is not h11.NEED_DATA:
                if isinstance(event, h11.ConnectionClosed):
                    raise error("the connection closed")
                return event  # type: ignore[return-value]
            try:
                data = await connection.reader.read(READ_CHUNK)
            except OSError as exc:
                raise error(type(exc).__name__) from None
            connection.h11.receive_data(data)  # b"": the service closed its end

    async def exchange(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
        until_disconnected: Callable[[], Awaitable[None]] | None = None,
    ) -> Answer:
        """Send the request, and return the answer once its head has come.

        ``body`` None: no body (the connection may be a kept one). ``until_disconnected``:
        returns when the client goes away; it is awaited once the body has been read
        (before, the body's own reads would see it), and the exchange then stops with
        ClientDisconnect, closing the service's connection."""
        if body is None:
            kept = self._kept()
            if kept is not None:
                try:
                    return await self._exchange(kept, method, target, headers, None, until_disconnected)
                except UpstreamFailed:
                    pass  # the service closed it while it was kept: once more on a new one
        connection = await self._connect()
        return await self._exchange(connection, method, target, headers, body, until_disconnected)

    async def _exchange(
        self,
        connection: _Connection,
        method: str,
        target: bytes,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
        until_disconnected: Callable[[], Awaitable[None]] | None,
    ) -> Answer:
        sent = [("host", f"{self.host}:{self.port}"), *headers]
        if body is not None and not any(k.lower() == "content-length" for k, _ in headers):
            sent.append(("transfer-encoding", "chunked"))
        try:
            request = h11.Request(method=method, target=target, headers=sent)
            connection.writer.write(connection.h11.send(request))
        except h11.LocalProtocolError as exc:
            connection.close()
            raise UpstreamFailed(f"the request cannot be sent: {exc}") from None
        pump: asyncio.Future[None] = asyncio.ensure_future(self._pump(connection, body))
        head: asyncio.Future[h11.Response] = asyncio.ensure_future(self._head(connection))
        watch: asyncio.Future[None] | None = None
        try:
            while not head.done():
                waits: set[asyncio.Future[Any]] = {head}
                if not pump.done():
                    waits.add(pump)
                if watch is not None:
                    waits.add(watch)
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if watch is not None and watch in done:
                    raise ClientDisconnect()
                if pump in done and not head.done():
                    failure = pump.exception()
                    if failure is None:
                        if until_disconnected is not None:
                            watch = asyncio.ensure_future(until_disconnected())
                    elif isinstance(failure, OSError):
                        # The service stopped reading the body: its answer may still come (a refusal).
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(asyncio.shield(head), 5)
                        if not head.done():
                            raise UpstreamFailed("the request body could not be sent")
                    else:
                        raise failure  # the client's side: it left, or sent more than the gateway carries
            response = head.result()
        except BaseException:
            pump.cancel()
            head.cancel()
            connection.close()
            raise
        finally:
            if watch is not None:
                watch.cancel()
        early = not pump.done() or pump.exception() is not None
        if not pump.done():  # answered before the body was sent: stop sending; the connection ends with it
            pump.cancel()
            with contextlib.suppress(BaseException):
                await pump
        return Answer(self, connection, response, reusable=not early)

    @staticmethod
    async def _pump(connection: _Connection, body: AsyncIterator[bytes] | None) -> None:
        writer = connection.writer
        if body is not None:
            async for chunk in body:
                if chunk:
                    writer.write(connection.h11.send(h11.Data(data=chunk)))
                    await writer.drain()
        writer.write(connection.h11.send(h11.EndOfMessage()))
        await writer.drain()

    async def _head(self, connection: _Connection) -> h11.Response:
        while True:
            event = await self.next_event(connection)
            if isinstance(event, h11.Response):
                return event
            # h11.InformationalResponse (100 Continue): the answer is still to come

    def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
