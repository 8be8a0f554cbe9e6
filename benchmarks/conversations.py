"""Conversations: prefix reuse and the response cache, each beside its baseline, one run.

    .venv/bin/python -m benchmarks.conversations [--turns 10] [--conversations 2] [--prompts 40]

1. KV reuse. Two LLM services on the same model, one keeping finished sequences' KV
   cells as prefixes (GEMMA_PREFIX_CACHE_ENTRIES=32, the default), one not (0). On each,
   ``--conversations`` stored conversations take turns (A1 B1 A2 B2 ...), so a turn
   cannot simply continue the sequence that ran just before it. Reported: time to first
   token (streamed, greedy) of each conversation's last turn, with and without, and the
   ratio.
2. The response cache. Each of ``--prompts`` new prompts is asked once (a miss: the model
   answers) and again (a hit: the cache answers), not streamed. Reported: the request's
   time, p50 and p99, for misses and hits, and the ratio; whether every hit carried the
   miss's text.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.support import coordinated, dev_token, percentile, save, table
from harness.servers import ServiceProcess, free_port
from shared.sse_reader import read_json

WEEKS = ["rain", "sun", "wind", "fog", "snow", "heat", "storms", "frost", "clouds", "hail", "mist", "drizzle"]


def first_token_s(http: httpx.Client, body: dict[str, Any]) -> tuple[float, str]:
    """(time to first token, the whole answer) of one streamed chat, computed afresh."""
    sent = time.perf_counter()
    first = 0.0
    pieces: list[str] = []
    headers = {"Cache-Control": "no-cache"}
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=headers) as response:
        response.raise_for_status()
        for event in read_json(response.iter_lines()):
            content = (event.get("choices") or [{}])[0].get("delta", {}).get("content")
            if content:
                first = first or time.perf_counter() - sent
                pieces.append(content)
    return first, "".join(pieces)


def turn_ttfts(llm: ServiceProcess, token: str, turns: int, conversations: int) -> dict[str, Any]:
    with httpx.Client(base_url=llm.url, headers={"Authorization": f"Bearer {token}"}, timeout=300) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        ids = [http.post("/v1/conversations", json={"title": f"c{i}"}).json()["id"] for i in range(conversations)]
        ttft: dict[int, list[float]] = {}
        for turn in range(1, turns + 1):
            for n, conversation in enumerate(ids):
                content = f"Conversation {n}, week {turn}: the weather was {WEEKS[(turn + n) % len(WEEKS)]}. Say ok."
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": content}],
                    "conversation": conversation,
                    "max_tokens": 16,
                    "temperature": 0,
                }
                seconds, _ = first_token_s(http, body)
                ttft.setdefault(turn, []).append(seconds)
        info = http.get("/v1/info", headers={"Authorization": f"Bearer {token}"}).json()
    return {"ttft_s": ttft, "prefix_cache": info.get("engine", {}).get("prefix_cache")}


def cache_figures(llm: ServiceProcess, token: str, prompts: int) -> dict[str, Any]:
    misses: list[float] = []
    hits: list[float] = []
    same = 0
    with httpx.Client(base_url=llm.url, headers={"Authorization": f"Bearer {token}"}, timeout=300) as http:
        model = http.get("/v1/models").json()["data"][0]["id"]
        for i in range(-2, prompts):  # two to warm up
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"Write one line about the number {i + 1000}."}],
                "max_tokens": 32,
                "temperature": 0,
            }
            answers = []
            for expected, into in (("miss", misses), ("hit", hits)):
                sent = time.perf_counter()
                response = http.post("/v1/chat/completions", json=body)
                seconds = time.perf_counter() - sent
                response.raise_for_status()
                if response.headers["X-Baton-Cache"] != expected:
                    raise RuntimeError(f"expected a {expected}, saw {response.headers['X-Baton-Cache']}")
                answers.append(response.json()["choices"][0]["message"]["content"])
                if i >= 0:
                    into.append(seconds)
            same += i >= 0 and answers[0] == answers[1]
    return {
        "prompts": prompts,
        "miss_ms": {"p50": percentile(misses, 50) * 1000, "p99": percentile(misses, 99) * 1000},
        "hit_ms": {"p50": percentile(hits, 50) * 1000, "p99": percentile(hits, 99) * 1000},
        "same_text": same,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--conversations", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=40)
    args = parser.parse_args()
    token = dev_token()
    results: dict[str, Any] = {"model": args.model}
    with tempfile.TemporaryDirectory() as tmp, coordinated(Path(tmp)) as (redis, coordinator):
        base = {
            "GPU_COORDINATOR_URL": coordinator.url,
            "RAG_SERVICE_URL": f"http://127.0.0.1:{free_port()}",
            "GEMMA_MODEL_PATH": args.model,
            "GEMMA_CONTEXT_SIZE": "4096",
            "GEMMA_KEEP_ALIVE_S": "600",
            "GEMMA_LOG_LEVEL": "warning",
            "BATON_REDIS_URL": redis.url,
            "BATON_LIMIT_RPM": "0",
        }
        for label, entries in (("with_prefix_reuse", "32"), ("without", "0")):
            env = {**base, "GEMMA_PREFIX_CACHE_ENTRIES": entries, "BATON_KEY_PREFIX": f"bench-{label}:"}
            llm = ServiceProcess("llm", env, Path(tmp)).start()
            try:
                results[label] = turn_ttfts(llm, token, args.turns, args.conversations)
                if label == "with_prefix_reuse":
                    results["cache"] = cache_figures(llm, token, args.prompts)
            finally:
                llm.stop()
    report(results, args.turns)
    print(f"written to {save('conversations', results)}")


def report(results: dict[str, Any], turns: int) -> None:
    with_reuse = results["with_prefix_reuse"]["ttft_s"][turns]
    without = results["without"]["ttft_s"][turns]
    a, b = statistics.median(with_reuse) * 1000, statistics.median(without) * 1000
    print(
        table(
            [
                [f"time to first token, turn {turns} (median of the conversations)", "ms"],
                ["with KV reuse (the conversation's cells kept)", f"{a:.1f}"],
                ["without (GEMMA_PREFIX_CACHE_ENTRIES=0)", f"{b:.1f}"],
                ["with / without", f"{a / b:.2f}x"],
            ]
        )
    )
    print(f"prefix cache: {results['with_prefix_reuse']['prefix_cache']}")
    cache = results["cache"]
    m, h = cache["miss_ms"], cache["hit_ms"]
    print(
        table(
            [
                ["request", "p50", "p99"],
                ["miss (the model answers)", f"{m['p50']:.1f} ms", f"{m['p99']:.1f} ms"],
                ["hit (the cache answers)", f"{h['p50']:.1f} ms", f"{h['p99']:.1f} ms"],
                ["hit / miss", f"{h['p50'] / m['p50']:.3f}x", f"{h['p99'] / m['p99']:.3f}x"],
            ]
        )
    )
    verdict = "met" if h["p99"] < 10 else "NOT met"
    print(f"hits with the miss's text: {cache['same_text']}/{cache['prompts']}; hit p99 < 10 ms: {verdict}")


if __name__ == "__main__":
    main()
