"""Chat while a transcription job runs: coordinated vs coordinator bypassed vs idle.

    .venv/bin/python -m benchmarks.stack [--questions 10] [--max-tokens 48]

One run, SmolLM2 and tiny.en on the CPU, RAG off:
- idle: no job running;
- coordinated: a long job runs; each question takes the GPU lease (the job yields
  between segments and resumes after the answer);
- bypassed: the same, with both services told to take no lease (GEMMA_COORDINATE /
  TRANSCRIPTION_COORDINATE=false): they fight over the two cores.
Time to first token (request sent -> first content piece) and decode speed, and the
yield latency of the coordinated run (from the coordinator's history). Target:
coordinated TTFT <= idle TTFT + one yield latency.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.support import coordinated, dev_token, long_meeting, percentile, save, table
from tests.support.servers import ServiceProcess, free_port, running

TOPICS = [
    "the sea",
    "a clock",
    "winter",
    "a train",
    "a garden",
    "the moon",
    "a river",
    "a market",
    "rain",
    "a bridge",
    "a lantern",
    "a fox",
    "the wind",
    "a harbour",
    "snow",
    "a violin",
]


def ask(http: httpx.Client, question: str, max_tokens: int) -> tuple[float, float]:
    body = {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    sent = time.monotonic()
    first = last = 0.0
    count = 0
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                last = time.monotonic()
                if count == 0:
                    first = last
                count += 1
    rate = (count - 1) / (last - first) if count > 1 and last > first else float("nan")
    return first - sent, rate


def job_state(tx: httpx.Client, job_id: str) -> str:
    return str(tx.get(f"/v1/jobs/{job_id}").json()["state"])


def keep_busy(tx: httpx.Client, path: Path, job_id: str) -> str:
    """A job that is running now (a new one if the last has ended)."""
    if not job_id or job_state(tx, job_id) in ("done", "failed", "cancelled"):
        with path.open("rb") as handle:
            job_id = tx.post("/v1/jobs", files={"file": (path.name, handle)}).json()["job_id"]
    while job_state(tx, job_id) != "running":
        time.sleep(0.01)
    return job_id


def scenario(llm: httpx.Client, tx: httpx.Client | None, path: Path, questions: int, max_tokens: int) -> dict[str, Any]:
    rng = random.Random(3)
    ttft: list[float] = []
    rates: list[float] = []
    sent: list[float] = []
    job_id = ""
    for index in range(questions):
        if tx is not None:
            job_id = keep_busy(tx, path, job_id)
            time.sleep(rng.random() * 3.0)  # a random moment within the job's windows
        sent.append(time.time())
        first, rate = ask(llm, f"Tell me one sentence about {TOPICS[index % len(TOPICS)]} (#{index}).", max_tokens)
        ttft.append(first)
        rates.append(rate)
    return {
        "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 1),
        "ttft_p90_ms": round(percentile(ttft, 90) * 1000, 1),
        "tokens_per_s": round(statistics.median([r for r in rates if r == r]), 1),
        "samples": [{"sent": at, "ttft": t} for at, t in zip(sent, ttft, strict=True)],
    }


def yields(gpu: httpx.Client, samples: list[dict[str, float]]) -> dict[str, Any]:
    """Each question's own yield latency (the job's lease end - the question's request,
    from the coordinator's history), what its answer took beyond it, and where that
    went: request -> the LLM asks the coordinator, the job's release -> the chat's
    grant, the grant -> first token received (to set beside idle TTFT)."""
    history = list(reversed(gpu.get("/v1/history", params={"limit": 500}).json()))
    chats = [h for h in history if h["holder"] == "llm"]
    parts: dict[str, list[float]] = {"latency": [], "beyond": [], "ask": [], "grant": [], "answer": []}
    for sample in samples:
        chat = min(chats, key=lambda h: abs(h["requested_at"] - sample["sent"]))
        before = next((h for h in reversed(history) if h["fence"] < chat["fence"]), None)
        if before is None or before["holder"] != "transcription" or before["ended_at"] < chat["requested_at"]:
            continue  # the GPU was free when it asked
        waited = before["ended_at"] - chat["requested_at"]
        parts["latency"].append(waited)
        parts["beyond"].append(sample["ttft"] - waited)
        parts["ask"].append(chat["requested_at"] - sample["sent"])
        parts["grant"].append(chat["granted_at"] - before["ended_at"])
        parts["answer"].append(sample["sent"] + sample["ttft"] - chat["granted_at"])
    ms = {name: [v * 1000 for v in values] for name, values in parts.items()}
    return {
        "n": len(ms["latency"]),
        "p50_ms": round(percentile(ms["latency"], 50), 1),
        "p90_ms": round(percentile(ms["latency"], 90), 1),
        "ttft_beyond_yield_p50_ms": round(percentile(ms["beyond"], 50), 1),
        "ttft_beyond_yield_p90_ms": round(percentile(ms["beyond"], 90), 1),
        "request_to_ask_p50_ms": round(percentile(ms["ask"], 50), 1),
        "release_to_grant_p50_ms": round(percentile(ms["grant"], 50), 1),
        "grant_to_first_token_p50_ms": round(percentile(ms["answer"], 50), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()

    headers = {"Authorization": f"Bearer {dev_token()}"}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, coordinated(Path(tmp)) as (redis, coordinator):
        work = Path(tmp)
        path, _ = long_meeting(work, 10)
        base = {
            "GPU_COORDINATOR_URL": coordinator.url,
            "RAG_SERVICE_URL": f"http://127.0.0.1:{free_port()}",
            "REDIS_URL": redis.url,
            "GEMMA_CONTEXT_SIZE": "2048",
            "GEMMA_LOG_LEVEL": "warning",
            "TRANSCRIPTION_LOG_LEVEL": "warning",
            "TRANSCRIPTION_MAX_UPLOAD_MB": "100",
        }
        for mode, coordinate in (("coordinated", "true"), ("bypassed", "false")):
            env = {
                **base,
                "GEMMA_COORDINATE": coordinate,
                "TRANSCRIPTION_COORDINATE": coordinate,
                "TRANSCRIPTION_DATA_DIR": str(work / mode),
                "TRANSCRIPTION_KEY_PREFIX": f"{mode}:",
            }
            llm = ServiceProcess("llm", env, work)
            tx = ServiceProcess("transcription", env, work)
            with (
                running(llm, tx),
                httpx.Client(base_url=llm.url, headers=headers, timeout=300) as chat,
                httpx.Client(base_url=tx.url, headers=headers, timeout=300) as jobs,
            ):
                ask(chat, "Warm up.", 4)
                if mode == "coordinated":
                    results["idle"] = scenario(chat, None, path, args.questions, args.max_tokens)
                results[mode] = scenario(chat, jobs, path, args.questions, args.max_tokens)
                if mode == "coordinated":
                    with httpx.Client(base_url=coordinator.url, headers=headers) as gpu:
                        results["yield_latency"] = yields(gpu, results["coordinated"]["samples"])
    report(results)


def report(results: dict[str, Any]) -> None:
    for name in ("idle", "coordinated", "bypassed"):
        results[name].pop("samples", None)
    rows = [["while a transcription job runs", "TTFT p50", "TTFT p90", "decode tok/s"]]
    for name, label in (
        ("idle", "idle (no job)"),
        ("coordinated", "coordinated"),
        ("bypassed", "coordinator bypassed"),
    ):
        r = results[name]
        rows.append([label, f"{r['ttft_p50_ms']:.0f} ms", f"{r['ttft_p90_ms']:.0f} ms", f"{r['tokens_per_s']:.1f}"])
    print(table(rows))
    y = results["yield_latency"]
    print(
        f"yield latency (question asks -> job releases): p50 {y['p50_ms']:.0f} ms, p90 {y['p90_ms']:.0f} ms, n={y['n']}"
    )
    extra = y["ttft_beyond_yield_p50_ms"] - results["idle"]["ttft_p50_ms"]
    print(
        f"per question, TTFT beyond its own yield: p50 {y['ttft_beyond_yield_p50_ms']:.0f} ms, "
        f"p90 {y['ttft_beyond_yield_p90_ms']:.0f} ms; idle TTFT p50 {results['idle']['ttft_p50_ms']:.0f} ms"
    )
    print(
        f"where the hand-over goes (p50): request -> the LLM asks {y['request_to_ask_p50_ms']:.1f} ms, "
        f"the job's release -> the chat's grant {y['release_to_grant_p50_ms']:.1f} ms, "
        f"grant -> first token {y['grant_to_first_token_p50_ms']:.0f} ms "
        f"(idle TTFT {results['idle']['ttft_p50_ms']:.0f} ms)"
    )
    verdict = "met" if extra <= 0 else "NOT met"
    print(f"target coordinated TTFT <= idle + one yield latency: {verdict} (the hand-over adds {extra:+.0f} ms at p50)")
    print(f"written to {save('stack', results)}")


if __name__ == "__main__":
    main()
