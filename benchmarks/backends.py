"""Streaming through Baton to a remote backend vs straight to that backend, one run.

    .venv/bin/python -m benchmarks.backends [--prompts 40] [--max-tokens 64]
    .venv/bin/python -m benchmarks.backends --url http://127.0.0.1:8911/v1 --remote-model vllm-smol


The backend is llama-cpp-python's own OpenAI server with the bundled SmolLM2 (or, with
``--url``, a server already running, such as vLLM: README, "Remote backends"); Baton's
LLM service lists it in GEMMA_BACKENDS_FILE. Each prompt goes to both, the order
alternating from one prompt to the next, every prompt new to both, greedy decoding, RAG
off (a RAG lookup adds its own time, measured in the README's RAG figures). Time to first
token is from sending the request to the first content piece; decode speed is
(pieces - 1) / (last piece - first piece). The issue's bars: decode >= 0.97x direct, first
token at most +5 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.llm import CONTEXT, over_http, prompts
from benchmarks.support import coordinated, dev_token, save, table
from shared.presets import resolve
from tests.support.servers import ServiceProcess, free_port, wait_until

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
    runners = {
        "direct": lambda m: over_http(direct, args.remote_model, m, args.max_tokens),
        "through_baton": lambda m: over_http(baton, args.remote_model, m, args.max_tokens),
    }
    for messages in prompts(2, run=98):  # warm both paths and their connections
        for run in runners.values():
            run(messages)
    samples: dict[str, dict[str, list[float]]] = {name: {"ttft": [], "rate": []} for name in runners}
    # Both paths reach the same server, which keeps the last prompt's KV cache: a prompt
    # sent twice in a row is read only once. So each path gets its own prompts (the same
    # topics, shifted by one), and the order alternates.
    mine = {"direct": prompts(args.prompts, run=1), "through_baton": prompts(args.prompts, run=2)}
    for i in range(args.prompts):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))
        for name in order:
            ttft, rate = runners[name](mine[name][i])
            samples[name]["ttft"].append(ttft)
            samples[name]["rate"].append(rate)
    baton.close()
    direct.close()
    out: dict[str, Any] = {
        name: {
            "ttft_p50_ms": round(statistics.median(s["ttft"]) * 1000, 2),
            "ttft_mean_ms": round(statistics.fmean(s["ttft"]) * 1000, 2),
            "tokens_per_s": round(statistics.median([r for r in s["rate"] if r == r]), 2),
        }
        for name, s in samples.items()
    }
    out["ttft_added_p50_ms"] = round(out["through_baton"]["ttft_p50_ms"] - out["direct"]["ttft_p50_ms"], 2)
    out["decode_ratio"] = round(out["through_baton"]["tokens_per_s"] / out["direct"]["tokens_per_s"], 3)
    out["prompts"] = args.prompts
    out["backend"] = "llama_cpp.server" if args.url is None else args.remote_model
    out["max_tokens"] = args.max_tokens
    return out


def report(results: dict[str, Any]) -> None:
    rows = [["path", "first token p50", "first token mean", "decode tokens/s (median)"]]
    for name in ("direct", "through_baton"):
        r = results[name]
        rows.append([name, f"{r['ttft_p50_ms']} ms", f"{r['ttft_mean_ms']} ms", str(r["tokens_per_s"])])
    print(table(rows))
    print(
        f"\nthrough Baton: first token +{results['ttft_added_p50_ms']} ms (p50 against p50; bar +5 ms), "
        f"decode {results['decode_ratio']}x direct (bar 0.97x), {results['prompts']} prompts"
    )
    name = "backends" if results["backend"] == "llama_cpp.server" else f"backends-{results['backend']}"
    print(f"results: {save(name, results)}")


if __name__ == "__main__":
    main()
