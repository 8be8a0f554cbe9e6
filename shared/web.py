"""FastAPI pieces every service uses: auth dependencies, middleware, common routes."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared import __version__
from shared.audit import Audit, AuditKind
from shared.auth import MAX_SUBJECT, ON_BEHALF_OF, SERVICE_SUBJECT_PREFIX, InvalidToken, Principal, TokenVerifier
from shared.errors import (
    Forbidden,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    envelope,
    install_error_handlers,
    internal_message,
)
from shared.limits import Limiter, StreamSlot
from shared.logs import request_id_var
from shared.metrics import Metrics
from shared.openapi import honest_openapi

log = logging.getLogger(__name__)
access_log = logging.getLogger("baton.access")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class Auth:
    """Builds FastAPI dependencies that authenticate, check scopes, and count each
    user's requests against their rate limit (``limiter``)."""

    def __init__(self, verifier: TokenVerifier, limiter: Limiter | None = None) -> None:
        self.verifier = verifier
        self.limiter = limiter

    def authenticate(self, request: Request) -> Principal:
        if len(request.headers.getlist("authorization")) > 1:
            request.state.auth_refused = "several Authorization headers"
            raise Unauthorized("send one Authorization header", error="invalid_request")
        header = request.headers.get("authorization")
        if header is None:
            request.state.auth_refused = "missing"
            raise Unauthorized("missing bearer token: send 'Authorization: Bearer <token>'", error="")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential.strip():
            request.state.auth_refused = "not a bearer token"
            raise Unauthorized("the Authorization header must be 'Bearer <token>'", error="invalid_request")
        try:
            principal = self.verifier.verify(credential.strip())
        except InvalidToken as exc:
            request.state.auth_refused = str(exc)
            raise Unauthorized(f"invalid bearer token: {exc}") from None
        request.state.principal = principal
        return principal

    def require(self, *scopes: str) -> Callable[[Request], Awaitable[Principal]]:
        """A dependency: a valid token holding any one of ``scopes`` (none: any valid token).

        ``async`` on purpose: FastAPI runs plain ``def`` dependencies in a thread pool,
        a thread hop on every request.
        """

        async def dependency(request: Request) -> Principal:
            principal = self.authenticate(request)
            if scopes and not principal.has_any(scopes):
                raise Forbidden(scopes)
            if self.limiter is not None and not principal.is_service:
                await self.limiter.request(principal.subject)
            return principal

        return dependency

    async def stream_slot(self, request: Request) -> StreamSlot:
        """One of the user's stream slots for this request's stream (429 when none is
        free); close it when the stream ends. Services are not limited."""
        if self.limiter is None:
            return StreamSlot(None, None, None)
        return await self.limiter.open_stream(user_of(request))

    def caller(self, *scopes: str) -> Callable[[Request], Awaitable[Caller]]:
        """A dependency like ``require`` that also works out whose data the request may
        touch; the route reads it with ``caller(request)``."""
        required = self.require(*scopes)

        async def dependency(request: Request) -> Caller:
            principal = await required(request)
            request.state.caller = caller_of(principal, request.headers.get(ON_BEHALF_OF))
            return request.state.caller

        return dependency


def app_auth(request: Request) -> Auth:
    """The app's own ``Auth`` (``app.state.auth``, set by ``create_service_app``)."""
    found: Auth = request.app.state.auth
    return found


async def stream_slot(request: Request) -> StreamSlot:
    """``Auth.stream_slot`` for routes declared at module level."""
    return await app_auth(request).stream_slot(request)


def signed_in(*scopes: str) -> Callable[[Request], Awaitable[Principal]]:
    """``Auth.require`` for routes declared at module level: the app's own ``Auth``
    (``app.state.auth``, set by ``create_service_app``)."""

    async def dependency(request: Request) -> Principal:
        return await app_auth(request).require(*scopes)(request)

    return dependency


def calling(*scopes: str) -> Callable[[Request], Awaitable[Caller]]:
    """``Auth.caller`` for routes declared at module level: the caller, typed."""

    async def dependency(request: Request) -> Caller:
        return await app_auth(request).caller(*scopes)(request)

    return dependency


def caller(request: Request) -> Caller:
    """The caller an ``Auth.caller`` dependency of this route worked out."""
    found = getattr(request.state, "caller", None)
    if not isinstance(found, Caller):
        raise RuntimeError("this route has no Auth.caller dependency")
    return found


def principal(request: Request) -> Principal:
    """The token's principal, for routes with an ``Auth`` dependency."""
    found = getattr(request.state, "principal", None)
    if not isinstance(found, Principal):
        raise RuntimeError("this route has no Auth dependency")
    return found


def user_of(request: Request) -> str | None:
    """The user a request counts against (limits): the caller's subject; None for a
    service acting for nobody."""
    who = getattr(request.state, "caller", None)
    if isinstance(who, Caller):
        return None if who.service is not None or _plain_service(who) else who.subject
    found = getattr(request.state, "principal", None)
    return found.subject if isinstance(found, Principal) and not found.is_service else None


def audit_note(request: Request, kind: str, **fields: Any) -> None:
    """An audit event the request's end writes, with who, from where and what path."""
    notes: list[tuple[str, dict[str, Any]]] = getattr(request.state, "audit_notes", None) or []
    notes.append((kind, fields))
    request.state.audit_notes = notes


@dataclass(frozen=True)
class Caller:
    """Whose data a request may touch: the token's subject, or, for a service token
    that sends ON_BEHALF_OF, the user it acts for. An ``admin`` token sees everyone's."""

    subject: str
    admin: bool
    scopes: frozenset[str]
    service: str | None = None
    """The service acting for the user, if any."""

    def owns(self, owner: str | None) -> bool:
        return self.admin or (owner is not None and owner == self.subject)


def caller_of(principal: Principal, on_behalf_of: str | None) -> Caller:
    if principal.is_service and on_behalf_of:
        if len(on_behalf_of) > MAX_SUBJECT or not on_behalf_of.isprintable():
            raise Unauthorized(f"the {ON_BEHALF_OF} header must be a printable subject", error="invalid_request")
        return Caller(on_behalf_of, False, principal.scopes, principal.subject)
    return Caller(principal.subject, "admin" in principal.scopes, principal.scopes)


async def until_disconnected(request: Request) -> None:
    """Returns when the client goes away. Only once the body has been read, and not
    while a StreamingResponse (which listens itself) is running."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Readiness:
    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)


ReadyCheck = Callable[[], Awaitable[Readiness]]


async def always_ready() -> Readiness:
    return Readiness(True)


class RequestContextMiddleware:
    """Request id, body-size limit, access log, HTTP metrics, and the last-resort 500.

    A pure ASGI middleware (no ``BaseHTTPMiddleware``) so streaming responses pass
    through untouched.
    """

    def __init__(self, app: ASGIApp, *, metrics: Metrics, max_body_bytes: int, audit: Audit | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.audit = audit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        started = time.perf_counter()
        state = {"status": 500, "started": False}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["started"] = True
                MutableHeaders(scope=message).append("x-request-id", rid)
            await send(message)

        try:
            too_large = _declared_too_large(headers, self.max_body_bytes)
            if b"content-length" in headers and b"transfer-encoding" in headers:
                # Two framings of one body: a proxy and a server could read different requests.
                await _send_json(
                    send_with_id,
                    400,
                    envelope(
                        "send Content-Length or Transfer-Encoding, not both",
                        "invalid_request_error",
                        code="ambiguous_framing",
                    ),
                    {"connection": "close"},
                )
            elif too_large is not None:
                await _send_error(send_with_id, too_large)
            else:
                await self.app(scope, self._limited(receive), send_with_id)
        except Exception as exc:
            log.error("unhandled error", exc_info=exc)
            if not state["started"]:
                body = envelope(internal_message(), "server_error", code="internal_error")
                await _send_json(send_with_id, 500, body)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            method = scope.get("method", "")
            status = str(state["status"])
            self.metrics.requests.labels(template, method, status).inc()
            self.metrics.latency.labels(template, method).observe(elapsed)
            # Failures at info and above; successes at debug (services log what they did).
            level = (
                logging.DEBUG if state["status"] < 400 else logging.INFO if state["status"] < 500 else logging.WARNING
            )
            access_log.log(
                level,
                "request",
                extra={
                    "method": method,
                    "path": scope.get("path"),
                    "status": state["status"],
                    "duration_ms": round(elapsed * 1000, 2),
                },
            )
            if self.audit is not None:
                await self._audit(scope, state["status"])
            request_id_var.reset(token)

    async def _audit(self, scope: Scope, status: int) -> None:
        """The request's audit events: refused tokens, 403s, 429s, deletes, and what the
        route noted (``audit_note``)."""
        assert self.audit is not None
        kept: dict[str, Any] = scope.get("state") or {}
        principal = kept.get("principal")
        who = kept.get("caller") or principal
        context = {
            "subject": getattr(who, "subject", None),
            "service": getattr(who, "service", None),
            "source": (scope.get("client") or ("?",))[0],
            "method": scope.get("method"),
            "path": scope.get("path"),
            "status": status,
            "code": kept.get("error_code"),
            "request_id": request_id_var.get(),
        }
        events: list[tuple[str, dict[str, Any]]] = list(kept.get("audit_notes") or [])
        if status == 401:
            events.append(("token_refused", {"reason": kept.get("auth_refused", "unknown")}))
        elif status == 403:
            events.append(("forbidden", {}))
        elif status == 429:
            events.append(("rate_limited", {}))
        elif scope.get("method") == "DELETE" and 200 <= status < 300 and not _plain_service(who):
            events.append(("deleted", {}))  # a lease's release is not the deletion of data
        for kind, fields in events:
            await self.audit.write(kind, **(context | fields))

    def _limited(self, receive: Receive) -> Receive:
        limit = self.max_body_bytes
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
            return message

        return limited_receive


def _plain_service(who: object) -> bool:
    """A service acting for nobody."""
    if isinstance(who, Caller):
        return who.service is None and who.subject.startswith(SERVICE_SUBJECT_PREFIX)
    return isinstance(who, Principal) and who.is_service


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body larger than {limit / 1_048_576:g} MB")


def _declared_too_large(headers: dict[bytes, bytes], limit: int) -> PayloadTooLarge | None:
    declared = headers.get(b"content-length")
    if declared is None:
        return None
    try:
        size = int(declared)
    except ValueError:
        return None
    return _too_large(limit) if size > limit else None


async def _send_error(send: Send, exc: PayloadTooLarge) -> None:
    await _send_json(send, exc.status, exc.body(), {"connection": "close"})


async def _send_json(send: Send, status: int, body: dict[str, Any], extra: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


def create_service_app(
    *,
    name: str,
    auth: Auth,
    metrics: Metrics,
    max_body_bytes: int,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    ready: ReadyCheck = always_ready,
    info: Callable[[], dict[str, Any]] | None = None,
    public_info: Callable[[], dict[str, Any]] | None = None,
    audit: Audit | None = None,
) -> FastAPI:
    """The FastAPI app every service starts from.

    ``/health`` and ``/ready`` are open. ``/v1/info`` needs any valid token: the
    service, its version, its model and its public limits (``public_info``); an
    ``admin`` token also gets the operator's details (``info``: paths, devices,
    tuning). ``/metrics``, ``/openapi.json`` and ``/v1/audit`` need scope ``admin``.
    """
    app = FastAPI(
        title=f"baton {name}",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)
    app.state.auth = auth  # for the module-level routes' dependencies (signed_in, calling)
    app.add_middleware(RequestContextMiddleware, metrics=metrics, max_body_bytes=max_body_bytes, audit=audit)
    admin = [Depends(auth.require("admin"))]

    router = APIRouter()

    @router.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok", "service": name, "version": __version__}

    @router.get("/ready", tags=["ops"], response_model=None)
    async def readiness() -> Response:
        state = await ready()
        if state.ok:
            return JSONResponse({"status": "ready", "service": name, **state.detail})
        error = ServiceUnavailable(f"{name} is not ready", retry_after_s=1, code="not_ready")
        body = error.body()
        body["error"]["detail"] = state.detail
        return JSONResponse(body, status_code=503, headers=error.headers)

    @router.get("/metrics", tags=["ops"], dependencies=admin)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @router.get("/openapi.json", tags=["ops"], dependencies=admin)
    async def openapi() -> dict[str, Any]:
        return honest_openapi(app)

    @router.get("/v1/info", tags=["ops"], dependencies=[Depends(auth.require())])
    async def service_info(request: Request) -> dict[str, Any]:
        shown: dict[str, Any] = {"service": name, "version": __version__} | (public_info() if public_info else {})
        if "admin" in principal(request).scopes and info is not None:
            shown |= info()
        return shown

    @router.get("/v1/audit", tags=["ops"], dependencies=admin)
    async def audit_events(
        limit: Annotated[int, Query(ge=1, le=1000)] = 100, kind: Annotated[AuditKind | None, Query()] = None
    ) -> dict[str, Any]:
        return {"events": await audit.read(limit, kind) if audit is not None else []}

    app.include_router(router)
    return app
