"""A container runtime for the compose test, on a machine without Docker: Debian's podman
behind its Docker-compatible API, driven by Debian's docker-compose (v1).

Everything podman keeps (images, layers, build caches) lives in one folder,
``BATON_CONTAINERS_DIR`` (default ``~/.cache/baton/containers``), kept between runs
the way pip keeps its cache: the first run builds every layer, later ones reuse what
did not change. Base images cannot be pulled here, so the base is made by debootstrap
from the Debian mirror apt already uses, and uv comes from its PyPI wheel.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from harness.apt import install
from harness.servers import REPO_ROOT

PACKAGES = (
    "podman",
    "buildah",
    "runc",
    "netavark",
    "aardvark-dns",
    "fuse-overlayfs",
    "slirp4netns",
    "uidmap",
    "debootstrap",
    "docker-compose",
)
COMMANDS = ("podman", "debootstrap", "docker-compose")
BASE_IMAGE = "localhost/baton-test-base:bookworm"
BASE_PACKAGES = ("python3", "libgomp1", "ca-certificates")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")

CONTAINERS_CONF = """\
[containers]
# Higher limits than these are refused on this kind of machine.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
# crun fails on hybrid cgroups; runc works.
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
"""


def _run(args: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]


def _checked(args: Sequence[str], timeout: float, **kwargs: object) -> str:
    result = _run(args, timeout=timeout, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args[:4])} ... exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result.stdout


def ensure_installed() -> None:
    """Install Debian's packages when root with apt; else say what is missing."""
    missing = [c for c in COMMANDS if shutil.which(c) is None]
    if not missing:
        return
    install(PACKAGES, ", ".join(missing))


def _mirror() -> str:
    """The Debian mirror apt already uses (deb822 or one-line sources)."""
    sources = [*sorted(Path("/etc/apt").glob("sources.list.d/*.sources")), Path("/etc/apt/sources.list")]
    for path in sources:
        text = path.read_text() if path.is_file() else ""
        match = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(
            r"^deb\s+(?:\[[^]]*\]\s+)?(\S+/debian)\s+bookworm\b", text, re.M
        )
        if match:
            return match.group(1)
    return "http://deb.debian.org/debian"


class Podman:
    """Podman with settings of its own (the machine's are left alone) and its API socket."""

    def __init__(self, home: Path | None = None) -> None:
        default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "baton" / "containers"
        self.home = Path(os.environ.get("BATON_CONTAINERS_DIR", home or default))
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "containers.conf").write_text(CONTAINERS_CONF)
        (self.home / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{self.home / "storage"}"\nrunroot = "{self.home / "run"}"\n'
        )
        self.socket = self.home / "podman.sock"
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(self.home / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.home / "storage.conf"),
        }
        self._service: subprocess.Popen[bytes] | None = None

    def __call__(self, *args: str, timeout: float = 600) -> str:
        return _checked(["podman", *args], timeout, env=self.env)

    def has_image(self, name: str) -> bool:
        return _run(["podman", "image", "exists", name], env=self.env, timeout=60).returncode == 0

    def build(
        self, tag: str, dockerfile: str, *, target: str | None = None, args: dict[str, str] | None = None
    ) -> None:
        """``podman build`` from the repository, with the host's CA bundle as the build secret
        ``ca_bundle`` (PyPI answers through a proxy that re-signs TLS)."""
        command = ["build", "-f", dockerfile, "-t", tag, "--layers"]
        if target:
            command += ["--target", target]
        for name, value in (args or {}).items():
            command += ["--build-arg", f"{name}={value}"]
        if CA_BUNDLE.is_file():
            command += ["--secret", f"id=ca_bundle,src={CA_BUNDLE}"]
        self(*command, str(REPO_ROOT), timeout=1800)

    def base_image(self) -> str:
        """A Debian bookworm base with Python 3.11, made by debootstrap once and kept."""
        if not self.has_image(BASE_IMAGE):
            with tempfile.TemporaryDirectory(dir=self.home) as root:
                _checked(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        f"--include={','.join(BASE_PACKAGES)}",
                        "bookworm",
                        root,
                        _mirror(),
                    ],
                    1800,
                )
                # The image's apt reads the same mirror the base was made from.
                Path(root, "etc/apt/sources.list").write_text(f"deb {_mirror()} bookworm main\n")
                shutil.rmtree(Path(root, "var/cache/apt/archives"), ignore_errors=True)
                tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
                _checked(["podman", "import", "-", BASE_IMAGE], 600, env=self.env, stdin=tar.stdout)
                tar.wait()
        return BASE_IMAGE

    def uv_image(self, version: str) -> str:
        """An image with ``/uv`` only, as ghcr.io/astral-sh/uv has, from uv's PyPI wheel."""
        tag = f"localhost/baton-test-uv:{version}"
        if not self.has_image(tag):
            with tempfile.TemporaryDirectory() as work:
                _checked(
                    [
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        f"uv=={version}",
                        "--no-deps",
                        "--only-binary=:all:",
                        "-d",
                        work,
                    ],
                    600,
                )
                wheel = next(Path(work).glob("uv-*.whl"))
                with zipfile.ZipFile(wheel) as archive:
                    member = next(n for n in archive.namelist() if re.search(r"\.data/scripts/uv$", n))
                    Path(work, "uv").write_bytes(archive.read(member))
                Path(work, "uv").chmod(0o755)
                Path(work, "Dockerfile").write_text("FROM scratch\nCOPY uv /uv\n")
                self("build", "-t", tag, work)
        return tag

    @contextmanager
    def api(self) -> Iterator[str]:
        """The Docker-compatible API on a socket of its own, for docker-compose."""
        self.socket.unlink(missing_ok=True)
        self._service = subprocess.Popen(
            ["podman", "system", "service", "--time=0", f"unix://{self.socket}"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while not self.socket.exists():
                if time.monotonic() > deadline or self._service.poll() is not None:
                    raise RuntimeError("podman system service did not open its socket")
                time.sleep(0.1)
            yield f"unix://{self.socket}"
        finally:
            self._service.terminate()
            try:
                self._service.wait(10)
            except subprocess.TimeoutExpired:
                self._service.kill()

    @contextmanager
    def healthchecks(self, project: str, every_s: float = 1.0, healthy_every_s: float = 10.0) -> Iterator[None]:
        """Run the containers' healthchecks: podman leaves their timers to systemd. Those
        not healthy yet every ``every_s``, side by side, so that compose starts the next
        service about as soon as the ones it depends on are ready (one after another,
        every 2 s, a stack of four levels took 20-24 s to be healthy); the healthy ones
        every ``healthy_every_s``."""
        stop = threading.Event()
        checked: dict[str, float] = {}

        def check(container: str) -> None:
            _run(["podman", "healthcheck", "run", container], env=self.env, timeout=60)

        def loop() -> None:
            while not stop.wait(every_s):
                listed = _run(
                    [
                        "podman",
                        "ps",
                        "--filter",
                        f"label=com.docker.compose.project={project}",
                        "--format",
                        "{{.ID}} {{.Status}}",
                    ],
                    env=self.env,
                    timeout=60,
                )
                now = time.monotonic()
                due = []
                for line in listed.stdout.splitlines():
                    container, _, status = line.partition(" ")
                    if "(healthy)" not in status or now - checked.get(container, 0.0) >= healthy_every_s:
                        due.append(container)
                        checked[container] = now
                runs = [threading.Thread(target=check, args=(container,), daemon=True) for container in due]
                for run in runs:
                    run.start()
                for run in runs:
                    run.join(60)

        thread = threading.Thread(target=loop, name="healthchecks", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(30)
