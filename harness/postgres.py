"""A throwaway PostgreSQL server (Debian's package) for the text-to-SQL tests.

``initdb`` and ``pg_ctl`` come from the machine (installed with apt when root and
missing, as harness/containers.py does for podman). PostgreSQL refuses to run as
root, so as root the cluster belongs to Debian's ``postgres`` user. Trust
authentication on 127.0.0.1 only; the cluster is deleted afterwards.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from harness.apt import Unavailable, install
from harness.servers import free_port


def _binaries() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = [p for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl") if p.parts[-3].isdigit()]
    return max(versions, key=lambda p: int(p.parts[-3])).parent if versions else None


def ensure_installed() -> Path:
    """The folder of initdb and pg_ctl, installing Debian's postgresql when root with apt."""
    found = _binaries()
    if found is not None:
        return found
    install(["postgresql"], "PostgreSQL")
    found = _binaries()
    if found is None:
        raise Unavailable("postgresql installed, but no pg_ctl was found")
    return found


class PostgresServer:
    def __init__(self) -> None:
        self.bin = ensure_installed()
        # Not under pytest's tmp folder: that is root's alone, and the server may not run as root.
        self.workdir = Path(tempfile.mkdtemp(prefix="baton-pg-"))
        self.data = self.workdir / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            owner = pwd.getpwnam("postgres")
            os.chown(self.workdir, owner.pw_uid, owner.pw_gid)

    def _run(self, args: Sequence[str], timeout: float = 120) -> str:
        result = subprocess.run(
            [*self.as_user, *args], capture_output=True, text=True, timeout=timeout, check=False, cwd="/"
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} exited {result.returncode}: {result.stderr[-2000:]}")
        return result.stdout

    def start(self) -> PostgresServer:
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.workdir} -c fsync=off"
        log = self.workdir / "server.log"
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(log), "-w", "start"])
        return self

    def url(self, user: str = "postgres", database: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.data.exists():
            self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"])
        shutil.rmtree(self.workdir, ignore_errors=True)
