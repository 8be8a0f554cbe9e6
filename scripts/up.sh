#!/usr/bin/env bash
# README command 1: install everything, then run the whole stack on this machine.
# Ctrl-C stops it. Extra arguments go to `baton up` (e.g. --detach).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh
exec .venv/bin/baton up --no-fetch "$@"
