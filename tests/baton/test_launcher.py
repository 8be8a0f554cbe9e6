"""The native launcher brings the four services and the gateway up, hands out a token, and leaves nothing behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from baton.launcher import _alive
from harness.launched import LaunchedStack
from harness.servers import REPO_ROOT, wait_until

pytestmark = pytest.mark.slow


def assert_every_service_accepts_the_token(stack: dict[str, object]) -> None:
    assert isinstance(stack["services"], dict)
    services = dict(stack["services"])
    assert set(services) == {"llm", "coordinator", "transcription", "rag", "gateway"}
    gateway = services.pop("gateway")
    behind = httpx.get(f"{gateway}/ready").json()["services"]
    assert behind == {"llm": "ready", "coordinator": "ready", "transcription": "ready", "rag": "ready"}
    for name, url in services.items():
        response = httpx.get(f"{url}/v1/info", headers={"Authorization": f"Bearer {stack['token']}"})
        assert response.status_code == 200, (name, response.text)
        assert response.json()["service"] == name
        refused = httpx.get(f"{url}/v1/info")
        assert refused.status_code == 401


def test_detached_stack_up_and_down(tmp_path: Path) -> None:
    launched = LaunchedStack(tmp_path / "run")
    up = launched.baton("up", "--detach", "--no-fetch")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "Baton is up." in up.stdout
    stack = json.loads((tmp_path / "run" / "stack.json").read_text())
    pids = json.loads((tmp_path / "run" / "pids.json").read_text())
    assert set(pids) == {"launcher", "redis", "coordinator", "rag", "llm", "transcription", "gateway"}
    assert stack["redis_url"] == f"redis://127.0.0.1:{launched.env['BATON_REDIS_PORT']}/0"
    assert_every_service_accepts_the_token(stack)
    for name in ("redis", "coordinator", "rag", "llm", "transcription", "gateway"):
        assert (tmp_path / "run" / "logs" / f"{name}.log").exists()

    again = launched.baton("up", "--detach", "--no-fetch")
    assert again.returncode == 1
    assert "already running" in again.stdout

    down = launched.baton("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert [name for name, pid in pids.items() if _alive(pid)] == []
    assert not (tmp_path / "run" / "stack.json").exists()


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    launched = LaunchedStack(tmp_path / "run")
    stack_file = tmp_path / "run" / "stack.json"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "baton.cli", "up", "--no-fetch"],
        cwd=REPO_ROOT,
        env=launched.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: stack_file.exists() or launcher.poll() is not None, 300, "the stack to be up")
        assert launcher.poll() is None
        pids = json.loads((tmp_path / "run" / "pids.json").read_text())
        assert_every_service_accepts_the_token(json.loads(stack_file.read_text()))
        launcher.send_signal(signal.SIGINT)
        output, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output
    assert "stopped" in output
    assert [name for name, pid in pids.items() if _alive(pid)] == []


def test_a_busy_port_is_reported(tmp_path: Path) -> None:
    import socket

    launched = LaunchedStack(tmp_path / "run")
    port = launched.env["BATON_LLM_PORT"]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", int(port)))
        busy.listen()
        result = launched.baton("up", "--no-fetch", timeout=120)
    assert result.returncode == 1
    assert f"llm port {port} (BATON_LLM_PORT)" in result.stdout
