"""A client library that cannot share the test environment (LlamaIndex's OpenAI
integration wants ``openai<3``; the Agents SDK the tests use wants ``openai>=3``), in a
virtual environment of its own under ``~/.cache/baton/clients``: made and installed from
PyPI once, then reused, the way pip keeps its cache."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from harness.apt import Unavailable


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "baton" / "clients"


def client_python(requirements: Sequence[str]) -> Path:
    """The Python of a virtual environment holding ``requirements`` (made on first use)."""
    key = hashlib.sha256("\n".join([sys.version, *requirements]).encode()).hexdigest()[:16]
    home = cache_root() / key
    python = home / "bin" / "python"
    if (home / ".complete").exists():
        return python
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(home)],
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
    ]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
        if result.returncode != 0:
            raise Unavailable(f"`{' '.join(step[-3:])}` failed: {result.stderr.strip()[-500:]}")
    (home / ".complete").write_text("\n".join(requirements) + "\n")
    return python
