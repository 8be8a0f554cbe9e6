#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, on a machine with an NVIDIA GPU and the CUDA compiler.
#
#   scripts/gpu-measure.sh build [ARCH]   llama-cpp-python with CUDA, built from its sdist
#                                         into docker/wheels/ (ARCH: CUDA architectures,
#                                         default 90 = H100; SDIST=path to skip the download)
#   scripts/gpu-measure.sh run            every measurement, logs in benchmarks/results/
#   scripts/gpu-measure.sh stack          only the chats during transcription (benchmarks.stack)
#
# PYTHON (default .venv/bin/python) runs both; it needs the project's dependencies with
# the CUDA wheel installed in place of the CPU one (`build` installs it into PYTHON's
# environment unless TARGET names a directory to install into instead).
# Models come from `baton models fetch` (Gemma 3 270M, faster-whisper tiny.en).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
VERSION=$(grep -E '^llama-cpp-python==' requirements.lock | cut -d= -f3)
RESULTS=benchmarks/results
mkdir -p "$RESULTS" docker/wheels

build() {
  local arch=${1:-90} sdist=${SDIST:-}
  if [ -z "$sdist" ]; then
    "$PYTHON" -m pip download --no-deps --no-binary=:all: "llama-cpp-python==${VERSION}" -d "$RESULTS/sdist"
    sdist=$(ls "$RESULTS"/sdist/llama_cpp_python-"${VERSION}"*.tar.gz)
  fi
  echo "==> llama-cpp-python ${VERSION}, CUDA architectures ${arch}, from ${sdist}"
  local started=$SECONDS
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${arch}" FORCE_CMAKE=1 \
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PYTHON" -m pip wheel --no-deps --no-build-isolation --no-cache-dir "$sdist" -w docker/wheels
  echo "==> built in $((SECONDS - started)) s"
  local wheel
  wheel=$(ls -t docker/wheels/llama_cpp_python-"${VERSION}"-*.whl | head -1)
  if [ -n "${TARGET:-}" ]; then
    "$PYTHON" -m pip install -q --no-deps --no-index --upgrade --target "$TARGET" "$wheel"
  else
    "$PYTHON" -m pip install -q --no-deps --no-index --force-reinstall "$wheel"
  fi
  "$PYTHON" -c 'import llama_cpp, sys; ok = llama_cpp.llama_supports_gpu_offload(); print("GPU offload:", ok); sys.exit(not ok)'
}

run() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$RESULTS/gpu-device.txt"
  local gemma whisper
  gemma=$("$PYTHON" -c 'from shared.presets import resolve; print(resolve("gemma-3-270m", "llm")[0])')
  whisper=$("$PYTHON" -c 'from shared.presets import resolve; print(resolve("whisper-tiny.en", "whisper")[0])')
  step "in process: GPU vs CPU, reload/offload, checkpoint API" gpu-direct \
    "$PYTHON" -m benchmarks.gpu_direct --model "$gemma" --out "$RESULTS/gpu-direct.json"
  step "faster-whisper: GPU vs CPU" whisper-gpu \
    "$PYTHON" -m benchmarks.whisper_gpu --model "$whisper" ${AUDIO:+--audio "$AUDIO"} \
    --cublas-shim "$RESULTS/cublas-shim" --out "$RESULTS/whisper-gpu.json"
  step "the LLM service on the card vs in process and llama_cpp.server" llm-gpu \
    "$PYTHON" -m benchmarks.llm --model gemma-3-270m --gpu-layers 99 --prompts 20
  step "the service's reload and offload, VRAM" gpu-service \
    "$PYTHON" -m benchmarks.gpu --model gemma-3-270m
  stack
}

# A chat during a transcription job and during an upload, both models on the card: the
# hand-over pausing the worker (the card holds both), then freeing its memory (a card
# declared too small for both: the CUDA checkpoint API, or a restart without it).
stack() {
  local card
  for card in "" 1000; do
    step "chats during transcription, both on the card${card:+, a card of ${card} MB}" "stack-gpu${card:+-$card}" \
      "$PYTHON" -m benchmarks.stack --model gemma-3-270m --gpu-layers 99 --whisper-device cuda \
      --job-repeat 20 --upload-repeat 10 --skip-storm --cublas-shim "$RESULTS/cublas-shim" ${card:+--gpu-memory-mb $card}
  done
}

# One measurement: its output to the screen and to a log; a failure is reported, not fatal.
step() {
  local title=$1 name=$2
  shift 2
  echo "==> ${title}"
  local started=$SECONDS
  if "$@" 2>&1 | grep -v -E "^(llama_(kv|context|model|new)|ggml_|load_tensors|print_info|load:|init_tokenizer|graph_|sched_|set_abort)" \
    | tee "$RESULTS/${name}.log"; then
    echo "    (${name}: $((SECONDS - started)) s)"
  else
    echo "    (${name} FAILED after $((SECONDS - started)) s; see $RESULTS/${name}.log)"
  fi
}

case "${1:-}" in
  build) shift; build "$@" ;;
  run) run ;;
  stack) stack ;;
  *) sed -n '2,12p' "$0"; exit 2 ;;
esac
