"""The stack as users run it: `baton up --detach` in a run folder of its own, on free ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from harness.servers import REPO_ROOT, free_port


class LaunchedStack:
    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("JWT_", "REDIS_URL"))}
        self.env.update(
            BATON_RUN_DIR=str(run_dir),
            BATON_LLM_PORT=str(free_port()),
            BATON_COORDINATOR_PORT=str(free_port()),
            BATON_TRANSCRIPTION_PORT=str(free_port()),
            BATON_RAG_PORT=str(free_port()),
            BATON_GATEWAY_PORT=str(free_port()),
            BATON_REDIS_PORT=str(free_port()),
        )
        self.info: dict[str, Any] = {}

    def baton(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "baton.cli", *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def up(self) -> LaunchedStack:
        result = self.baton("up", "--detach", "--no-fetch")
        if result.returncode != 0:
            raise RuntimeError(f"baton up failed:\n{result.stdout}\n{result.stderr}")
        self.info = json.loads((self.run_dir / "stack.json").read_text())
        return self

    def down(self) -> None:
        self.baton("down")

    def url(self, service: str) -> str:
        return str(self.info["services"][service])

    def client(self, service: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url(service), headers={"Authorization": f"Bearer {self.info['token']}"}, timeout=600
        )
