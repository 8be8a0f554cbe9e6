from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from baton.cli import parse_duration
from harness.servers import REPO_ROOT
from shared.auth import TokenVerifier
from shared.settings import AuthSettings


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("24h", 86400), ("7d", 604800)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "0"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_token_command_mints_what_was_asked(auth_settings: AuthSettings) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "baton.cli",
            "token",
            "--sub",
            "alice",
            "--scope",
            "chat",
            "--scope",
            "rag:read",
            "--ttl",
            "15m",
        ],
        cwd=REPO_ROOT,
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    principal = TokenVerifier(auth_settings).verify(result.stdout.strip())
    assert principal.subject == "alice"
    assert principal.scopes == {"chat", "rag:read"}
    assert principal.claims["exp"] - principal.claims["iat"] == 900


def test_token_command_without_a_secret_says_which_variable(tmp_path: object) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JWT_")}
    env["BATON_RUN_DIR"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "baton.cli", "token"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "JWT_SECRET" in result.stderr
