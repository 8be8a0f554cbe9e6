"""Streaming through Baton to a remote backend vs straight to that backend, one run.

    .venv/bin/python -m benchmarks.backends [--prompts 40] [--max-tokens 64]
    .venv/bin/python -m benchmarks.backends --url http://127.0.0.1:8911/v1 --remote-model vllm-smol


The backend is llama-cpp-python's own OpenAI server with the bundled SmolLM2 (or, with
``--url``, a server already running, such as vLLM: docs/api.md, "Remote backends"); Baton's
LLM service lists it in GEMMA_BACKENDS_FILE. Each prompt goes to both, the order
alternating from one prompt to the next, every prompt new to both, greedy decoding, RAG
off (a RAG lookup adds its own time, measured in docs/benchmarks.md). Time to first
token is from sending the request to the first content piece; decode speed is
(pieces - 1) / (last piece - first piece). The issue's bars: decode >= 0.97x direct, first
token at most +5 ms.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.llm import CONTEXT, two_paths, two_paths_report
from benchmarks.support import coordinated, dev_token, save
from harness.servers import ServiceProcess, free_port, wait_until
from shared.presets import resolve

REMOTE = "remote-smol"


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--url", help="a running OpenAI-compatible server's base URL (default: start llama_cpp.server)")
    parser.add_argument("--remote-model", default=REMOTE, help="the model that server serves (with --url)")
    args = parser.parse_args()

    path, _ = resolve(args.model, "llm")
    token = dev_token()
    with tempfile.TemporaryDirectory() as tmp, coordinated(Path(tmp)) as (_, coordinator):
        work = Path(tmp)
        server = None
        url = args.url
        if url is None:
            port = free_port()
            url = f"http://127.0.0.1:{port}/v1"
            server = subprocess.Popen(
                [
                    *(sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias", REMOTE),
                    *("--n_ctx", str(CONTEXT), "--host", "127.0.0.1", "--port", str(port)),
                ],
                stdout=(work / "llama-server.log").open("wb"),
                stderr=subprocess.STDOUT,
            )
        backends = work / "backends.yaml"
        backends.write_text(json.dumps({"backends": [{"name": "remote", "url": url, "models": [args.remote_model]}]}))
        env = {
            "GPU_COORDINATOR_URL": coordinator.url,
            "RAG_SERVICE_URL": f"http://127.0.0.1:{free_port()}",
            "GEMMA_MODEL_PATH": args.model,
            "GEMMA_BACKENDS_FILE": str(backends),
            "GEMMA_LOG_LEVEL": "warning",
        }
        ours = ServiceProcess("llm", env, work).start()
        try:
            wait_until(lambda: _answers(f"{url}/models"), 120, "the backend")
            results = compare(args, token, ours.url, url.removesuffix("/v1"))
        finally:
            if server is not None:
                server.terminate()
                server.wait()
            ours.stop()
    report(results)


def compare(args: argparse.Namespace, token: str, ours_url: str, server_url: str) -> dict[str, Any]:
    baton = httpx.Client(base_url=ours_url, headers={"Authorization": f"Bearer {token}"}, timeout=300)
    direct = httpx.Client(base_url=server_url, timeout=300)
    try:
        out = two_paths({"direct": direct, "through_baton": baton}, args.remote_model, args.prompts, args.max_tokens)
    finally:
        baton.close()
        direct.close()
    out["backend"] = "llama_cpp.server" if args.url is None else args.remote_model
    return out


def report(results: dict[str, Any]) -> None:
    two_paths_report(results, "through_baton", ttft_bar_ms=5, decode_bar=0.97)
    name = "backends" if results["backend"] == "llama_cpp.server" else f"backends-{results['backend']}"
    print(f"results: {save(name, results)}")


if __name__ == "__main__":
    main()
