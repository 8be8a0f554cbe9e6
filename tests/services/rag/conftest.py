"""A real RAG service process, on embedded Chroma and on a Chroma server (`chroma run`)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from harness.servers import ChromaServer, RedisServer, ServiceProcess
from tests.conftest import Mint


@dataclass
class Rag:
    backend: str
    service: ServiceProcess
    http: httpx.Client

    @property
    def url(self) -> str:
        return self.service.url

    def restart(self) -> None:
        self.service.stop()
        self.service.start()


@pytest.fixture(scope="module", params=["embedded", "server"])
def rag(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    log_dir: Path,
    mint: Mint,
    redis_server: RedisServer,
) -> Iterator[Rag]:
    workdir = tmp_path_factory.mktemp(f"rag-{request.param}")
    chroma = ChromaServer(workdir / "chroma-server").start() if request.param == "server" else None
    env = {"RAG_CHROMA_URL": chroma.url} if chroma else {"RAG_CHROMA_PATH": str(workdir / "chroma")}
    env["RAG_JOURNAL_PATH"] = str(workdir / "journal.sqlite3")
    env["RAG_MAX_BODY_MB"] = "1"
    # Limits and the audit log on a real Redis, as the launcher and compose run it.
    env |= {"BATON_REDIS_URL": redis_server.url, "BATON_KEY_PREFIX": f"rag-{secrets.token_hex(4)}:"}
    service = ServiceProcess("rag", env, log_dir).start()
    token = mint("rag:read", "rag:write", sub="service:test")
    with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
        yield Rag(request.param, service, http)
    service.stop()
    if chroma:
        chroma.stop()


@pytest.fixture
def collection() -> str:
    """A collection of one test."""
    return f"t-{secrets.token_hex(4)}"
