"""The console's files and its development-token door, in process (the browser tests in
tests/test_console_browser.py use them on a real stack)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from services.gateway.app import create_app
from services.gateway.console import FOLDER
from services.gateway.settings import GatewaySettings


def client(
    dev_token_file: Path | None = None, peer: str = "127.0.0.1", base: str = "http://127.0.0.1:8000"
) -> httpx.AsyncClient:
    app = create_app(GatewaySettings(dev_token_file=dev_token_file))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(peer, 40000)), base_url=base)


@pytest.fixture
def stack_file(tmp_path: Path) -> Path:
    path = tmp_path / "stack.json"
    path.write_text(json.dumps({"services": {}, "token": "header.payload.signature"}))
    return path


async def test_the_page_loads_without_a_token_and_may_load_nothing_from_elsewhere() -> None:
    async with client() as http:
        page = await http.get("/console/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
        assert page.headers["referrer-policy"] == "no-referrer"
        moved = await http.get("/console")
        assert moved.status_code == 308 and moved.headers["location"] == "/console/"
        # Every file the page names is served, with its type.
        named = re.findall(r'(?:src|href)="([^"#:]+)"', page.text)
        assert {"console.js", "console.css"} <= set(named)
        for name in named:
            answer = await http.get(f"/console/{name}")
            assert answer.status_code == 200, name
        for script in FOLDER.glob("*.js"):
            answer = await http.get(f"/console/{script.name}")
            assert answer.headers["content-type"].startswith("text/javascript"), script.name
        missing = await http.get("/console/nothing.js")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_the_files_name_no_other_host_and_evaluate_no_strings() -> None:
    for path in FOLDER.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://", text), path.name
        assert "eval(" not in text and "new Function" not in text and "innerHTML" not in text, path.name


def test_the_token_never_goes_into_a_url() -> None:
    """Requests are built in one place (api.js), the token only ever in a header."""
    sources = {p.name: p.read_text() for p in FOLDER.glob("*.js")}
    assert [name for name, text in sources.items() if "Authorization" in text] == ["api.js"]
    assert all("fetch(" not in text for name, text in sources.items() if name not in ("api.js", "console.js"))


async def test_the_development_token_is_given_to_this_machine_only(stack_file: Path) -> None:
    async with client(stack_file) as http:
        given = await http.get("/console/dev-token", headers={"Sec-Fetch-Site": "same-origin"})
        assert given.status_code == 200 and given.json() == {"token": "header.payload.signature"}
        assert given.headers["cache-control"] == "no-store"
        # Another site's page, even one whose name resolves to 127.0.0.1.
        for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Host": "attacker.example:8000"}):
            refused = await http.get("/console/dev-token", headers=headers)
            assert refused.status_code == 403, headers
            assert "header.payload" not in refused.text
    async with client(stack_file, base="http://localhost:8000") as http:
        assert (await http.get("/console/dev-token")).status_code == 200
    async with client(stack_file, peer="192.168.1.20") as http:
        refused = await http.get("/console/dev-token")
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_allowed"


async def test_no_development_token_where_the_launcher_did_not_start_the_stack(tmp_path: Path) -> None:
    async with client(None) as http:
        answer = await http.get("/console/dev-token")
        assert answer.status_code == 404 and "native launcher" in answer.json()["error"]["message"]
    async with client(tmp_path / "not-yet.json") as http:
        assert (await http.get("/console/dev-token")).status_code == 404
