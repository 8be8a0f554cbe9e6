"""One error shape for every service: OpenAI's ``{"error": {...}}`` envelope.

Domain code raises :class:`APIError` subclasses (or plain domain exceptions that a
service maps to them); the handlers installed by :func:`install_error_handlers` turn
them, FastAPI's validation errors and anything unexpected into the envelope. A 500
never carries a stack trace: the trace goes to the log with the request id.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from shared.logs import request_id_var

log = logging.getLogger(__name__)


class APIError(StarletteHTTPException):
    """An error with an HTTP status, rendered in the OpenAI envelope.

    It is a Starlette ``HTTPException`` so that FastAPI lets it through unchanged
    when it is raised while the request body is read (the body-size limit).
    """

    status: int = 500
    type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(self.status, message, dict(headers or {}))
        self.message = message
        self.code = code or self.default_code
        self.param = param

    def body(self) -> dict[str, Any]:
        return envelope(self.message, self.type, code=self.code, param=self.param)


class BadRequest(APIError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(APIError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_token"

    def __init__(self, message: str, *, error: str = "invalid_token") -> None:
        challenge = 'Bearer realm="baton"'
        if error:
            challenge += f', error="{error}"'
        super().__init__(message, code=error or "missing_token", headers={"WWW-Authenticate": challenge})


class Forbidden(APIError):
    status = 403
    type = "permission_error"
    default_code = "insufficient_scope"

    def __init__(self, needed: Sequence[str]) -> None:
        wanted = " ".join(needed)
        super().__init__(
            f"this token lacks the scope this endpoint needs: {' or '.join(needed)}",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{wanted}"'},
        )


class NotAllowed(APIError):
    """Authenticated, with the scope, but this caller may not do this (403)."""

    status = 403
    type = "permission_error"
    default_code = "not_allowed"


class NotFound(APIError):
    status = 404
    type = "not_found_error"
    default_code = "not_found"


class Conflict(APIError):
    """The request is valid but not in the resource's present state (a job still running)."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class Gone(APIError):
    status = 410
    type = "invalid_request_error"
    default_code = "gone"


class PayloadTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    default_code = "payload_too_large"


class Unprocessable(APIError):
    """Well-formed, but what it asks for cannot be done (SQL the checks refuse)."""

    status = 422
    type = "invalid_request_error"
    default_code = "unprocessable"


class TooManyRequests(APIError):
    status = 429
    type = "rate_limit_error"
    default_code = "queue_full"

    def __init__(self, message: str, *, retry_after_s: float | None, code: str | None = None) -> None:
        """``retry_after_s`` None: waiting will not help (a quota), so no Retry-After."""
        headers = {"Retry-After": _seconds(retry_after_s)} if retry_after_s is not None else None
        super().__init__(message, code=code, headers=headers)


class BadGateway(APIError):
    status = 502
    type = "server_error"
    default_code = "backend_failed"


class ServiceUnavailable(APIError):
    status = 503
    type = "service_unavailable_error"
    default_code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: float | None = None, code: str | None = None) -> None:
        headers = {"Retry-After": _seconds(retry_after_s)} if retry_after_s is not None else None
        super().__init__(message, code=code, headers=headers)


def _seconds(value: float) -> str:
    return str(max(1, int(value + 0.999)))


_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    410: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def envelope(message: str, type_: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def internal_message() -> str:
    rid = request_id_var.get()
    return f"internal error; the service log has the details under request id {rid}"


def _safe(text: str) -> str:
    """Text that encodes as UTF-8: a lone surrogate from the request becomes an escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """A one-line message and the offending parameter from pydantic's errors."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [_safe(str(part)) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    param = ".".join(loc)[:200] or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON (or not UTF-8)", None
    msg = _safe(str(first.get("msg", "invalid value")).removeprefix("Value error, "))
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return (f"{param}: {msg}{more}" if param else f"{msg}{more}"), param


def allowed_methods(request: Request) -> str:
    """Every method some route takes at this path. Starlette's 405 names only the first
    route that matched the path (GET of ``/v1/jobs/{id}``, not its DELETE)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:  # PARTIAL: the path matches, the method does not
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


ErrorTable = Mapping[type[Exception], Callable[[Any], APIError]]
"""How one service answers its domain's exceptions: each one's API error. Every service
has one (its ``errors.py``, or the coordinator's ``DOMAIN_ERRORS``); the app installs it
with ``map_errors`` and its streams turn failures into error events with ``as_api_error``,
so a domain error is answered the same before a stream starts and after."""


def as_api_error(exc: BaseException, table: ErrorTable) -> APIError | None:
    """The API error ``table`` makes of ``exc`` (an APIError is its own), or None."""
    if isinstance(exc, APIError):
        return exc
    for kind, make in table.items():
        if isinstance(exc, kind):
            return make(exc)
    return None


def map_errors(app: FastAPI, mapping: ErrorTable) -> None:
    """Answer each domain exception with the API error its function makes, once per service,
    so that routes let domain errors through instead of translating them one by one."""

    def handler_for(make: Callable[[Any], APIError]) -> Callable[[Request, Exception], Awaitable[JSONResponse]]:
        async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
            error = make(exc)
            request.state.error_code = error.code
            return error_response(error)

        return on_domain_error

    for exception, make in mapping.items():
        app.add_exception_handler(exception, handler_for(make))


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        request.state.error_code = cast(APIError, exc).code
        return error_response(cast(APIError, exc))

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        message, param = validation_message(cast(RequestValidationError, exc).errors())
        return JSONResponse(envelope(message, "invalid_request_error", param=param, code="invalid_value"), 400)

    async def on_http_error(request: Request, error: Exception) -> JSONResponse:
        exc = cast(StarletteHTTPException, error)
        type_ = _TYPE_BY_STATUS.get(
            exc.status_code, "server_error" if exc.status_code >= 500 else "invalid_request_error"
        )
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": allowed_methods(request)}
        return JSONResponse(envelope(message, type_), exc.status_code, headers=headers)

    async def on_store_down(request: Request, exc: Exception) -> JSONResponse:
        # Every service keeps its state in Redis: a Redis that is down or paused is a 503
        # the client may retry, never a 500.
        log.warning("store unavailable", extra={"error": type(exc).__name__})
        error = ServiceUnavailable(
            "the service's store is unavailable; try again shortly", retry_after_s=1, code="store_unavailable"
        )
        request.state.error_code = error.code
        return error_response(error)

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(envelope(internal_message(), "server_error", code="internal_error"), 500)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RedisError, on_store_down)
    app.add_exception_handler(Exception, on_unexpected)
