"""Fixtures every test can use: a JWT secret, tokens, a real Redis."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from harness.launched import LaunchedStack
from harness.servers import RedisServer
from shared.auth import SCOPES, TokenIssuer
from shared.settings import AuthSettings

Mint = Callable[..., str]


@pytest.fixture(scope="session", autouse=True)
def jwt_secret() -> Iterator[str]:
    """One secret for the session, also in the environment of every process tests start."""
    secret = secrets.token_urlsafe(48)
    previous = os.environ.get("JWT_SECRET")
    os.environ["JWT_SECRET"] = secret
    yield secret
    if previous is None:
        os.environ.pop("JWT_SECRET", None)
    else:
        os.environ["JWT_SECRET"] = previous


@pytest.fixture(scope="session")
def auth_settings(jwt_secret: str) -> AuthSettings:
    return AuthSettings(secret=SecretStr(jwt_secret))


@pytest.fixture(scope="session")
def mint(auth_settings: AuthSettings) -> Mint:
    issuer = TokenIssuer(auth_settings)

    def _mint(*scopes: str, sub: str = "tester", ttl_s: int = 3600) -> str:
        return issuer.mint(sub, scopes or SCOPES, ttl_s)

    return _mint


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def key_prefix() -> str:
    """Redis keys of one test, so tests can share a Redis."""
    return f"test:{secrets.token_hex(4)}:"


@pytest.fixture(scope="session")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedStack]:
    """The whole stack from the native launcher (`baton up --detach`), for the session."""
    stack = LaunchedStack(tmp_path_factory.mktemp("stack") / "run").up()
    yield stack
    stack.down()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print what quality tests measured (``record_property("measured: ...", value)``)
    beside their pass or fail, so a test run shows the figures, not only the verdict."""
    rows = [
        (report.nodeid, name.removeprefix("measured: "), value)
        for outcome in ("passed", "failed")
        for report in terminalreporter.stats.get(outcome, [])
        for name, value in getattr(report, "user_properties", [])
        if report.when == "call" and name.startswith("measured: ")
    ]
    if rows:
        terminalreporter.section("measured")
        for nodeid, name, value in rows:
            terminalreporter.write_line(f"{name}: {value}  ({nodeid})")
