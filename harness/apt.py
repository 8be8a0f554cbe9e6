"""Debian packages the tests need (a browser, PostgreSQL, podman), installed with apt
when they are missing and the tests run as root; otherwise the tests that need them are
skipped, saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence


class Unavailable(Exception):
    """What a test needs cannot be had here: the reason is the message."""


def install(packages: Sequence[str], missing: str) -> None:
    """``apt-get install`` the packages; ``missing`` names what was not found, for the message."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable(f"{missing} not installed, and installing it needs root and apt")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        result = subprocess.run(step, capture_output=True, text=True, timeout=900, env=env, check=False)
        if result.returncode != 0:
            raise Unavailable(f"`{' '.join(step)}` failed: {result.stderr.strip()[-500:]}")


def command(names: Sequence[str], package: str) -> str:
    """The path of the first of ``names`` on the PATH, installing ``package`` if none is."""
    for _ in range(2):
        for name in names:
            found = shutil.which(name)
            if found:
                return found
        install([package], names[0])
    raise Unavailable(f"{package} installed, but no {names[0]} on the PATH")
