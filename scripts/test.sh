#!/usr/bin/env bash
# README command 2: install everything, then run every test (slow ones included).
# Extra arguments go to pytest (e.g. -m "not slow", -k coordinator).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
exec .venv/bin/python -m pytest "$@"
