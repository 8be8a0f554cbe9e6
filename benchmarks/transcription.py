"""Transcription service vs in-process faster-whisper, one run, tiny.en on the CPU.

    .venv/bin/python -m benchmarks.transcription [--repeat 3] [--runs 5] [--preemptions 15] [--windows 10 20 30]

- Speed (audio seconds per second of processing) on the same file (the bundled
  meeting, repeated ``--repeat`` times): through the service as a job (submit ->
  done event) and through the interactive endpoint, beside in-process
  ``WhisperModel.transcribe`` with the same options, both warmed up; ``--runs``
  pairs, which side goes first alternating; the figure is the median of the
  pairs' ratios (in-process time / service time).
- Yield latency: a job runs; an interactive lease is requested at a random moment;
  latency = the batch lease's end - the interactive request's arrival, both from
  the coordinator's history (Redis' clock). Repeated for each decode window.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from faster_whisper import WhisperModel

from benchmarks.support import MEETING, coordinated, dev_token, long_meeting, percentile, save, service_token, table
from harness.servers import ServiceProcess, free_port, running
from services.transcription import audio
from shared.presets import PRESETS
from shared.sse_reader import read_json


def in_process(model: WhisperModel, path: Path, job_like: bool) -> float:
    started = time.monotonic()
    samples = audio.load(path)
    options: dict[str, Any] = (
        {"condition_on_previous_text": False, "vad_filter": False, "temperature": 0.0}
        if job_like
        else {"vad_filter": True}
    )
    segments, _ = model.transcribe(samples, language="en", beam_size=5, **options)
    list(segments)
    return time.monotonic() - started


def service_job(http: httpx.Client, path: Path) -> float:
    started = time.monotonic()
    with path.open("rb") as handle:
        job_id = http.post("/v1/jobs", files={"file": (path.name, handle)}).json()["job_id"]
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        for body in read_json(events.iter_lines()):
            if body.get("type") == "done":
                break
    return time.monotonic() - started


def service_interactive(http: httpx.Client, path: Path) -> float:
    started = time.monotonic()
    with path.open("rb") as handle:
        http.post("/v1/audio/transcriptions", files={"file": (path.name, handle)}, data={"model": "whisper-1"})
    return time.monotonic() - started


def yield_latencies(http: httpx.Client, gpu: httpx.Client, path: Path, preemptions: int) -> list[float]:
    """Preempt running jobs at random moments; latency from the coordinator's history."""
    rng = random.Random(7)
    samples: list[float] = []
    job_id = ""
    while len(samples) < preemptions:
        if not job_id or http.get(f"/v1/jobs/{job_id}").json()["state"] in ("done", "failed", "cancelled"):
            with path.open("rb") as handle:
                job_id = http.post("/v1/jobs", files={"file": (path.name, handle)}).json()["job_id"]
        while http.get(f"/v1/jobs/{job_id}").json()["state"] != "running":
            time.sleep(0.01)
        time.sleep(rng.random() * 1.5)  # a random phase within the decoding
        if http.get(f"/v1/jobs/{job_id}").json()["state"] != "running":
            continue
        as_llm = {"Authorization": f"Bearer {service_token('llm')}"}
        body = {"holder": "llm", "priority": "interactive", "wait_ms": 60000}
        grant = gpu.post("/v1/leases", json=body, headers=as_llm).json()
        gpu.delete(f"/v1/leases/{grant['lease_id']}", headers=as_llm)
        history = gpu.get("/v1/history", params={"limit": 3}).json()
        mine = next(h for h in history if h["fence"] == grant["fence"])
        yielded = next(h for h in history if h["fence"] == grant["fence"] - 1)
        if yielded["holder"] == "transcription" and yielded["end"] == "released":
            samples.append(yielded["ended_at"] - mine["requested_at"])
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--preemptions", type=int, default=15)
    parser.add_argument("--windows", type=int, nargs="+", default=[10, 20, 30])
    args = parser.parse_args()

    headers = {"Authorization": f"Bearer {dev_token()}"}
    with tempfile.TemporaryDirectory() as tmp, coordinated(Path(tmp)) as (redis, coordinator):
        work = Path(tmp)
        path, seconds = long_meeting(work, args.repeat)
        base = {
            "TRANSCRIPTION_REDIS_URL": redis.url,
            "GPU_COORDINATOR_URL": coordinator.url,
            "RAG_SERVICE_URL": f"http://127.0.0.1:{free_port()}",
            "TRANSCRIPTION_LOG_LEVEL": "warning",
            "TRANSCRIPTION_MAX_UPLOAD_MB": "100",
        }
        service = ServiceProcess("transcription", {**base, "TRANSCRIPTION_DATA_DIR": str(work / "tx")}, work)
        with running(service), httpx.Client(base_url=service.url, headers=headers, timeout=600) as http:
            results: dict[str, Any] = {"speed": speed(http, path, seconds, args.runs), "yield_latency": {}}
        with httpx.Client(base_url=coordinator.url, headers=headers, timeout=120) as gpu:
            for window in args.windows:
                env = {
                    **base,
                    "TRANSCRIPTION_CHUNK_LENGTH_S": str(window),
                    "TRANSCRIPTION_DATA_DIR": str(work / f"tx{window}"),
                }
                service = ServiceProcess("transcription", env, work)
                with running(service), httpx.Client(base_url=service.url, headers=headers, timeout=600) as http:
                    latencies = yield_latencies(http, gpu, path, args.preemptions)
                results["yield_latency"][str(window)] = {
                    "n": len(latencies),
                    "p50_ms": round(percentile(latencies, 50) * 1000, 1),
                    "p99_ms": round(percentile(latencies, 99) * 1000, 1),
                    "mean_ms": round(statistics.fmean(latencies) * 1000, 1),
                }
    report(results)


def speed(http: httpx.Client, path: Path, seconds: float, pairs: int) -> dict[str, Any]:
    """Service vs in-process, in pairs whose order alternates: this machine's speed drifts
    by up to 50% over minutes, and a pair is close enough in time to share it."""
    model = WhisperModel(str(PRESETS["whisper-tiny.en"].location()), device="cpu", compute_type="int8")
    service_interactive(http, MEETING)  # warm both up
    in_process(model, MEETING, job_like=False)
    runs: dict[str, dict[str, list[float]]] = {
        "job": {"service_s": [], "in_process_s": []},
        "interactive": {"service_s": [], "in_process_s": []},
    }
    for run in range(pairs):
        for name, ours, theirs in (
            ("job", lambda: service_job(http, path), lambda: in_process(model, path, job_like=True)),
            ("interactive", lambda: service_interactive(http, path), lambda: in_process(model, path, job_like=False)),
        ):
            first, second = (ours, theirs) if run % 2 == 0 else (theirs, ours)
            a, b = first(), second()
            service_s, in_process_s = (a, b) if run % 2 == 0 else (b, a)
            runs[name]["service_s"].append(service_s)
            runs[name]["in_process_s"].append(in_process_s)
    result: dict[str, Any] = {"audio_s": round(seconds, 1)}
    for name, figures in runs.items():
        service_s = statistics.median(figures["service_s"])
        in_process_s = statistics.median(figures["in_process_s"])
        ratios = [b / a for a, b in zip(figures["service_s"], figures["in_process_s"], strict=True)]
        result[name] = {
            "service_s": round(service_s, 3),
            "in_process_s": round(in_process_s, 3),
            "paired_ratio": round(statistics.median(ratios), 3),
            "service_x_realtime": round(seconds / service_s, 2),
            "in_process_x_realtime": round(seconds / in_process_s, 2),
        }
    return result


def report(results: dict[str, Any]) -> None:
    speed = results["speed"]
    rows = [["path", "service (x real time)", "in-process (x real time)", "service/in-process (paired)"]]
    for name in ("job", "interactive"):
        s = speed[name]
        rows.append(
            [name, f"{s['service_x_realtime']:.1f}", f"{s['in_process_x_realtime']:.1f}", f"{s['paired_ratio']:.3f}x"]
        )
    print(f"{speed['audio_s']:.0f} s of speech, tiny.en, CPU; medians")
    print(table(rows))
    share = speed["job"]["paired_ratio"]
    print(f"target: job >= 0.95x in-process: {'met' if share >= 0.95 else 'NOT met'} ({share:.3f}x)")
    print()
    rows = [["decode window", "yield latency p50", "p99", "mean", "n"]]
    for window, y in results["yield_latency"].items():
        rows.append(
            [f"{window} s", f"{y['p50_ms']:.0f} ms", f"{y['p99_ms']:.0f} ms", f"{y['mean_ms']:.0f} ms", str(y["n"])]
        )
    print(table(rows))
    print(f"written to {save('transcription', results)}")


if __name__ == "__main__":
    main()
