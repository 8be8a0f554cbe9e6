"""llama-cpp-python on the card vs on the CPU, in process, and the CUDA checkpoint API.

    python -m benchmarks.gpu_direct --model PATH.gguf [--rounds 5] [--tokens 128]

Needs llama-cpp-python built with CUDA and an NVIDIA driver; reads VRAM through NVML
(``nvidia-ml-py``). One run, same model and prompt on both devices:

1. Load time with every layer on the card and with none; time to first token and
   decode tokens/s, greedy, end-of-text banned so every run decodes ``--tokens``.
2. The service's hand-over, done directly: reload (a model on the CPU closed, reopened
   with every layer on the card) and offload (closed, reopened with none), with this
   process's VRAM after each (NVML's per-process figure).
3. The driver's checkpoint API (``cuCheckpointProcess{Lock,Checkpoint,Restore,Unlock}``)
   on a child process holding the model on the card: the time of each step, the child's
   VRAM before and after, and whether the tokens it generates after the restore equal
   those before. A refusal is reported with the driver's own error.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT = "The history of the lighthouse on the northern cape begins in"
CONTEXT = 2048
ALL_LAYERS = 99


# --- VRAM, from NVML -------------------------------------------------------------------


def _nvml() -> Any:
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def process_vram_mib(pid: int) -> float:
    """VRAM that NVML says ``pid`` holds on GPU 0 (0 when it holds none)."""
    nvml = _nvml()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    for proc in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == pid:
            return (proc.usedGpuMemory or 0) / 2**20
    return 0.0


def device_used_mib() -> float:
    nvml = _nvml()
    return nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(0)).used / 2**20


def device_info() -> dict[str, str]:
    nvml = _nvml()
    handle = nvml.nvmlDeviceGetHandleByIndex(0)
    name = nvml.nvmlDeviceGetName(handle)
    driver = nvml.nvmlSystemGetDriverVersion()
    return {
        "gpu": name.decode() if isinstance(name, bytes) else name,
        "driver": driver.decode() if isinstance(driver, bytes) else driver,
        "cuda_driver_api": str(nvml.nvmlSystemGetCudaDriverVersion()),
    }


# --- the model, in this process ----------------------------------------------------------


def load(path: Path, layers: int, off_card: bool = False) -> tuple[Any, float]:
    """``off_card``: no KV cache and no op offload on the card either (the service's offload)."""
    import llama_cpp

    started = time.perf_counter()
    llama = llama_cpp.Llama(
        model_path=str(path),
        n_gpu_layers=layers,
        offload_kqv=not off_card,
        op_offload=not off_card,
        n_ctx=CONTEXT,
        verbose=False,
        seed=1,
    )
    return llama, time.perf_counter() - started


def generate(llama: Any, tokens: int) -> tuple[float, float, list[int]]:
    """(time to first token, decode tokens/s, the token ids), greedy, end-of-text banned."""
    llama.reset()
    prompt = llama.tokenize(PROMPT.encode(), add_bos=True)
    sent = time.perf_counter()
    first = last = 0.0
    ids: list[int] = []
    for token in llama.generate(prompt, temp=0.0, top_k=1, logits_processor=_ban(llama.token_eos())):
        now = time.perf_counter()
        if not ids:
            first = now
        last = now
        ids.append(int(token))
        if len(ids) >= tokens:
            break
    rate = (len(ids) - 1) / (last - first) if len(ids) > 1 and last > first else float("nan")
    return first - sent, rate, ids


def _ban(token: int) -> Any:
    import llama_cpp
    import numpy as np

    def processor(_ids: Any, scores: Any) -> Any:
        scores[token] = -np.inf
        return scores

    return llama_cpp.LogitsProcessorList([processor])


def speed(path: Path, layers: int, rounds: int, tokens: int) -> dict[str, Any]:
    llama, _ = load(path, layers)
    try:
        generate(llama, 8)  # warm up: kernels, graphs, caches
        runs = [generate(llama, tokens) for _ in range(rounds)]
    finally:
        llama.close()
    return {
        "ttft_ms": round(statistics.median(r[0] for r in runs) * 1000, 2),
        "tokens_per_s": round(statistics.median(r[1] for r in runs), 1),
        "ids": runs[0][2],
    }


def handover(path: Path, rounds: int) -> dict[str, Any]:
    """Reload (CPU model closed, reopened on the card) and offload (the reverse), as the
    LLM service does on a hand-over, with this process's VRAM after each step. Offloads
    alternate between llama.cpp's defaults for 0 layers (KV cache and op offload still
    on the card) and ``off_card``, what the service does."""
    pid = os.getpid()
    vram: dict[str, list[float]] = {"on_cpu": [], "on_gpu": [], "after_offload": [], "after_offload_off_card": []}
    reload_s: list[float] = []
    offload_s: dict[str, list[float]] = {"defaults": [], "off_card": []}
    llama, _ = load(path, 0, off_card=True)
    vram["on_cpu"].append(process_vram_mib(pid))
    try:
        for i in range(rounds * 2):
            off_card = i % 2 == 1
            started = time.perf_counter()
            llama.close()
            llama, _ = load(path, ALL_LAYERS)
            reload_s.append(time.perf_counter() - started)
            vram["on_gpu"].append(process_vram_mib(pid))
            started = time.perf_counter()
            llama.close()
            llama, _ = load(path, 0, off_card=off_card)
            generate(llama, 4)  # the model answers from the CPU: what does that put on the card?
            offload_s["off_card" if off_card else "defaults"].append(time.perf_counter() - started)
            vram["after_offload_off_card" if off_card else "after_offload"].append(process_vram_mib(pid))
        llama.close()
        closed = process_vram_mib(pid)
    finally:
        llama.close()
    return {
        "reload_ms": [round(s * 1000, 1) for s in reload_s],
        "offload_ms": {k: [round(s * 1000, 1) for s in v] for k, v in offload_s.items()},
        "vram_mib": vram,
        "vram_mib_model_closed": closed,
    }


# --- the driver's checkpoint API, on a child process --------------------------------------


class LockArgs(ctypes.Structure):
    _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint), ("reserved1", ctypes.c_uint64 * 7)]


def _driver() -> ctypes.CDLL:
    cuda = ctypes.CDLL("libcuda.so.1")
    _check(cuda, "cuInit", cuda.cuInit(0))
    return cuda


def _check(cuda: ctypes.CDLL, what: str, code: int) -> None:
    if code != 0:
        name = ctypes.c_char_p()
        cuda.cuGetErrorName(code, ctypes.byref(name))
        text = ctypes.c_char_p()
        cuda.cuGetErrorString(code, ctypes.byref(text))
        raise RuntimeError(f"{what}: {code} {(name.value or b'').decode()}: {(text.value or b'').decode()}")


def _state(cuda: ctypes.CDLL, pid: int) -> str:
    state = ctypes.c_int()
    _check(cuda, "cuCheckpointProcessGetState", cuda.cuCheckpointProcessGetState(pid, ctypes.byref(state)))
    return {0: "running", 1: "locked", 2: "checkpointed", 3: "failed"}.get(state.value, str(state.value))


def child(path: Path, tokens: int) -> None:
    """Hold the model on the card; generate on every line read from stdin."""
    llama, _ = load(path, ALL_LAYERS)
    generate(llama, 8)
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        _, _, ids = generate(llama, tokens)
        print(json.dumps({"ids": ids}), flush=True)
    llama.close()


def checkpoint(path: Path, tokens: int) -> dict[str, Any]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.gpu_direct", "--model", str(path), "--tokens", str(tokens), "--child"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    out: dict[str, Any] = {}

    def ask() -> list[int]:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        return list(json.loads(proc.stdout.readline())["ids"])

    try:
        json.loads(proc.stdout.readline())
        before = ask()
        cuda = _driver()
        out["vram_mib_held"] = process_vram_mib(proc.pid)
        out["device_used_mib_held"] = device_used_mib()
        args = LockArgs(timeoutMs=10_000)
        steps: dict[str, float] = {}
        for name, call in (
            ("lock", lambda: cuda.cuCheckpointProcessLock(proc.pid, ctypes.byref(args))),
            ("checkpoint", lambda: cuda.cuCheckpointProcessCheckpoint(proc.pid, None)),
        ):
            started = time.perf_counter()
            _check(cuda, f"cuCheckpointProcess{name.title()}", call())
            steps[name] = round((time.perf_counter() - started) * 1000, 1)
        out["state_checkpointed"] = _state(cuda, proc.pid)
        out["vram_mib_checkpointed"] = process_vram_mib(proc.pid)
        out["device_used_mib_checkpointed"] = device_used_mib()
        for name, call in (
            ("restore", lambda: cuda.cuCheckpointProcessRestore(proc.pid, None)),
            ("unlock", lambda: cuda.cuCheckpointProcessUnlock(proc.pid, None)),
        ):
            started = time.perf_counter()
            _check(cuda, f"cuCheckpointProcess{name.title()}", call())
            steps[name] = round((time.perf_counter() - started) * 1000, 1)
        out["steps_ms"] = steps
        out["state_restored"] = _state(cuda, proc.pid)
        out["vram_mib_restored"] = process_vram_mib(proc.pid)
        after = ask()
        out["tokens_identical"] = before == after
        out["tokens_compared"] = len(before)
    except Exception as error:  # the driver or the machine refused: report it as it said
        out["error"] = f"{type(error).__name__}: {error}"
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if args.child:
        child(args.model, args.tokens)
        return

    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        sys.exit("benchmarks.gpu_direct needs llama-cpp-python built with CUDA")
    results: dict[str, Any] = {"device": device_info(), "model": args.model.name}
    loads = {"gpu": [], "cpu": []}  # type: dict[str, list[float]]
    for _ in range(args.rounds):
        for device, layers in (("gpu", ALL_LAYERS), ("cpu", 0)):
            llama, seconds = load(args.model, layers)
            llama.close()
            loads[device].append(round(seconds * 1000, 1))
    results["load_ms"] = loads
    gpu = speed(args.model, ALL_LAYERS, args.rounds, args.tokens)
    cpu = speed(args.model, 0, args.rounds, args.tokens)
    results["speed"] = {"gpu": gpu, "cpu": cpu, "same_tokens": gpu.pop("ids") == cpu.pop("ids")}
    results["handover"] = handover(args.model, args.rounds)
    results["checkpoint"] = checkpoint(args.model, args.tokens)
    report(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def report(r: dict[str, Any]) -> None:
    med = statistics.median
    print(json.dumps(r["device"]))
    load = r["load_ms"]
    print(f"load: all layers on the card {med(load['gpu']):.0f} ms, on the CPU {med(load['cpu']):.0f} ms (median)")
    s = r["speed"]
    print(
        f"first token: GPU {s['gpu']['ttft_ms']} ms, CPU {s['cpu']['ttft_ms']} ms "
        f"({s['cpu']['ttft_ms'] / s['gpu']['ttft_ms']:.1f}x); decode: GPU {s['gpu']['tokens_per_s']} tok/s, "
        f"CPU {s['cpu']['tokens_per_s']} tok/s ({s['gpu']['tokens_per_s'] / s['cpu']['tokens_per_s']:.1f}x); "
        f"same greedy tokens: {s['same_tokens']}"
    )
    h = r["handover"]
    v = h["vram_mib"]
    off = h["offload_ms"]
    print(
        f"reload (CPU -> card) {med(h['reload_ms']):.0f} ms, offload (card -> CPU, then 4 tokens) "
        f"{med(off['off_card']):.0f} ms (llama.cpp's defaults: {med(off['defaults']):.0f} ms); process VRAM: "
        f"on the card {med(v['on_gpu']):.0f} MiB, after the offload {med(v['after_offload_off_card']):.0f} MiB "
        f"(llama.cpp's defaults: {med(v['after_offload']):.0f} MiB), model closed {h['vram_mib_model_closed']:.0f} MiB"
    )
    print("checkpoint API: " + json.dumps(r["checkpoint"]))


if __name__ == "__main__":
    main()
