"""The one server-sent-events parser (shared/sse_reader.py), against the rules of the format."""

from __future__ import annotations

from collections.abc import AsyncIterator

from shared.sse_reader import Event, aread_events, aread_json, read_events, read_json

LINES = [
    ": a comment, skipped",
    "event: subscribed",
    'data: {"epoch": "e1"}',
    "",
    "",  # a second blank line dispatches nothing
    "id: 7",  # fields other than event and data are skipped
    "data: first line",
    "data:second line",  # the space after the colon is optional
    "",
    "event: no-data",  # an event without data is not dispatched
    "",
    'data: {"n": 1}',
    "",
    "data: [DONE]",
    "",
    'data: {"n": 2}',  # after [DONE]: read_json stops; read_events goes on
    "",
    'data: {"n": 3}',  # no blank line before the end: never dispatched
]


def test_events_are_assembled_as_the_format_says() -> None:
    assert list(read_events(LINES)) == [
        Event("subscribed", '{"epoch": "e1"}'),
        Event("message", "first line\nsecond line"),
        Event("message", '{"n": 1}'),
        Event("message", "[DONE]"),
        Event("message", '{"n": 2}'),
    ]


def test_json_stops_at_done() -> None:
    assert list(read_json(LINES[11:])) == [{"n": 1}]


async def test_the_async_reader_gives_the_same_events() -> None:
    async def lines() -> AsyncIterator[str]:
        for line in LINES:
            yield line

    assert [event async for event in aread_events(lines())] == list(read_events(LINES))

    async def json_lines() -> AsyncIterator[str]:
        for line in LINES[11:]:
            yield line

    assert [body async for body in aread_json(json_lines())] == [{"n": 1}]
