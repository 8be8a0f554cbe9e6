"""The web console: static files under ``/console/``, same-origin with the API.

The page needs no token to load; every call it makes carries the token the user gave it
in an ``Authorization`` header (never in a URL). The files are read once, at start,
from services/gateway/console/, and served with a policy that lets the page load
nothing from anywhere else.

``GET /console/dev-token`` hands the launcher's development token to a page on the
launcher's own machine: only when ``GATEWAY_DEV_TOKEN_FILE`` names the stack file (the
launcher sets it; compose does not), only to a loopback client that called the gateway
by a loopback name (a page on another site that rebinds its DNS name to 127.0.0.1 still
sends its own name), and never to a request another site started.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from shared.errors import NotAllowed, NotFound

FOLDER = Path(__file__).with_name("console")
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


def _files() -> dict[str, tuple[bytes, str]]:
    return {p.name: (p.read_bytes(), TYPES[p.suffix]) for p in sorted(FOLDER.iterdir()) if p.suffix in TYPES}


def _loopback(host: str | None) -> bool:
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _called_by_loopback_name(request: Request) -> bool:
    host = request.headers.get("host", "")
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    return name.lower() in LOOPBACK_NAMES


def mount_console(app: FastAPI, dev_token_file: Path | None) -> None:
    files = _files()

    @app.get("/console", include_in_schema=False)
    async def console_root() -> Response:
        return RedirectResponse("/console/", status_code=308)

    @app.get("/console/dev-token", include_in_schema=False)
    async def dev_token(request: Request) -> Response:
        if dev_token_file is None:
            raise NotFound("no development token here: this stack was not started by the native launcher")
        client = request.client.host if request.client else None
        if not (_loopback(client) and _called_by_loopback_name(request)):
            raise NotAllowed("the development token is given only to this machine (open the console on 127.0.0.1)")
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            raise NotAllowed("the development token is given only to the console's own page")
        try:
            token = json.loads(await anyio.Path(dev_token_file).read_text())["token"]
        except (OSError, ValueError, KeyError, TypeError):
            raise NotFound("the launcher has not written its development token yet") from None
        return JSONResponse({"token": token}, headers={**HEADERS, "Cache-Control": "no-store"})

    @app.get("/console/", include_in_schema=False)
    @app.get("/console/{name}", include_in_schema=False)
    async def console_file(name: str = "index.html") -> Response:
        found = files.get(name)
        if found is None:
            raise NotFound(f"the console has no file {name!r}")
        body, media_type = found
        return Response(body, media_type=media_type, headers=HEADERS)
