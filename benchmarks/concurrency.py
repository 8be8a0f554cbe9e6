"""Many users at once, one run: the LLM service batching, the same service one request at
a time, the raw ceiling, llama.cpp's own server, and (optionally) the service as it was
before batching, with the same model, prompts, threads and tokens.

    .venv/bin/python -m benchmarks.concurrency [--streams 1 2 4 8 16] [--max-tokens 64]
        [--slots 8] [--repeat 3] [--no-peer] [--before DIR] [--model smollm2-135m-instruct]

For each number of concurrent streamed chats (distinct prompts, greedy, the response
cache bypassed, at most ``--max-tokens`` each):

- (a) ``service``: POST /v1/chat/completions with GEMMA_PARALLEL=--slots (batching);
- (b) ``one at a time``: the same service with GEMMA_PARALLEL=1;
- (c) ``ceiling``: the same model and prompts in one process through llama-cpp-python's
  low-level API, every sequence in one llama.cpp batch, no service, warmed up first (a
  process of its own: llama.cpp's thread pool belongs to the thread that calls it);
- (d) ``llama-server``: llama.cpp's own server, built from the sources vendored in the
  pinned sdist (scripts/build-llama-server.sh), ``-np --slots`` with continuous batching
  and a unified KV cache, as the service has;
- (e) ``before batching``, with ``--before DIR``: the LLM service of another checkout
  (``git worktree add DIR 2090c50``, the last commit before the batching engine: one
  model slot, llama-cpp-python's high-level API and its default thread count).

Every path is started once and stays up; ``--repeat`` rounds go over every level and
every path in turn, and the medians are printed (each round's figures are in the
results file). Each prints aggregate tokens/s (every stream's tokens over the wall
time), first token p50/p90, inter-token p90 (the gaps between a stream's pieces, pooled)
and the 429s; then the bars: at 8 streams (a) against (c), (b), (d) and (e), (a)'s first
token p90 against (c)'s; at 1 stream (a)'s decode and first token against (b)'s; and
whether every stream was answered. Every prompt is new to the path that reads it (no
prefix is reused).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.support import dev_token, percentile, save, table
from harness.servers import ServiceProcess, free_port, wait_until
from shared.presets import resolve
from shared.sse_reader import read_json

TOPICS = [
    "the ocean", "a lighthouse keeper", "winter in Oslo", "a broken clock", "the first snow", "a city at night",
    "a lost key", "an old library", "a quiet train", "the desert wind", "a tiny robot", "a summer storm",
    "a mountain village", "a paper boat", "the last bus", "a garden in spring", "a red kite", "an empty stadium",
]  # fmt: skip
CONTEXT = 4096
THREADS = os.cpu_count() or 1


def prompts(n: int, run: str) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} ({run}.{i})."}]
        for i in range(n)
    ]


@dataclass
class Stream:
    sent: float = 0.0
    first: float | None = None
    times: list[float] = field(default_factory=list)
    tokens: int = 0
    status: int = 200


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over the repetitions (the 429s and the served: their worst)."""
    merged: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        if key in ("refused_429",):
            merged[key] = max(values)
        elif key == "served":
            merged[key] = min(values)
        else:
            merged[key] = statistics.median(values)
    return merged


def summarize(streams: list[Stream], wall_s: float) -> dict[str, Any]:
    served = [s for s in streams if s.status == 200 and s.first is not None]
    gaps = [b - a for s in served for a, b in zip(s.times, s.times[1:], strict=False)]
    firsts = [(s.first or s.sent) - s.sent for s in served]
    tokens = sum(s.tokens for s in served)
    single = served[0] if len(served) == 1 else None
    decode = (
        (single.tokens - 1) / (single.times[-1] - single.times[0])
        if single is not None and len(single.times) > 1 and single.times[-1] > single.times[0]
        else float("nan")
    )
    return {
        "streams": len(streams),
        "served": len(served),
        "refused_429": sum(1 for s in streams if s.status == 429),
        "tokens": tokens,
        "aggregate_tokens_per_s": round(tokens / wall_s, 2) if wall_s else float("nan"),
        "first_token_p50_ms": round(percentile(firsts, 50) * 1000, 1),
        "first_token_p90_ms": round(percentile(firsts, 90) * 1000, 1),
        "inter_token_p90_ms": round(percentile(gaps, 90) * 1000, 1) if gaps else float("nan"),
        "decode_tokens_per_s": round(decode, 2),
    }


async def openai_streams(
    url: str, token: str | None, model: str, asked: list[list[dict[str, str]]], max_tokens: int
) -> dict[str, Any]:
    """Every prompt at once as a streamed chat; each stream's timings."""
    headers = {"Cache-Control": "no-cache"} | ({"Authorization": f"Bearer {token}"} if token else {})
    limits = httpx.Limits(max_connections=len(asked) + 4, max_keepalive_connections=len(asked) + 4)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600, limits=limits) as http:

        async def one(messages: list[dict[str, str]]) -> Stream:
            stream = Stream(sent=time.monotonic())
            body = {
                "model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True},
            }  # fmt: skip
            async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                stream.status = response.status_code
                if response.status_code != 200:
                    await response.aread()
                    return stream
                lines = []
                async for line in response.aiter_lines():
                    lines.append(line)
                    if line.startswith("data: ") and '"content"' in line and '"content": ""' not in line:
                        now = time.monotonic()
                        if stream.first is None:
                            stream.first = now
                        stream.times.append(now)
                for event in read_json(iter(lines)):
                    if event.get("usage"):
                        stream.tokens = int(event["usage"]["completion_tokens"])
            if not stream.tokens:
                stream.tokens = len(stream.times)
            return stream

        started = time.monotonic()
        streams = await asyncio.gather(*(one(m) for m in asked))
        return summarize(list(streams), time.monotonic() - started)


def ceiling(model: str, n: int, max_tokens: int, run: str) -> dict[str, Any]:
    """(c), in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.concurrency", "--ceiling-of", str(n), "--max-tokens", str(max_tokens),
         "--model", model, "--run", run],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def ceiling_here(model: str, n: int, max_tokens: int, run: str) -> dict[str, Any]:
    """Every sequence in one batch: prefill together, then one decode step for all per token."""
    import llama_cpp
    import numpy as np

    from services.llm.engine.grammar import route_llama_logs
    from services.llm.engine.prompts import Vocabulary

    route_llama_logs()
    path, preset = resolve(model, "llm")
    vocabulary = Vocabulary(path, CONTEXT, preset.chat_format if preset else None)
    tokens = [vocabulary.prompt(m).tokens for m in prompts(n, run)]
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    llama_model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(llama_model)
    context = llama_cpp.llama_context_default_params()
    context.n_ctx, context.n_batch, context.n_ubatch, context.n_seq_max = CONTEXT, 2048, 2048, n
    context.kv_unified, context.n_threads, context.n_threads_batch = True, THREADS, THREADS
    ctx = llama_cpp.llama_init_from_model(llama_model, context)
    batch = llama_cpp.llama_batch_init(2048, 0, 1)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    def add(i: int, token: int, position: int, sequence: int, logits: bool) -> None:
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, position, 1
        batch.seq_id[i][0], batch.logits[i] = sequence, logits

    # Warm up as the services are warmed up (their first decode pays for the graph's
    # allocation and the weights' first touch): a short prompt read once, then dropped.
    warm = vocabulary.prompt([{"role": "user", "content": "Warm up."}]).tokens
    for position, token in enumerate(warm):
        add(position, token, position, 0, position == len(warm) - 1)
    batch.n_tokens = len(warm)
    assert llama_cpp.llama_decode(ctx, batch) == 0
    llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)

    streams = [Stream(sent=time.monotonic()) for _ in range(n)]
    started = time.monotonic()
    count = 0
    last_index = []
    for sequence, prompt in enumerate(tokens):
        for position, token in enumerate(prompt):
            add(count, token, position, sequence, position == len(prompt) - 1)
            if position == len(prompt) - 1:
                last_index.append(count)
            count += 1
    batch.n_tokens = count
    assert llama_cpp.llama_decode(ctx, batch) == 0
    positions = [len(p) for p in tokens]
    alive = list(range(n))
    indexes = dict(zip(alive, last_index, strict=True))
    while alive:
        now = time.monotonic()
        picked = {}
        for sequence in alive:
            row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, indexes[sequence]), shape=(n_vocab,))
            picked[sequence] = int(row.argmax())
        still = []
        for sequence in alive:
            stream = streams[sequence]
            if llama_cpp.llama_vocab_is_eog(vocab, picked[sequence]):
                continue
            stream.first = stream.first or now
            stream.times.append(now)
            stream.tokens += 1
            if stream.tokens < max_tokens:
                still.append(sequence)
        alive = still
        batch.n_tokens = 0
        for i, sequence in enumerate(alive):
            add(i, picked[sequence], positions[sequence], sequence, True)
            positions[sequence] += 1
            indexes[sequence] = i
        batch.n_tokens = len(alive)
        if alive:
            assert llama_cpp.llama_decode(ctx, batch) == 0
    wall = time.monotonic() - started
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(llama_model)
    return summarize(streams, wall)


class LlamaServer:
    """llama.cpp's llama-server with ``slots`` parallel slots and continuous batching."""

    def __init__(self, binary: str, model: Path, slots: int, work: Path) -> None:
        self.port = free_port()
        log = (work / f"llama-server-{slots}.log").open("wb")
        self.process = subprocess.Popen(
            [binary, "-m", str(model), "-c", str(CONTEXT), "-np", str(slots), "-cb", "--kv-unified",
             "-t", str(THREADS), "-tb", str(THREADS), "-ngl", "0", "--host", "127.0.0.1", "--port", str(self.port),
             "--no-webui", "--cache-reuse", "0"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

        def ready() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}; see {log.name}")
            try:
                return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, 120, "llama-server to be ready", interval_s=0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def peer_binary() -> str | None:
    """llama-server built by scripts/build-llama-server.sh, or None (said why)."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "build-llama-server.sh"
    done = subprocess.run([str(script)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"llama-server could not be built: {done.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return None
    return done.stdout.strip().splitlines()[-1]


def service(model: str, slots: int, work: Path, checkout: Path | None = None) -> ServiceProcess:
    """The LLM service with ``slots`` sequences in its batch; ``checkout``: the service of
    another checkout of Baton (the code before batching), on the same model file."""
    env = {
        "GEMMA_MODEL_PATH": model,
        "GEMMA_CONTEXT_SIZE": str(CONTEXT),
        "GEMMA_MAX_QUEUE": "64",
        "GEMMA_COORDINATE": "false",
        "GEMMA_CACHE_TTL_S": "0",
        "GEMMA_LOG_LEVEL": "warning",
        "RAG_SERVICE_URL": f"http://127.0.0.1:{free_port()}",
        "GPU_COORDINATOR_URL": f"http://127.0.0.1:{free_port()}",
    }
    if checkout is None:
        env["GEMMA_PARALLEL"] = str(slots)
    process = ServiceProcess("llm", env, work)
    if checkout is not None:
        process.cwd = checkout
    return process.start()


def bars(results: dict[str, dict[str, dict[str, Any]]], slots: int) -> list[str]:
    lines = []
    at = str(slots)
    rate = "aggregate_tokens_per_s"
    a, b, c = results["service"].get(at), results["one at a time"].get(at), results["ceiling"].get(at)
    d = results.get("llama-server", {}).get(at)
    if a and c:
        lines.append(f"{at} streams: service {a[rate] / c[rate]:.2f}x the ceiling (bar 0.85x)")
        first = a["first_token_p90_ms"] / c["first_token_p90_ms"]
        lines.append(f"{at} streams: first token p90 {first:.2f}x the ceiling's (bar 1.25x)")
    if a and b:
        lines.append(f"{at} streams: service {a[rate] / b[rate]:.2f}x one at a time (bar 2.5x)")
    if a and d:
        lines.append(f"{at} streams: service {a[rate] / d[rate]:.2f}x llama-server (bar 0.9x)")
    e = results.get("before batching", {}).get(at)
    if a and e:
        lines.append(f"{at} streams: service {a[rate] / e[rate]:.2f}x the service before batching")
    a1, b1 = results["service"].get("1"), results["one at a time"].get("1")
    if a1 and b1:
        decode = a1["decode_tokens_per_s"] / b1["decode_tokens_per_s"]
        first_ms = a1["first_token_p50_ms"] - b1["first_token_p50_ms"]
        lines.append(
            f"1 stream: decode {decode:.3f}x one at a time (bar 0.97x), first token {first_ms:+.1f} ms (bar +5)"
        )
    for level, r in results["service"].items():
        if int(level) > slots:
            answered = f"{r['served']}/{r['streams']} answered"
            lines.append(f"{level} streams on {slots} slots: {answered}, {r['refused_429']} 429s")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--no-peer", action="store_true", help="leave llama-server out")
    parser.add_argument("--repeat", type=int, default=3, help="rounds over every path; medians are printed")
    parser.add_argument(
        "--before", type=Path, help="a checkout of Baton before batching (git worktree add DIR 2090c50): path (e)"
    )
    parser.add_argument("--ceiling-of", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--run", default="c", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ceiling_of:
        print(json.dumps(ceiling_here(args.model, args.ceiling_of, args.max_tokens, args.run)))
        return

    path, _ = resolve(args.model, "llm")
    token = dev_token()
    binary = None if args.no_peer else peer_binary()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as started:
        work = Path(tmp)
        # Every path is up at once, idle but for the one measured, and the repetitions go
        # round them in turn: a machine whose speed drifts (a shared VM's does, by 20%)
        # moves every path alike instead of the one that happened to run then.
        urls: dict[str, tuple[str, str | None]] = {}
        for name, slots, checkout in (("service", args.slots, None), ("one at a time", 1, None),
                                      ("before batching", 1, args.before)):  # fmt: skip
            if name == "before batching" and checkout is None:
                continue
            process = service(args.model, slots, work, checkout)
            started.callback(process.stop)
            urls[name] = (process.url, token)
        if binary is not None:
            server = LlamaServer(binary, path, args.slots, work)
            started.callback(server.stop)
            urls["llama-server"] = (server.url, None)
        for name, (url, key) in urls.items():
            asyncio.run(openai_streams(url, key, args.model, prompts(2, f"warm-{name}"), 8))
        for repeat in range(args.repeat):
            for n in args.streams:
                for name, (url, key) in urls.items():
                    asked = prompts(n, f"{name}-{n}-{repeat}")
                    measured = asyncio.run(openai_streams(url, key, args.model, asked, args.max_tokens))
                    runs.setdefault(name, {}).setdefault(str(n), []).append(measured)
                measured = ceiling(args.model, n, args.max_tokens, f"ceiling-{n}-{repeat}")
                runs.setdefault("ceiling", {}).setdefault(str(n), []).append(measured)
            print(f"  round {repeat + 1} of {args.repeat} done", file=sys.stderr, flush=True)
    for name, by_level in runs.items():
        results[name] = {level: median_of(measured) for level, measured in by_level.items()}
    rows = [["path", "streams", "served", "429s", "tokens/s", "first p50", "first p90", "inter-token p90"]]
    for name, medians in results.items():
        for level, r in medians.items():
            rows.append([
                name, level, str(r["served"]), str(r["refused_429"]), str(r["aggregate_tokens_per_s"]),
                f"{r['first_token_p50_ms']} ms", f"{r['first_token_p90_ms']} ms", f"{r['inter_token_p90_ms']} ms",
            ])  # fmt: skip
    print(table(rows))
    print()
    for line in bars(results, args.slots):
        print(line)
    settings = {"max_tokens": args.max_tokens, "slots": args.slots, "threads": THREADS, "model": args.model,
                "repeat": args.repeat}  # fmt: skip
    print(f"results: {save('concurrency', {'settings': settings, 'medians': results, 'runs': runs})}")


if __name__ == "__main__":
    main()
