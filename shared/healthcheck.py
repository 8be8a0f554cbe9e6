"""A container's healthcheck: ``python -m shared.healthcheck <port>`` exits 0 when the
service on that port answers ``/ready`` with 200, else 1.

A module, not ``python -c "<code>"``: podman's Docker API splits an exec-form healthcheck
at spaces, so a command whose arguments hold spaces never runs there as written."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m shared.healthcheck <port>", file=sys.stderr)  # noqa: T201
        return 2
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{argv[0]}/ready", timeout=3) as response:
            return 0 if response.status == 200 else 1
    except (OSError, urllib.error.URLError):
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
