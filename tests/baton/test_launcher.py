"""The native launcher brings the four services up, hands out a token, and leaves nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from baton.launcher import _alive
from tests.support.servers import REPO_ROOT, free_port, wait_until

pytestmark = pytest.mark.slow


def launcher_env(run_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "REDIS_URL"))}
    env.update(
        BATON_RUN_DIR=str(run_dir),
        BATON_LLM_PORT=str(free_port()),
        BATON_COORDINATOR_PORT=str(free_port()),
        BATON_TRANSCRIPTION_PORT=str(free_port()),
        BATON_RAG_PORT=str(free_port()),
        BATON_REDIS_PORT=str(free_port()),
    )
    return env


def baton(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "baton.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_every_service_accepts_the_token(stack: dict[str, object]) -> None:
    services = stack["services"]
    assert isinstance(services, dict)
    assert set(services) == {"llm", "coordinator", "transcription", "rag"}
    for name, url in services.items():
        response = httpx.get(f"{url}/v1/info", headers={"Authorization": f"Bearer {stack['token']}"})
        assert response.status_code == 200, (name, response.text)
        assert response.json()["service"] == name
        refused = httpx.get(f"{url}/v1/info")
        assert refused.status_code == 401


def test_detached_stack_up_and_down(tmp_path: Path) -> None:
    env = launcher_env(tmp_path / "run")
    up = baton("up", "--detach", "--no-fetch", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "Baton is up." in up.stdout
    stack = json.loads((tmp_path / "run" / "stack.json").read_text())
    pids = json.loads((tmp_path / "run" / "pids.json").read_text())
    assert set(pids) == {"launcher", "redis", "coordinator", "rag", "llm", "transcription"}
    assert stack["redis_url"] == f"redis://127.0.0.1:{env['BATON_REDIS_PORT']}/0"
    assert_every_service_accepts_the_token(stack)
    for name in ("redis", "coordinator", "rag", "llm", "transcription"):
        assert (tmp_path / "run" / "logs" / f"{name}.log").exists()

    again = baton("up", "--detach", "--no-fetch", env=env)
    assert again.returncode == 1
    assert "already running" in again.stdout

    down = baton("down", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert [name for name, pid in pids.items() if _alive(pid)] == []
    assert not (tmp_path / "run" / "stack.json").exists()


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    env = launcher_env(tmp_path / "run")
    stack_file = tmp_path / "run" / "stack.json"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "baton.cli", "up", "--no-fetch"],
        cwd=REPO_ROOT,
        env=env,
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

    env = launcher_env(tmp_path / "run")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", int(env["BATON_LLM_PORT"])))
        busy.listen()
        result = baton("up", "--no-fetch", env=env, timeout=120)
    assert result.returncode == 1
    assert f"llm port {env['BATON_LLM_PORT']} (BATON_LLM_PORT)" in result.stdout
