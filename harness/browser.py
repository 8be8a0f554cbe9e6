"""Headless Chromium for the console's tests: Debian's package, driven by Playwright.

Playwright's own browser downloads need a host this machine cannot reach, so it drives
the system's ``chromium`` (installed with apt when root and missing, as
harness/postgres.py does for PostgreSQL). The tests write what they want a person
to look at (screenshots) under ``OUTPUT``: ``test-output/`` at the top of the checkout
(ignored by git), or ``BATON_TEST_OUTPUT``.
"""

from __future__ import annotations

import os
from pathlib import Path

from harness.apt import command
from harness.servers import REPO_ROOT

OUTPUT = Path(os.environ.get("BATON_TEST_OUTPUT") or REPO_ROOT / "test-output")


def chromium() -> str:
    """The path of Debian's chromium, installing it when root with apt."""
    return command(["chromium"], "chromium")
