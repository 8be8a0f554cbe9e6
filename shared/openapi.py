"""The OpenAPI document as the services really answer: errors in OpenAI's envelope
with 400 (never FastAPI's 422 for validation), the statuses every authenticated route can give, and a
bearer security scheme."""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

OPEN = {"/health", "/ready"}
"""Paths that need no token."""

_STATUSES = {
    "400": "Invalid request",
    "401": "Missing or invalid bearer token",
    "403": "The token lacks the scope, or may not do this",
    "404": "Not found (another user's items too)",
    "413": "Request too large",
    "429": "Over a limit: see Retry-After",
    "503": "A store or the GPU is unavailable: see Retry-After",
}


_SCHEMAS: dict[str, dict[str, Any]] = {
    "application/json": {},
    # Each event of the stream (what a client's SSE parser hands it), not the whole body.
    "text/event-stream": {
        "type": "object",
        "properties": {"event": {"type": "string"}, "data": {"type": "string"}, "id": {"type": "string"}},
        "required": ["data"],
    },
}
"""Copied for each route: ``answers`` changes its copy."""


def answers(
    *media_types: str,
    description: str = "Success",
    json: Any = None,
    events: Any = None,
) -> dict[int | str, dict[str, Any]]:
    """A route's 200 in each media type it can answer with, for ``responses=`` of a route.

    ``json``: the model (or union of models) of its JSON answer. ``events``: that of the
    JSON in each server-sent event's ``data``, until ``[DONE]``. Plain text is a string."""
    content = {media: {"schema": copy.deepcopy(_SCHEMAS.get(media, {"type": "string"}))} for media in media_types}
    if events is not None and "text/event-stream" in content:
        data = {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": TypeAdapter(events).json_schema(ref_template="#/$defs/{model}"),
        }
        stream = content["text/event-stream"]["schema"]
        stream["properties"] = {**stream["properties"], "data": data}
    answer: dict[str, Any] = {"description": description, "content": content}
    if json is not None:
        content.pop("application/json", None)
        answer["model"] = json
    return {200: answer}


def honest_openapi(app: FastAPI) -> dict[str, Any]:
    """Built once, then cached on the app as FastAPI does. A service states what only
    its settings know (a maximum, the languages of its model) by appending functions to
    ``app.state.openapi_refinements``; each gets the document to change."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}}
    error_ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            if responses.get("422", {}).get("description") == "Validation Error":
                del responses["422"]  # FastAPI's: its validation errors are answered 400
            statuses = ["400"] if path in OPEN else list(_STATUSES)
            for status in statuses:
                responses.setdefault(status, {"description": _STATUSES[status], **error_ref})
            for status, response in responses.items():  # errors a route declares itself (410)
                if status.isdigit() and int(status) >= 400 and "content" not in response:
                    response.update(error_ref)
            success = responses.get("200", {}).get("content", {})
            if len(success) > 1 and success.get("application/json", {}).get("schema") == {}:
                del success["application/json"]  # FastAPI's default for a route that streams
            if path not in OPEN:
                operation["security"] = [{"bearer": []}]
            if path == "/metrics":
                responses["200"] = {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
    _forms_without_null(document)
    for refine in getattr(app.state, "openapi_refinements", ()):
        refine(document)
    app.openapi_schema = document
    return document


def _forms_without_null(document: dict[str, Any]) -> None:
    """A form field cannot be null, only left out: FastAPI documents optional form
    fields as ``anyOf [..., null]``, and a client that believes it sends "null"."""
    schemas = document.get("components", {}).get("schemas", {})
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            content = operation.get("requestBody", {}).get("content", {})
            for media in ("multipart/form-data", "application/x-www-form-urlencoded"):
                ref = content.get(media, {}).get("schema", {}).get("$ref", "")
                form = schemas.get(ref.rsplit("/", 1)[-1], {})
                for field in form.get("properties", {}).values():
                    kinds = [kind for kind in field.get("anyOf", ()) if kind != {"type": "null"}]
                    if "anyOf" in field and len(kinds) == 1:
                        del field["anyOf"]
                        field.update(kinds[0])
                    elif "anyOf" in field:
                        field["anyOf"] = kinds
