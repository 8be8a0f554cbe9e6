"""The OpenAPI document as the services really answer: errors in OpenAI's envelope
with 400 (never FastAPI's 422), the statuses every authenticated route can give, and a
bearer security scheme."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

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


def honest_openapi(app: FastAPI) -> dict[str, Any]:
    """Built once, then cached on the app as FastAPI does."""
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
            responses.pop("422", None)
            statuses = ["400"] if path in OPEN else list(_STATUSES)
            for status in statuses:
                responses.setdefault(status, {"description": _STATUSES[status], **error_ref})
            for status, response in responses.items():  # errors a route declares itself (410)
                if status.isdigit() and int(status) >= 400 and "content" not in response:
                    response.update(error_ref)
            if path not in OPEN:
                operation["security"] = [{"bearer": []}]
            if path == "/metrics":
                responses["200"] = {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
    app.openapi_schema = document
    return document
