#!/usr/bin/env bash
# Builds llama.cpp's own llama-server, the peer benchmarks/concurrency.py compares the
# LLM service with, from the llama.cpp sources vendored in the pinned llama-cpp-python
# sdist (the same llama.cpp the service runs). Prints the binary's path.
#
#   ./scripts/build-llama-server.sh        # about 8 minutes on 2 cores, once; then cached
#
# The binary is kept in ~/.cache/baton/llama-server (BATON_LLAMA_SERVER_DIR), keyed by
# the pinned version; CMAKE_ARGS passes on (e.g. -DGGML_CUDA=on). Needs the install's
# .venv (for pip) and cmake, a C++ compiler and make or ninja.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(grep -E '^llama-cpp-python==' requirements.lock | cut -d= -f3)
out=${BATON_LLAMA_SERVER_DIR:-$HOME/.cache/baton/llama-server}
stamp="$version ${CMAKE_ARGS:-}"
if [ -x "$out/bin/llama-server" ] && [ "$(cat "$out/version" 2>/dev/null)" = "$stamp" ]; then
  echo "$out/bin/llama-server"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "==> downloading the llama-cpp-python $version sdist" >&2
.venv/bin/python -m pip --disable-pip-version-check download "llama-cpp-python==$version" \
  --no-binary llama-cpp-python --no-deps -d "$work" -q >&2
tar xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
echo "==> building llama-server from its vendored llama.cpp" >&2
# shellcheck disable=SC2086
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF ${CMAKE_ARGS:-} >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$out/bin"
cp "$work/build/bin/llama-server" "$out/bin/llama-server"
echo "$stamp" > "$out/version"
echo "$out/bin/llama-server"
