#!/usr/bin/env bash
# Installs everything into .venv (idempotent): pinned dependencies, Baton itself,
# and the bundled models. Used by scripts/up.sh and scripts/test.sh.
#
# The first run compiles llama-cpp-python from source (about 6 minutes on 2 cores);
# pip caches the wheel, so later installs take seconds. Set CMAKE_ARGS to build it
# for CUDA (e.g. CMAKE_ARGS="-DGGML_CUDA=on"): a change of CMAKE_ARGS recompiles it,
# bypassing pip's cache, which holds the build made without them.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  for candidate in python3.11 python3.12 python3.13 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON=$candidate; break; fi
  done
fi
if [ -z "$PYTHON" ] || ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: Baton needs Python 3.11 or newer (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

stamp=.venv/.baton-installed
want=$( (cat requirements.lock pyproject.toml; echo "CMAKE_ARGS=${CMAKE_ARGS:-}") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  llama=$(grep -E '^llama-cpp-python==' requirements.lock)
  build="$llama CMAKE_ARGS=${CMAKE_ARGS:-}"
  if [ "$(cat .venv/.baton-llama 2>/dev/null)" != "$build" ]; then
    echo "==> installing $llama (compiled from source the first time: about 6 minutes on 2 cores)"
    cache=()
    if [ -n "${CMAKE_ARGS:-}" ]; then cache=(--no-cache-dir); fi
    # pip -v prints the compiler's progress lines; show them as percentages.
    "${PIP[@]}" install -v --force-reinstall --no-deps "${cache[@]}" -c requirements.lock "$llama" 2>&1 | awk '
      match($0, /\[ *[0-9]+\/[0-9]+\]/) {   # ninja: [12/345]
        split(substr($0, RSTART + 1, RLENGTH - 2), n, "/"); p = int(100 * n[1] / n[2]);
      }
      match($0, /^\[ *[0-9]+%\]/) {          # make: [ 12%]
        p = int(substr($0, RSTART + 1, RLENGTH - 3));
      }
      p >= shown + 5 { shown = p; printf "    compiling llama.cpp: %3d%%\n", p; fflush() }
      /Successfully installed|Requirement already satisfied: llama|Using cached|ERROR|error:/ { print "    " $0; fflush() }'
    test "${PIPESTATUS[0]}" -eq 0
    echo "$build" > .venv/.baton-llama
  fi
  echo "==> installing the pinned dependencies and Baton"
  "${PIP[@]}" install --quiet -c requirements.lock -e '.[all,dev]'
  echo "$want" > "$stamp"
fi

echo "==> checking the bundled models"
.venv/bin/baton models fetch
