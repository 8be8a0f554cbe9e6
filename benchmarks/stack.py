"""Chats during a transcription job and during a long upload: coordinated vs bypassed vs idle.

    .venv/bin/python -m benchmarks.stack [--job-chats 20] [--upload-chats 10] [--max-tokens 48]

On a CUDA box, both models on the card (scripts/gpu-measure.sh runs this):

    .venv/bin/python -m benchmarks.stack --model gemma-3-270m --gpu-layers 99 --whisper-device cuda \
        --job-repeat 20 --upload-repeat 10

(``--gpu-memory-mb`` below what the two services declare makes every hand-over free the
device memory, with the CUDA checkpoint API where the driver has it.)

One run, SmolLM2 and tiny.en on the CPU by default, RAG off, one coordinator:
- idle: chats with nothing else running;
- coordinated: chats asked at random moments while a job runs (the meeting, repeated),
  then while long interactive uploads run; each chat takes the GPU lease, the
  transcription worker is paused (SIGSTOP) and resumed after the answer;
- bypassed: the same with both services told to take no lease: they fight over the
  two cores;
- storm: three clients chat in a loop while a job runs; the job must still finish.
  It runs on its own coordinator with a short COORDINATOR_MAX_BATCH_WAIT_MS and
  COORDINATOR_BATCH_SLICE_MS (set below); the phases before use the defaults.
Time to first token (request sent -> first content piece), the yield latency (the
chat's request reaches the coordinator -> the transcription lease is released, from
the coordinator's history), whether each transcript equals its unpreempted run, and
the cost of the pauses to transcription (wall time / unpreempted wall time).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.support import coordinated, dev_token, long_meeting, percentile, save, table
from harness.servers import ServiceProcess, free_port, running
from shared.sse_reader import read_json

TOPICS = ["the sea", "a clock", "winter", "a train", "a garden", "the moon", "a river", "a market", "rain", "a bridge"]
MAX_BATCH_WAIT_MS = 5000
BATCH_SLICE_MS = 2000


MODEL = "smollm2-135m-instruct"
"""The id chats ask for: the LLM's model, set by ``--model``."""


def ask(http: httpx.Client, question: str, max_tokens: int) -> tuple[float, float]:
    """(time to first token, decode tokens/s) of one streamed chat."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    sent = time.monotonic()
    first = last = 0.0
    count = 0
    # Every chat runs on the model: a question asked again would come from the response cache.
    with http.stream("POST", "/v1/chat/completions", json=body, headers={"Cache-Control": "no-cache"}) as response:
        response.raise_for_status()
        for body in read_json(response.iter_lines()):
            choices = body.get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                last = time.monotonic()
                if count == 0:
                    first = last
                count += 1
    rate = (count - 1) / (last - first) if count > 1 and last > first else float("nan")
    return first - sent, rate


class Background(threading.Thread):
    """Keeps transcription busy: the same file again and again, as a job or an upload,
    until stopped; the run in progress then finishes. Records each run's wall time and
    transcript."""

    def __init__(self, tx: httpx.Client, path: Path, kind: str) -> None:
        super().__init__(daemon=True)
        self.tx, self.path, self.kind = tx, path, kind
        self.stop = threading.Event()
        self.busy = threading.Event()
        self.runs: list[dict[str, Any]] = []

    def run(self) -> None:
        while True:  # at least once
            started = time.monotonic()
            segments = self._job() if self.kind == "job" else self._upload()
            self.runs.append({"wall_s": time.monotonic() - started, "segments": segments})
            self.busy.clear()
            if self.stop.is_set():
                return

    def _upload(self) -> list[Any]:
        with self.path.open("rb") as handle:
            self.busy.set()
            response = self.tx.post(
                "/v1/audio/transcriptions",
                files={"file": (self.path.name, handle)},
                data={"model": "whisper-1", "response_format": "verbose_json"},
            )
        response.raise_for_status()
        return [(s["start"], s["end"], s["text"]) for s in response.json()["segments"]]

    def _job(self) -> list[Any]:
        with self.path.open("rb") as handle:
            job_id = self.tx.post("/v1/jobs", files={"file": (self.path.name, handle)}).json()["job_id"]
        # Follow its events rather than poll: polling would compete with the chats for the cores.
        with self.tx.stream("GET", f"/v1/jobs/{job_id}/events") as events:
            for event in read_json(events.iter_lines()):
                if event.get("state") == "running":
                    self.busy.set()
                if event["type"] in ("done", "failed", "cancelled"):
                    break
        job = self.tx.get(f"/v1/jobs/{job_id}").json()
        return [(s["start"], s["end"], s["text"]) for s in job["segments"]]

    def finish(self) -> None:
        self.stop.set()
        self.join()


def chats(llm: httpx.Client, background: Background | None, count: int, max_tokens: int) -> dict[str, Any]:
    rng = random.Random(7)
    samples = []
    if background is not None:
        background.start()
    for index in range(count):
        if background is not None:
            background.busy.wait(120)
            time.sleep(rng.uniform(0.05, 1.0))  # a random moment within the transcription
        sent = time.time()
        ttft, rate = ask(llm, f"Tell me one sentence about {TOPICS[index % len(TOPICS)]} (#{index}).", max_tokens)
        samples.append({"sent": sent, "ttft": ttft, "rate": rate})
    if background is not None:
        background.finish()
    ttfts = [s["ttft"] for s in samples]
    return {
        "n": len(samples),
        "ttft_p50_ms": round(percentile(ttfts, 50) * 1000, 1),
        "ttft_p90_ms": round(percentile(ttfts, 90) * 1000, 1),
        "tokens_per_s": round(statistics.median([s["rate"] for s in samples if s["rate"] == s["rate"]]), 1),
        "samples": samples,
        "runs": background.runs if background is not None else [],
    }


def yields(history: list[dict[str, Any]], samples: list[dict[str, float]]) -> list[float]:
    """Per chat that found transcription holding the card: the chat's request reaches
    the coordinator -> the transcription lease ends (coordinator clock, ms)."""
    ordered = sorted(history, key=lambda h: h["fence"])
    latencies = []
    for sample in samples:
        chat = min((h for h in ordered if h["holder"] == "llm"), key=lambda h: abs(h["requested_at"] - sample["sent"]))
        if not sample["sent"] - 0.05 <= chat["requested_at"] <= sample["sent"] + sample["ttft"]:
            continue  # no ask of its own: it ran under a lease the LLM already held (the keep-alive)
        before = [h for h in ordered if h["fence"] < chat["fence"]]
        if not before or before[-1]["holder"] != "transcription" or before[-1]["ended_at"] < chat["requested_at"]:
            continue  # the card was free when it asked
        latencies.append((before[-1]["ended_at"] - chat["requested_at"]) * 1000)
    return latencies


def storm(llm_url: str, tx: httpx.Client, headers: dict[str, str], path: Path, max_tokens: int) -> dict[str, Any]:
    """Three clients chat in a loop while one job runs: does the job finish?"""
    stop = threading.Event()
    asked = [0]

    def loop() -> None:
        with httpx.Client(base_url=llm_url, headers=headers, timeout=300) as http:
            while not stop.is_set():
                ask(http, "Say something about the weather.", max_tokens)
                asked[0] += 1

    clients = [threading.Thread(target=loop, daemon=True) for _ in range(3)]
    for client in clients:
        client.start()
    job = Background(tx, path, "job")
    job.start()
    job.finish()  # stop after the first run
    stop.set()
    for client in clients:
        client.join()
    return {"job_wall_s": round(job.runs[0]["wall_s"], 1), "chats": asked[0], "segments": job.runs[0]["segments"]}


PLACEMENT: dict[str, str] = {}
"""Where the models run (``GEMMA_MODEL_PATH``, ``TRANSCRIPTION_DEVICE``...), from the arguments."""


@contextlib.contextmanager
def services(
    work: Path, redis_url: str, coordinator_url: str, name: str, coordinate: bool, headers: dict[str, str]
) -> Iterator[tuple[ServiceProcess, httpx.Client, httpx.Client]]:
    """The LLM and transcription on one coordinator; (llm, chat client, transcription client).
    Every process shares the secret of the run's one ``dev_token()``."""
    env = {
        **PLACEMENT,
        "GPU_COORDINATOR_URL": coordinator_url,
        "RAG_SERVICE_URL": f"http://127.0.0.1:{free_port()}",
        "REDIS_URL": redis_url,
        "GEMMA_CONTEXT_SIZE": "2048",
        "GEMMA_LOG_LEVEL": "warning",
        "TRANSCRIPTION_LOG_LEVEL": "warning",
        "GEMMA_COORDINATE": str(coordinate).lower(),
        "TRANSCRIPTION_COORDINATE": str(coordinate).lower(),
        "TRANSCRIPTION_DATA_DIR": str(work / name),
        "TRANSCRIPTION_KEY_PREFIX": f"{name}:",
    }
    llm = ServiceProcess("llm", env, work)
    tx = ServiceProcess("transcription", env, work)
    with (
        running(llm, tx),
        httpx.Client(base_url=llm.url, headers=headers, timeout=300) as chat,
        httpx.Client(base_url=tx.url, headers=headers, timeout=600) as jobs,
    ):
        ask(chat, "Warm up.", 4)
        yield llm, chat, jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job-chats", type=int, default=20)
    parser.add_argument("--upload-chats", type=int, default=10)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--model", default=MODEL, help="the LLM's model: a preset name or a GGUF file")
    parser.add_argument("--gpu-layers", type=int, default=None, help="GEMMA_GPU_LAYERS (default: the service's)")
    parser.add_argument("--whisper-device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--compute-type", default=None, help="default: int8 on the CPU, float16 on CUDA")
    parser.add_argument("--job-repeat", type=int, default=2, help="the job's audio: the meeting this many times")
    parser.add_argument("--upload-repeat", type=int, default=4, help="the upload's audio: the meeting this many times")
    parser.add_argument("--gpu-memory-mb", type=int, default=None, help="COORDINATOR_GPU_MEMORY_MB (default: NVML's)")
    parser.add_argument(
        "--cublas-shim", type=Path, default=None, help="a libcublas.so.12 for CTranslate2 (see benchmarks.whisper_gpu)"
    )
    parser.add_argument("--skip-storm", action="store_true")
    args = parser.parse_args()
    place(args)

    headers = {"Authorization": f"Bearer {dev_token()}"}
    placement = {k: v for k, v in PLACEMENT.items() if k != "LD_LIBRARY_PATH"}
    results: dict[str, Any] = {"placement": {**placement, **COORDINATOR}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        job_path, job_s = long_meeting(work, args.job_repeat)
        upload_path, upload_s = long_meeting(work, args.upload_repeat)
        results["audio_s"] = {"job": round(job_s, 1), "upload": round(upload_s, 1)}
        # The hand-over, on the coordinator's default settings.
        with coordinated(work / "handover", **COORDINATOR) as (redis, coordinator):
            for mode in ("coordinated", "bypassed"):
                with services(work, redis.url, coordinator.url, mode, mode == "coordinated", headers) as (
                    _,
                    chat,
                    jobs,
                ):
                    if mode == "coordinated":
                        results["idle"] = chats(chat, None, args.job_chats, args.max_tokens)
                        for kind, path in (("job", job_path), ("upload", upload_path)):
                            alone = Background(jobs, path, kind)
                            alone.start()
                            alone.finish()
                            results[f"unpreempted_{kind}"] = alone.runs[0]
                    results[mode] = {
                        "job": chats(chat, Background(jobs, job_path, "job"), args.job_chats, args.max_tokens),
                        "upload": chats(
                            chat, Background(jobs, upload_path, "upload"), args.upload_chats, args.max_tokens
                        ),
                    }
            with httpx.Client(base_url=coordinator.url, headers=headers) as gpu:
                history = gpu.get("/v1/history", params={"limit": 1000}).json()
            results["yield_ms"] = {
                kind: yields(history, results["coordinated"][kind]["samples"]) for kind in ("job", "upload")
            }
            results["handovers"] = {
                path: sorted(
                    h["handover_ms"] for h in history if h["holder"] == "transcription" and h.get("handover") == path
                )
                for path in ("pause", "checkpoint", "restart")
            }
        # Anti-starvation, with a short batch wait and slice so that it shows in minutes.
        starving = {
            "COORDINATOR_MAX_BATCH_WAIT_MS": str(MAX_BATCH_WAIT_MS),
            "COORDINATOR_BATCH_SLICE_MS": str(BATCH_SLICE_MS),
        }
        if args.skip_storm:
            report(results)
            return
        with (
            coordinated(work / "storm", **COORDINATOR, **starving) as (redis, coordinator),
            services(work, redis.url, coordinator.url, "storm", True, headers) as (llm, _, jobs),
        ):
            results["storm"] = storm(llm.url, jobs, headers, job_path, args.max_tokens)
    report(results)


COORDINATOR: dict[str, str] = {}


def place(args: argparse.Namespace) -> None:
    """The models' placement and the coordinator's card, from the arguments."""
    global MODEL
    MODEL = Path(args.model).stem if args.model.endswith(".gguf") else args.model
    PLACEMENT["GEMMA_MODEL_PATH"] = args.model
    if args.gpu_layers is not None:
        PLACEMENT["GEMMA_GPU_LAYERS"] = str(args.gpu_layers)
    PLACEMENT["TRANSCRIPTION_DEVICE"] = args.whisper_device
    PLACEMENT["TRANSCRIPTION_COMPUTE_TYPE"] = args.compute_type or (
        "float16" if args.whisper_device == "cuda" else "int8"
    )
    # The service takes at most this much audio in one upload.
    PLACEMENT["TRANSCRIPTION_MAX_UPLOAD_MB"] = "100"
    if args.gpu_memory_mb is not None:
        COORDINATOR["COORDINATOR_GPU_MEMORY_MB"] = str(args.gpu_memory_mb)
    if args.cublas_shim is not None:
        from benchmarks.whisper_gpu import cublas_shim

        shim = cublas_shim(args.cublas_shim)
        if shim is None:
            raise SystemExit("--cublas-shim: no cuBLAS among NVIDIA's Python packages")
        print(f"libcublas.so.12 -> {shim.pop('_target')} (an experiment, not a supported set-up)")
        PLACEMENT.update(shim)


def report(results: dict[str, Any]) -> None:
    idle = results["idle"]
    rows = [
        ["time to first token", "p50", "p90", "tok/s", "p50 - idle", "p90 / idle", "vs bypassed p50", "vs bypassed p90"]
    ]
    rows.append(
        [
            "idle (nothing else runs)",
            f"{idle['ttft_p50_ms']:.0f} ms",
            f"{idle['ttft_p90_ms']:.0f} ms",
            f"{idle['tokens_per_s']:.1f}",
            "",
            "",
            "",
            "",
        ]
    )
    verdicts = []
    for kind in ("job", "upload"):
        for mode in ("coordinated", "bypassed"):
            r = results[mode][kind]
            other = results["bypassed"][kind]
            rows.append(
                [
                    f"{mode}, during {'a job' if kind == 'job' else 'an upload'} (n={r['n']})",
                    f"{r['ttft_p50_ms']:.0f} ms",
                    f"{r['ttft_p90_ms']:.0f} ms",
                    f"{r['tokens_per_s']:.1f}",
                    f"{r['ttft_p50_ms'] - idle['ttft_p50_ms']:+.0f} ms",
                    f"{r['ttft_p90_ms'] / idle['ttft_p90_ms']:.2f}x",
                    f"{r['ttft_p50_ms'] / other['ttft_p50_ms']:.2f}x" if mode == "coordinated" else "",
                    f"{r['ttft_p90_ms'] / other['ttft_p90_ms']:.2f}x" if mode == "coordinated" else "",
                ]
            )
        c, b = results["coordinated"][kind], results["bypassed"][kind]
        verdicts += [
            (f"{kind}: coordinated p50 <= idle p50 + 25 ms", c["ttft_p50_ms"] <= idle["ttft_p50_ms"] + 25),
            (f"{kind}: coordinated p90 <= 2 x idle p90", c["ttft_p90_ms"] <= 2 * idle["ttft_p90_ms"]),
            (
                f"{kind}: coordinated beats bypassed at p50 and p90",
                c["ttft_p50_ms"] < b["ttft_p50_ms"] and c["ttft_p90_ms"] < b["ttft_p90_ms"],
            ),
        ]
    print(table(rows))

    print()
    rows = [["yield: ask -> released", "n", "p50", "p90", "p99", "max"]]
    everything = []
    for kind, values in results["yield_ms"].items():
        everything += values
        rows.append(
            [
                f"during {'a job' if kind == 'job' else 'an upload'}",
                str(len(values)),
                *(f"{percentile(values, q):.0f} ms" for q in (50, 90, 99, 100)),
            ]
        )
    rows.append(["all", str(len(everything)), *(f"{percentile(everything, q):.0f} ms" for q in (50, 90, 99, 100))])
    print(table(rows))
    for path, times in results["handovers"].items():
        if times:
            print(
                f"yield heard -> released, as transcription reported it ({path}): "
                f"p50 {percentile(times, 50):.2f} ms, max {percentile(times, 100):.2f} ms, n={len(times)}"
            )
    verdicts.append(("yield p99 <= 20 ms", percentile(everything, 99) <= 20))

    print()
    rows = [["transcription under chats", "runs", "equal to unpreempted", "wall / unpreempted wall"]]
    for kind in ("job", "upload"):
        alone = results[f"unpreempted_{kind}"]
        for mode in ("coordinated", "bypassed"):
            runs = results[mode][kind]["runs"]
            equal = sum(run["segments"] == alone["segments"] for run in runs)
            walls = [run["wall_s"] / alone["wall_s"] for run in runs]
            rows.append(
                [f"{kind}, {mode}", str(len(runs)), f"{equal}/{len(runs)}", f"{statistics.median(walls):.2f}x (median)"]
            )
            verdicts.append((f"{kind}, {mode}: every transcript equals the unpreempted one", equal == len(runs)))
        rows[-2][0] += f" ({alone['wall_s']:.1f} s alone)"
    print(table(rows))
    storm = results.get("storm")
    if storm is not None:
        equal = storm["segments"] == results["unpreempted_job"]["segments"]
        print(
            f"storm: a job of {results['audio_s']['job']:.0f} s of audio under 3 looping chat clients finished in "
            f"{storm['job_wall_s']:.1f} s ({storm['job_wall_s'] / results['unpreempted_job']['wall_s']:.1f}x alone; "
            f"{storm['chats']} chats answered meanwhile; batch wait {MAX_BATCH_WAIT_MS} ms, "
            f"slice {BATCH_SLICE_MS} ms), transcript {'equal' if equal else 'DIFFERENT'}"
        )
        verdicts.append(("storm: the job finished with its transcript", equal))
        storm.pop("segments")

    print()
    for what, ok in verdicts:
        print(f"{'met    ' if ok else 'NOT met'}  {what}")
    for mode in ("coordinated", "bypassed"):
        for kind in ("job", "upload"):
            for run in results[mode][kind]["runs"]:
                run.pop("segments")
    for kind in ("job", "upload"):
        results[f"unpreempted_{kind}"].pop("segments")
    print(f"written to {save('stack', results)}")


if __name__ == "__main__":
    main()
