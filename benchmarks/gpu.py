"""The LLM's GPU figures on a CUDA box: reload and offload times, VRAM before and after.

    .venv/bin/python -m benchmarks.gpu [--model gemma-3-270m] [--layers 99] [--rounds 5]

Needs llama-cpp-python built with CUDA and ``nvidia-smi``; says so and stops otherwise
(``--cpu`` runs the same rounds on the CPU with GEMMA_FORCE_RELOAD, to check the
script itself, and reports no VRAM).

One run: a coordinator on a real Redis and the LLM service (keep-alive on). Each round
asks one question (the service takes the lease and loads ``--layers`` layers onto the
GPU), reads the VRAM the service process holds, then takes the lease itself as an
interactive holder (the service offloads to the CPU and releases), and reads the VRAM
again. Reload and offload times are the service's own (``llm_reload_seconds``,
``llm_offload_seconds``), set beside loading the same model with llama-cpp-python
directly, in-process, with and without the layers on the GPU.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import llama_cpp

from benchmarks.support import coordinated, dev_token, metric, save, service_token, table
from harness.servers import ServiceProcess, free_port
from shared.presets import resolve

CONTEXT = 4096


def process_vram_mib(pid: int) -> float | None:
    """GPU memory held by one process, from nvidia-smi; None without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid):
            return float(fields[1])
    return 0.0


def histogram(metrics: str, name: str) -> tuple[float, int]:
    """(sum, count) of a Prometheus histogram."""
    return metric(metrics, f"{name}_sum"), int(metric(metrics, f"{name}_count"))


def direct_load_s(path: Path, layers: int) -> float:
    started = time.monotonic()
    llama = llama_cpp.Llama(model_path=str(path), n_gpu_layers=layers, n_ctx=CONTEXT, verbose=False)
    seconds = time.monotonic() - started
    llama.close()
    return seconds


def rounds(llm: ServiceProcess, gpu: httpx.Client, chat: httpx.Client, model: str, n: int) -> dict[str, Any]:
    assert llm.process is not None
    pid = llm.process.pid
    vram: dict[str, list[float]] = {"before": [], "loaded": [], "offloaded": []}
    reload_s: list[float] = []
    offload_s: list[float] = []
    body = {"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
    for _ in range(n):
        before = process_vram_mib(pid)
        reloads = histogram(chat.get("/metrics").text, "llm_reload_seconds")
        response = chat.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        loaded = process_vram_mib(pid)
        page = chat.get("/metrics").text
        after, offloads = histogram(page, "llm_reload_seconds"), histogram(page, "llm_offload_seconds")
        # Ask for the card: the service offloads, then releases, and only then is this granted.
        grant = gpu.post("/v1/leases", json={"holder": "transcription", "priority": "interactive", "wait_ms": 60000})
        grant.raise_for_status()
        offloaded = process_vram_mib(pid)
        gpu.delete(f"/v1/leases/{grant.json()['lease_id']}")
        done = histogram(chat.get("/metrics").text, "llm_offload_seconds")
        if after[1] != reloads[1] + 1 or done[1] != offloads[1] + 1:
            raise RuntimeError(f"expected one reload and one offload per round, saw {after} {done}")
        reload_s.append(after[0] - reloads[0])
        offload_s.append(done[0] - offloads[0])
        for key, value in (("before", before), ("loaded", loaded), ("offloaded", offloaded)):
            if value is not None:
                vram[key].append(value)
    return {"reload_s": reload_s, "offload_s": offload_s, "vram_mib": vram}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--layers", type=int, default=99, help="GEMMA_GPU_LAYERS (99: every layer)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="no GPU: reload on the CPU, to check this script")
    args = parser.parse_args()

    on_gpu = bool(llama_cpp.llama_supports_gpu_offload())
    if not args.cpu and (not on_gpu or shutil.which("nvidia-smi") is None):
        sys.exit(
            "benchmarks.gpu needs llama-cpp-python built with CUDA (llama_supports_gpu_offload() is "
            f"{on_gpu}) and nvidia-smi on the PATH; see docs/benchmarks.md, Measured on a GPU. --cpu checks the script."
        )
    path, _ = resolve(args.model, "llm")
    layers = args.layers
    token = dev_token()
    headers = {"Authorization": f"Bearer {token}"}
    # Only services hold the card; transcription may ask for it as an interactive holder.
    holder = {"Authorization": f"Bearer {service_token('transcription')}"}
    # A card declared too small for two holders: every hand-over must free memory, so the
    # service offloads its layers each time (on a card with room it keeps them).
    with (
        tempfile.TemporaryDirectory() as tmp,
        coordinated(Path(tmp), COORDINATOR_GPU_MEMORY_MB="1") as (
            _,
            coordinator,
        ),
    ):
        env = {
            "GPU_COORDINATOR_URL": coordinator.url,
            "RAG_SERVICE_URL": f"http://127.0.0.1:{free_port()}",
            "GEMMA_MODEL_PATH": args.model,
            "GEMMA_GPU_LAYERS": str(layers),
            "GEMMA_CONTEXT_SIZE": str(CONTEXT),
            "GEMMA_KEEP_ALIVE_S": "600",
            "GEMMA_FORCE_RELOAD": "false" if on_gpu else "true",
            "GEMMA_LOG_LEVEL": "warning",
        }
        llm = ServiceProcess("llm", env, Path(tmp)).start()
        try:
            with (
                httpx.Client(base_url=llm.url, headers=headers, timeout=300) as chat,
                httpx.Client(base_url=coordinator.url, headers=holder, timeout=120) as gpu,
            ):
                model = chat.get("/v1/models").json()["data"][0]["id"]
                results = rounds(llm, gpu, chat, model, args.rounds)
        finally:
            llm.stop()
    # The library alone, after the service has gone (its VRAM is free again).
    direct_load_s(path, layers)  # warm the file cache as the service's first load did
    results["direct_load_s"] = [direct_load_s(path, layers) for _ in range(args.rounds)]
    results["direct_cpu_load_s"] = [direct_load_s(path, 0) for _ in range(args.rounds)]
    results.update(model=args.model, layers=layers, on_gpu=on_gpu)
    report(results)
    print(f"written to {save('gpu', results)}")


def report(results: dict[str, Any]) -> None:
    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.0f} ms" if values else "n/a"

    def mib(values: list[float]) -> str:
        return f"{statistics.median(values):.0f} MiB" if values else "n/a"

    print(f"{results['model']}, {results['layers']} layers on the GPU: {'yes' if results['on_gpu'] else 'no (CPU)'}")
    print(
        table(
            [
                ["step", "service (median)", "llama-cpp-python directly (median)"],
                ["reload (layers onto the GPU)", ms(results["reload_s"]), ms(results["direct_load_s"])],
                ["offload (reload with 0 layers)", ms(results["offload_s"]), ms(results["direct_cpu_load_s"])],
            ]
        )
    )
    vram = results["vram_mib"]
    print(
        f"VRAM of the LLM process: before a request {mib(vram['before'])}, layers loaded {mib(vram['loaded'])}, "
        f"after the offload {mib(vram['offloaded'])}"
    )


if __name__ == "__main__":
    main()
