"""Every chat and transcription route says in /openapi.json what it answers: a schema
for each media type of its success, the JSON inside each server-sent event included.
In process: the apps are built, not started (no model is loaded beyond a vocabulary)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI

from services.llm.app import create_app as llm_app
from services.transcription.app import create_app as transcription_app
from shared.openapi import honest_openapi

INFRA = {"/health", "/ready", "/metrics", "/openapi.json", "/v1/info", "/v1/audit"}


@pytest.fixture(autouse=True)
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JWT_SECRET", secrets.token_urlsafe(48))


@pytest.mark.parametrize(
    ("make", "routes"),
    [
        (
            llm_app,
            {
                "/v1/models",
                "/v1/models/{model_id}",
                "/v1/chat/completions",
                "/v1/completions",
                "/v1/responses",
                "/chat",
                "/chat/stream",
                "/v1/conversations",
                "/v1/conversations/{conversation_id}",
                "/v1/sql",
                "/query",
                "/info",
            },
        ),
        (
            transcription_app,
            {
                "/v1/audio/transcriptions",
                "/v1/jobs",
                "/v1/jobs/{job_id}",
                "/v1/jobs/{job_id}/events",
                "/v1/jobs/{job_id}/speakers",
                "/v1/speakers",
                "/v1/speakers/{speaker_id}",
                "/v1/models",
                "/v1/models/{model_id}",
            },
        ),
    ],
)
def test_every_route_documents_each_answer_it_gives(make: Callable[[], FastAPI], routes: set[str]) -> None:
    document = honest_openapi(make())  # what GET /openapi.json answers
    paths = {path for path in document["paths"] if path not in INFRA}
    assert paths == routes
    for path in paths:
        for method, operation in document["paths"][path].items():
            success = [(s, r) for s, r in operation["responses"].items() if s.startswith("2")]
            assert len(success) == 1, (method, path)
            status, answer = success[0]
            if status == "204":
                assert "content" not in answer, f"{method} {path}: 204 with a body"
                continue
            content: dict[str, Any] = answer["content"]
            for media, body in content.items():
                schema = body["schema"]
                assert schema, f"{method} {path}: {media} has no schema"
                if media == "text/event-stream":
                    data = schema["properties"]["data"]
                    assert data["contentMediaType"] == "application/json"
                    assert data["contentSchema"], f"{method} {path}: the events' JSON is not described"
                if media == "application/json":
                    assert "$ref" in schema or "anyOf" in schema, f"{method} {path}: {schema}"


def test_the_stream_schemas_name_the_chunk_fields() -> None:
    completions = honest_openapi(llm_app())["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    chunk = completions["text/event-stream"]["schema"]["properties"]["data"]["contentSchema"]
    assert {"id", "created", "model", "choices"} <= set(chunk["required"])
    assert chunk["properties"]["object"]["const"] == "chat.completion.chunk"
    assert completions["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
