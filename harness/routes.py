"""Every route of an app, each asked once with the least a client can send: no body or an
empty JSON object, ``x`` for each path parameter. What the answer must be is the test's
to say; what comes back here is each operation's status beside the statuses its
``/openapi.json`` documents. An event stream is read as far as its head: one that never
ends must be served over HTTP (ASGITransport returns a response only once it has ended)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.testclient import TestClient

BODY_METHODS = frozenset({"post", "put", "patch"})


@dataclass(frozen=True)
class Answer:
    method: str
    path: str
    status: int
    documented: frozenset[str]
    body: str

    @property
    def as_documented(self) -> bool:
        return str(self.status) in self.documented or "default" in self.documented


@dataclass(frozen=True)
class _Ask:
    method: str
    path: str
    target: str
    options: dict[str, Any]
    streams: bool
    documented: frozenset[str]

    def answer(self, status: int, body: str) -> Answer:
        return Answer(self.method, self.path, status, self.documented, body[:300])


def _asks(document: dict[str, Any]) -> Iterator[_Ask]:
    for path, operations in document["paths"].items():
        target = re.sub(r"\{[^}]*\}", "x", path)
        for method, operation in operations.items():
            responses = operation.get("responses", {})
            streams = "text/event-stream" in responses.get("200", {}).get("content", {})
            options: dict[str, Any] = {"json": {}} if method in BODY_METHODS else {}
            yield _Ask(method.upper(), path, target, options, streams, frozenset(responses))


async def walk(http: httpx.AsyncClient, document: dict[str, Any]) -> list[Answer]:
    """Each operation of ``document`` asked once through ``http``, in the document's order."""
    answers = []
    for ask in _asks(document):
        async with http.stream(ask.method, ask.target, **ask.options) as response:
            wanted = not ask.streams or response.status_code >= 300
            body = (await response.aread()).decode(errors="replace") if wanted else ""
        answers.append(ask.answer(response.status_code, body))
    return answers


def walk_sync(client: TestClient, document: dict[str, Any]) -> list[Answer]:
    """``walk`` through Starlette's TestClient (an app whose lifespan runs in it)."""
    answers = []
    for ask in _asks(document):
        with client.stream(ask.method, ask.target, **ask.options) as response:
            wanted = not ask.streams or response.status_code >= 300
            body = response.read().decode(errors="replace") if wanted else ""
        answers.append(ask.answer(response.status_code, body))
    return answers


def misanswered(answers: list[Answer], document: dict[str, Any]) -> list[Answer]:
    """The answers a test of every route refuses: a 5xx, a 405 (the route not reached), or
    a status the document does not give. Every operation of ``document`` must have been
    asked."""
    asked = {(a.method, a.path) for a in answers}
    assert asked == {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    return [a for a in answers if a.status >= 500 or a.status == 405 or not a.as_documented]
