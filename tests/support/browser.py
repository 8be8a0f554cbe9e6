"""Headless Chromium for the console's tests: Debian's package, driven by Playwright.

Playwright's own browser downloads need a host this machine cannot reach, so it drives
the system's ``chromium`` (installed with apt when root and missing, as
tests/support/postgres.py does for PostgreSQL). The tests write what they want a person
to look at (screenshots) under ``OUTPUT``: ``test-output/`` at the top of the checkout
(ignored by git), or ``BATON_TEST_OUTPUT``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support.servers import REPO_ROOT

OUTPUT = Path(os.environ.get("BATON_TEST_OUTPUT") or REPO_ROOT / "test-output")


class Unavailable(Exception):
    """No Chromium can be had here: the reason is the message."""


def chromium() -> str:
    """The path of Debian's chromium, installing it when root with apt."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable("chromium is not installed, and installing it needs root and apt")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        result = subprocess.run(step, capture_output=True, text=True, timeout=900, env=env, check=False)
        if result.returncode != 0:
            raise Unavailable(f"`{' '.join(step)}` failed: {result.stderr.strip()[-500:]}")
    found = shutil.which("chromium")
    if found is None:
        raise Unavailable("chromium installed, but not on the PATH")
    return found
