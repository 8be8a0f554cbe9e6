"""Reading server-sent events, the client side of shared/sse.py: the one parser the
services, the CLI, the tests and the benchmarks use.

    with http.stream("GET", url) as response:
        for event in read_events(response.iter_lines()): ...
        for body in read_json(response.iter_lines()): ...   # data as JSON, up to [DONE]
    async for body in aread_json(response.aiter_lines()): ...
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

DONE = "[DONE]"
"""The data of the last event of an OpenAI-style stream."""


@dataclass(frozen=True)
class Event:
    name: str
    """The ``event:`` field; ``message`` when the event has none."""
    data: str
    """Its ``data:`` lines, joined by newlines."""

    def json(self) -> Any:
        return json.loads(self.data)


class _Assembler:
    """Lines in, events out: ``event:`` and ``data:`` fields up to a blank line; comments
    (``:``) and other fields are skipped; an event without data is not dispatched."""

    def __init__(self) -> None:
        self._name, self._data = "message", list[str]()

    def feed(self, line: str) -> Event | None:
        if not line:
            event = Event(self._name, "\n".join(self._data)) if self._data else None
            self._name, self._data = "message", []
            return event
        if not line.startswith(":"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                self._name = value
            elif field == "data":
                self._data.append(value)
        return None


def read_events(lines: Iterable[str]) -> Iterator[Event]:
    assembler = _Assembler()
    for line in lines:
        event = assembler.feed(line)
        if event is not None:
            yield event


async def aread_events(lines: AsyncIterable[str]) -> AsyncIterator[Event]:
    assembler = _Assembler()
    async for line in lines:
        event = assembler.feed(line)
        if event is not None:
            yield event


def read_json(lines: Iterable[str]) -> Iterator[Any]:
    """The data of each event as JSON, until ``[DONE]``."""
    for event in read_events(lines):
        if event.data == DONE:
            return
        yield event.json()


async def aread_json(lines: AsyncIterable[str]) -> AsyncIterator[Any]:
    """``read_json`` over an async stream of lines."""
    async for event in aread_events(lines):
        if event.data == DONE:
            return
        yield event.json()
