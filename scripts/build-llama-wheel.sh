#!/usr/bin/env bash
# Build llama-cpp-python with CUDA into docker/wheels/, inside NVIDIA's CUDA
# development container (needs Docker; no GPU needed to build). The LLM image
# installs the wheel it finds there.
#
#   scripts/build-llama-wheel.sh [CUDA architectures]   (default 90: H100)
#   e.g. 80 (A100), 86 (A10, RTX 30xx), 89 (L4, L40, RTX 40xx), "80;90"
set -euo pipefail
cd "$(dirname "$0")/.."

ARCH=${1:-90}
VERSION=$(grep -E '^llama-cpp-python==' requirements.lock | cut -d= -f3)
PYTHON=$(grep -E '^ARG PYTHON_VERSION=' docker/Dockerfile | cut -d= -f2)
CUDA_DEVEL=${CUDA_DEVEL:-nvidia/cuda:12.6.3-cudnn-devel-ubuntu24.04}

echo "==> llama-cpp-python ${VERSION} for CUDA architectures ${ARCH}, Python ${PYTHON}, in ${CUDA_DEVEL}"
mkdir -p docker/wheels
docker run --rm \
  -v "$PWD/docker/wheels:/out" \
  -e CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${ARCH}" \
  -e FORCE_CMAKE=1 \
  "$CUDA_DEVEL" bash -euo pipefail -c "
    apt-get update && apt-get install -y --no-install-recommends build-essential cmake ca-certificates curl
    curl -LsSf https://astral.sh/uv/install.sh | env UV_INSTALL_DIR=/usr/local/bin sh
    uv python install ${PYTHON}
    uv venv --seed --python ${PYTHON} /build
    /build/bin/pip wheel --no-deps --no-cache-dir 'llama-cpp-python==${VERSION}' -w /out
    chown -R $(id -u):$(id -g) /out
  "
ls -l docker/wheels/*.whl
