"""LLM service vs llama-cpp-python's own server vs in-process, one run, same model and prompts.

    .venv/bin/python -m benchmarks.llm [--model smollm2-135m-instruct] [--prompts 40] [--max-tokens 64]

Time to first token (request sent -> first content piece received) and decode speed
((pieces - 1) / (last piece - first piece)) for:
- in-process ``Llama.create_chat_completion(stream=True)``;
- ``python -m llama_cpp.server`` over HTTP (SSE);
- our ``POST /v1/chat/completions`` over HTTP (SSE), RAG off, no contention, the GPU
  lease kept between requests (as in use).
Each prompt goes to the three in turn (round-robin), every prompt is new to all of
them, greedy decoding.

Then the hand-over cost: GPU reloads for 10 sequential requests inside the
keep-alive (the reload path forced on this CPU build), beside the seed's policy of
reloading for every request (keep-alive 0).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import llama_cpp

from benchmarks.support import coordinated, dev_token, metric, save, table
from harness.servers import ServiceProcess, free_port, wait_until
from shared.presets import resolve
from shared.sse_reader import read_json

TOPICS = [
    "the ocean",
    "a lighthouse keeper",
    "winter in Oslo",
    "a broken clock",
    "the first snow",
    "a city at night",
    "a lost key",
    "an old library",
    "a quiet train",
    "the desert wind",
    "a tiny robot",
    "a summer storm",
    "a mountain village",
    "a paper boat",
    "the last bus",
    "a garden in spring",
]
CONTEXT = 4096


def prompts(n: int, run: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": f"Write a short story about {TOPICS[(i + run) % len(TOPICS)]} (v{run}.{i})."}]
        for i in range(n)
    ]


def timed_pieces(pieces: Any, sent: float) -> tuple[float, float]:
    """(time to first piece, decode pieces per second) from an iterator of text pieces."""
    first = last = 0.0
    count = 0
    for piece in pieces:
        if not piece:
            continue
        now = time.monotonic()
        if count == 0:
            first = now
        last = now
        count += 1
    rate = (count - 1) / (last - first) if count > 1 and last > first else float("nan")
    return first - sent, rate


def sse_pieces(response: httpx.Response) -> Any:
    for body in read_json(response.iter_lines()):
        choices = body.get("choices") or [{}]
        yield choices[0].get("delta", {}).get("content")


def over_http(http: httpx.Client, model: str, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float]:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    sent = time.monotonic()
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"Cache-Control": "no-cache"}) as response:
        response.raise_for_status()
        return timed_pieces(sse_pieces(response), sent)


def two_paths(clients: dict[str, httpx.Client], model: str, n: int, max_tokens: int) -> dict[str, Any]:
    """Streamed chats over two paths to one server, the first named the baseline: first
    token p50 and mean, decode tokens/s (median); and the second's added first-token
    time (p50 against p50) and decode ratio.

    Both paths reach the same server, which keeps the last prompt's KV cache (a prompt
    sent twice in a row is read only once). So each path gets its own prompts (the same
    topics, shifted by one), and which goes first alternates from prompt to prompt."""
    names = list(clients)
    base, other = names
    runners = {name: (lambda m, c=client: over_http(c, model, m, max_tokens)) for name, client in clients.items()}
    for messages in prompts(2, run=98):  # warm both paths and their connections
        for run in runners.values():
            run(messages)
    samples: dict[str, dict[str, list[float]]] = {name: {"ttft": [], "rate": []} for name in names}
    mine = {name: prompts(n, run=1 + i) for i, name in enumerate(names)}
    for i in range(n):
        for name in names if i % 2 == 0 else list(reversed(names)):
            ttft, rate = runners[name](mine[name][i])
            samples[name]["ttft"].append(ttft)
            samples[name]["rate"].append(rate)
    out: dict[str, Any] = {
        name: {
            "ttft_p50_ms": round(statistics.median(s["ttft"]) * 1000, 2),
            "ttft_mean_ms": round(statistics.fmean(s["ttft"]) * 1000, 2),
            "tokens_per_s": round(statistics.median([r for r in s["rate"] if r == r]), 2),
        }
        for name, s in samples.items()
    }
    out["ttft_added_p50_ms"] = round(out[other]["ttft_p50_ms"] - out[base]["ttft_p50_ms"], 2)
    out["decode_ratio"] = round(out[other]["tokens_per_s"] / out[base]["tokens_per_s"], 3)
    out["prompts"] = n
    out["max_tokens"] = max_tokens
    return out


def two_paths_report(results: dict[str, Any], through: str, ttft_bar_ms: float, decode_bar: float) -> None:
    """Prints what two_paths measured: a row per path, then the second against the first."""
    rows = [["path", "first token p50", "first token mean", "decode tokens/s (median)"]]
    for name in ("direct", through):
        r = results[name]
        rows.append([name, f"{r['ttft_p50_ms']} ms", f"{r['ttft_mean_ms']} ms", str(r["tokens_per_s"])])
    print(table(rows))
    print(
        f"\n{through.replace('_', ' ')}: first token +{results['ttft_added_p50_ms']} ms "
        f"(p50 against p50; bar +{ttft_bar_ms:g} ms), decode {results['decode_ratio']}x direct "
        f"(bar {decode_bar:g}x), {results['prompts']} prompts"
    )


def in_process(llama: llama_cpp.Llama, messages: list[dict[str, str]], max_tokens: int) -> tuple[float, float]:
    sent = time.monotonic()
    stream = llama.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0, stream=True)  # type: ignore[arg-type]
    return timed_pieces((chunk["choices"][0]["delta"].get("content") for chunk in stream), sent)  # type: ignore[index,union-attr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    # 40 prompts: prompt evaluation varies by +-20 ms on two shared cores; 12 could not resolve 5 ms.
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sequential", type=int, default=10)
    parser.add_argument("--gpu-layers", type=int, default=0, help="layers on the GPU, every path (99: all)")
    args = parser.parse_args()

    path, preset = resolve(args.model, "llm")
    token = dev_token()
    with tempfile.TemporaryDirectory() as tmp, coordinated(Path(tmp)) as (_, coordinator):
        work = Path(tmp)
        base = {
            "GPU_COORDINATOR_URL": coordinator.url,
            "RAG_SERVICE_URL": f"http://127.0.0.1:{free_port()}",
            "GEMMA_MODEL_PATH": args.model,
            "GEMMA_CONTEXT_SIZE": str(CONTEXT),
            "GEMMA_GPU_LAYERS": str(args.gpu_layers),
            "GEMMA_LOG_LEVEL": "warning",
        }
        ours = ServiceProcess("llm", {**base, "GEMMA_KEEP_ALIVE_S": "600"}, work).start()
        server_port = free_port()
        server_log = (work / "llama-server.log").open("wb")
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(path),
                "--n_ctx",
                str(CONTEXT),
                "--host",
                "127.0.0.1",
                "--port",
                str(server_port),
                "--n_gpu_layers",
                str(args.gpu_layers),
            ]
            + (["--chat_format", preset.chat_format] if preset and preset.chat_format else []),
            stdout=server_log,
            stderr=subprocess.STDOUT,
        )
        llama = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=CONTEXT,
            n_gpu_layers=args.gpu_layers,
            verbose=False,
            chat_format=preset.chat_format if preset else None,
        )
        try:
            wait_until(lambda: _answers(f"http://127.0.0.1:{server_port}/v1/models"), 120, "llama_cpp.server")
            results = compare(
                args, llama, token, ours.url, f"http://127.0.0.1:{server_port}", preset.name if preset else path.stem
            )
            results["reloads"] = reloads(args, base, work, token)
        finally:
            server.terminate()
            server.wait()
            ours.stop()
    report(results)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def compare(
    args: argparse.Namespace, llama: llama_cpp.Llama, token: str, ours_url: str, server_url: str, model: str
) -> dict[str, Any]:
    ours = httpx.Client(base_url=ours_url, headers={"Authorization": f"Bearer {token}"}, timeout=300)
    server = httpx.Client(base_url=server_url, timeout=300)
    runners = {
        "in_process": lambda m: in_process(llama, m, args.max_tokens),
        "llama_cpp_server": lambda m: over_http(server, model, m, args.max_tokens),
        "baton": lambda m: over_http(ours, model, m, args.max_tokens),
    }
    for messages in prompts(2, run=99):  # warm every path (and take the lease once)
        for run in runners.values():
            run(messages)
    samples: dict[str, dict[str, list[float]]] = {name: {"ttft": [], "rate": []} for name in runners}
    for messages in prompts(args.prompts, run=0):
        for name, run in runners.items():
            ttft, rate = run(messages)
            samples[name]["ttft"].append(ttft)
            samples[name]["rate"].append(rate)
    ours.close()
    server.close()
    return {
        name: {
            "ttft_p50_ms": round(statistics.median(s["ttft"]) * 1000, 2),
            "ttft_mean_ms": round(statistics.fmean(s["ttft"]) * 1000, 2),
            "tokens_per_s": round(statistics.median([r for r in s["rate"] if r == r]), 2),
        }
        for name, s in samples.items()
    }


def reloads(args: argparse.Namespace, base: dict[str, str], work: Path, token: str) -> dict[str, Any]:
    """Reloads and offloads over N sequential requests: keep-alive vs the seed's reload-every-time."""
    out = {}
    for label, keep_alive in (("keep_alive", "600"), ("seed_policy", "0")):
        env = {**base, "GEMMA_KEEP_ALIVE_S": keep_alive, "GEMMA_FORCE_RELOAD": "true"}
        service = ServiceProcess("llm", env, work).start()
        try:
            with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {token}"}, timeout=300) as http:
                model = http.get("/v1/models").json()["data"][0]["id"]
                started = time.monotonic()
                for i in range(args.sequential):
                    body = {
                        "model": model,
                        "messages": [{"role": "user", "content": f"Say hi ({i})."}],
                        "max_tokens": 8,
                    }
                    http.post("/v1/chat/completions", json=body).raise_for_status()
                elapsed = time.monotonic() - started
                metrics = http.get("/metrics").text
            out[label] = {
                "requests": args.sequential,
                "reloads": metric(metrics, "llm_reload_seconds_count"),
                "offloads": metric(metrics, "llm_offload_seconds_count"),
                "seconds": round(elapsed, 2),
            }
        finally:
            service.stop()
    return out


def report(results: dict[str, Any]) -> None:
    base = results["in_process"]
    rows = [["path", "TTFT p50", "TTFT vs in-process (p50, mean)", "decode tok/s", "vs in-process"]]
    for name in ("in_process", "llama_cpp_server", "baton"):
        r = results[name]
        rows.append(
            [
                name,
                f"{r['ttft_p50_ms']:.1f} ms",
                f"{r['ttft_p50_ms'] - base['ttft_p50_ms']:+.1f} ms, {r['ttft_mean_ms'] - base['ttft_mean_ms']:+.1f} ms",
                f"{r['tokens_per_s']:.1f}",
                f"{r['tokens_per_s'] / base['tokens_per_s']:.3f}x",
            ]
        )
    print(table(rows))
    ours = results["baton"]
    rate = ours["tokens_per_s"] / base["tokens_per_s"]
    extra = ours["ttft_p50_ms"] - base["ttft_p50_ms"]
    print(
        f"targets: >= 0.97x in-process tokens/s: {'met' if rate >= 0.97 else 'NOT met'} ({rate:.3f}x); "
        f"<= +5 ms TTFT: {'met' if extra <= 5 else 'NOT met'} ({extra:+.1f} ms)"
    )
    for label, r in results["reloads"].items():
        print(
            f"{label}: {r['requests']} sequential requests -> {r['reloads']:.0f} reloads, {r['offloads']:.0f} offloads "
            f"in {r['seconds']} s"
        )
    print(f"written to {save('llm', results)}")


if __name__ == "__main__":
    main()
