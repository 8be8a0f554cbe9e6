#!/usr/bin/env bash
# Ruff (lint and format check) and mypy over the tree.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/ruff ] || ./scripts/install.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
