"""What the launcher hands its services, in process (no stack started)."""

from __future__ import annotations

from pathlib import Path

import pytest

from baton.launcher import LauncherSettings, Supervisor


@pytest.mark.parametrize("button", [True, False])
def test_the_consoles_development_token_button_can_be_turned_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, button: bool
) -> None:
    monkeypatch.setenv("GATEWAY_DEV_TOKEN_FILE", "/somewhere/else.json")  # inherited: never passed on
    supervisor = Supervisor(LauncherSettings(run_dir=tmp_path / "run", console_dev_token=button))
    supervisor.redis_url = "redis://127.0.0.1:1/0"
    env = supervisor._service_env(tmp_path / "jwt-secret")
    if button:
        assert env["GATEWAY_DEV_TOKEN_FILE"] == str((tmp_path / "run" / "stack.json").resolve())
    else:
        assert "GATEWAY_DEV_TOKEN_FILE" not in env
