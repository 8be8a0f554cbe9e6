"""The gateway's app: ``create_app(parts)`` (parts.py; settings are built into parts);
one address for every service.

Paths go to the service the routing table (services/gateway/routes.py) names;
``/v1/models`` merges the services' models; ``/health``, ``/ready`` and the web
console (``/console/``, services/gateway/console.py) are the gateway's own.
Authentication stays in the services: a request's ``Authorization`` travels
untouched, and the gateway itself holds no secret.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from services.gateway.console import mount_console
from services.gateway.parts import Parts, build
from services.gateway.proxy import RETRY_AFTER_S, UNREACHABLE, Proxy, checked_target
from services.gateway.routes import MODELS_FROM, service_for
from services.gateway.settings import GatewaySettings
from shared import __version__
from shared.errors import NotFound, ServiceUnavailable, install_error_handlers
from shared.web import RequestContextMiddleware

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
CLIENT_GONE = 499


def create_app(parts: Parts | GatewaySettings | None = None) -> FastAPI:
    if not isinstance(parts, Parts):
        parts = build(parts)
    made = parts

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await made.close()

    app = FastAPI(
        title="baton gateway", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    settings = made.settings
    app.state.settings, app.state.proxy = settings, made.proxy  # the routes' dependencies
    install_error_handlers(app)
    app.add_middleware(
        RequestContextMiddleware, metrics=made.metrics, max_body_bytes=int(settings.max_body_mb * 1_048_576)
    )
    app.include_router(router)
    mount_console(app, settings.dev_token_file)
    app.include_router(relay_router)  # last: every path no route above answers
    return app


def gateway_settings(request: Request) -> GatewaySettings:
    found: GatewaySettings = request.app.state.settings
    return found


def gateway_proxy(request: Request) -> Proxy:
    found: Proxy = request.app.state.proxy
    return found


Settings = Annotated[GatewaySettings, Depends(gateway_settings)]
Relay = Annotated[Proxy, Depends(gateway_proxy)]

router = APIRouter()
relay_router = APIRouter()


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok", "service": "gateway", "version": __version__}


@router.get("/ready")
async def ready(settings: Settings, proxy: Relay) -> dict[str, Any]:
    """The gateway can route as soon as it runs (a service that is down is that
    request's 503); the services' own readiness is shown beside."""
    names = list(settings.upstreams())
    answers = await asyncio.gather(*(proxy.get_json(name, "/ready", {}) for name in names))
    states = {name: "ready" if status == 200 else "not ready" for name, (status, _) in zip(names, answers, strict=True)}
    shown: dict[str, Any] = {"status": "ready", "service": "gateway", "services": states}
    supervised = _supervisor(settings.supervisor_file)
    if supervised:
        shown["processes"] = supervised
    return shown


@router.get("/v1/models")
async def models(request: Request, proxy: Relay) -> Response:
    """Every service's models, the LLM's first. The caller's token goes to each; an
    answer the LLM refuses (401, 403) is the gateway's answer too."""
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-request-id")}
    answers = await asyncio.gather(*(proxy.get_json(name, "/v1/models", headers) for name in MODELS_FROM))
    first_status, first_body = answers[0]
    if first_body is None and first_status == UNREACHABLE:
        raise _down(MODELS_FROM[0])
    if first_status != 200:
        return JSONResponse(first_body or {}, status_code=first_status)
    data: list[Any] = []
    for status, body in answers:
        if status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
            data.extend(m for m in body["data"] if m not in data)
    return JSONResponse({"object": "list", "data": data})


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request, proxy: Relay) -> Response:
    """The service that serves the model answers; an answer the LLM refuses (401, 403)
    is the gateway's answer too, and no service's model is 404 ``model_not_found``."""
    headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-request-id")}
    path = f"/v1/models/{quote(model_id, safe='')}"
    answers = await asyncio.gather(*(proxy.get_json(name, path, headers) for name in MODELS_FROM))
    for status, body in answers:
        if status == 200 and isinstance(body, dict):
            return JSONResponse(body)
    first_status, first_body = answers[0]
    if first_status in (401, 403):
        return JSONResponse(first_body or {}, status_code=first_status)
    for name, (status, body) in zip(MODELS_FROM, answers, strict=True):
        if body is None and status == UNREACHABLE:
            raise _down(name)  # it may serve the model: "no such model" would be a guess
    raise NotFound(f"the model {model_id!r} does not exist", param="model", code="model_not_found")


@relay_router.api_route("/{path:path}", methods=METHODS, include_in_schema=False)
async def relay(path: str, request: Request, proxy: Relay) -> Response:
    decoded, _ = checked_target(request.scope)  # 400 or 404 for a path that leaves its route
    service = service_for(decoded)
    if service is None:
        raise NotFound("no service answers this path", code="not_found")
    try:
        return await proxy.forward(service, request)
    except ClientDisconnect:
        return Response(status_code=CLIENT_GONE)  # nobody is left to read it


def _down(service: str) -> ServiceUnavailable:
    """A service that did not answer a GET of the gateway's own: 503, as a relayed request
    to it would be, naming the service and never its address."""
    return ServiceUnavailable(
        f"the {service} service is not answering (starting or restarting); try again shortly",
        retry_after_s=RETRY_AFTER_S,
        code="service_unavailable",
    )


def _supervisor(path: Path | None) -> dict[str, Any]:
    """Per process: state, restarts, last exit status and when it was last restarted
    (from the launcher's file; no pid, no path)."""
    if path is None:
        return {}
    try:
        services = json.loads(path.read_text()).get("services", {})
    except (OSError, ValueError, AttributeError):
        return {}
    keep = ("state", "restarts", "last_exit", "last_restart_at")
    return {name: {k: entry.get(k) for k in keep} for name, entry in services.items() if isinstance(entry, dict)}
