"""The RAG app built in this process (``create_app(settings)``), on embedded Chroma and
on a Chroma server (`chroma run`, a process of its own), served over Starlette's
TestClient: an httpx client whose requests never leave the process."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from harness.servers import ChromaServer, RedisServer
from services.rag.app import create_app
from services.rag.settings import RAGSettings
from shared.settings import AuthSettings, LimitSettings
from tests.conftest import Mint


class As:
    """One caller's requests, through the one TestClient that runs the app: its event loop
    is the app's (the limiter's Redis connections live on it), so every caller shares it."""

    def __init__(self, client: TestClient, headers: dict[str, str]) -> None:
        self.client = client
        self.headers = headers

    def request(self, method: str, url: str, **options: Any) -> Any:
        headers = {**self.headers, **options.pop("headers", {})}
        return self.client.request(method, url, headers=headers, **options)

    def get(self, url: str, **options: Any) -> Any:
        return self.request("GET", url, **options)

    def post(self, url: str, **options: Any) -> Any:
        return self.request("POST", url, **options)

    def delete(self, url: str, **options: Any) -> Any:
        return self.request("DELETE", url, **options)


def bearer(token: str | None, **headers: str) -> dict[str, str]:
    return headers | ({"Authorization": f"Bearer {token}"} if token is not None else {})


@dataclass
class Rag:
    backend: str
    settings: RAGSettings
    client_of_app: TestClient
    """No token of its own; its lifespan runs the app."""
    http: As
    """As a service (``service:test``) with rag:read and rag:write."""

    def client(self, token: str | None = None, **headers: str) -> As:
        """Another caller of the same app."""
        return As(self.client_of_app, bearer(token, **headers))


@pytest.fixture(
    scope="module", params=["embedded", pytest.param("server", marks=pytest.mark.slow)]
)  # the server: a Chroma process
def rag(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    mint: Mint,
    redis_server: RedisServer,
    auth_settings: AuthSettings,
) -> Iterator[Rag]:
    workdir = tmp_path_factory.mktemp(f"rag-{request.param}")
    chroma = ChromaServer(workdir / "chroma-server").start() if request.param == "server" else None
    settings = RAGSettings(
        auth=auth_settings,
        chroma_url=chroma.url if chroma else None,
        chroma_path=workdir / "chroma",
        journal_path=workdir / "journal.sqlite3",
        max_body_mb=1,
        # Limits and the audit log on a real Redis, as the launcher and compose run it.
        limits=LimitSettings(redis_url=redis_server.url, key_prefix=f"rag-{secrets.token_hex(4)}:"),
    )
    token = mint("rag:read", "rag:write", sub="service:test")
    try:
        with TestClient(create_app(settings), base_url="http://rag") as client:
            yield Rag(request.param, settings, client, As(client, bearer(token)))
    finally:
        if chroma:
            chroma.stop()


@pytest.fixture
def collection() -> str:
    """A collection of one test."""
    return f"t-{secrets.token_hex(4)}"
