"""What ``baton status | chat | transcribe | ingest`` do, over the services' HTTP APIs."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from baton.stack import Stack, StackError, check
from shared.protocol.rag import DocumentIn, DocumentsIn
from shared.sse_reader import read_json


def _clock(seconds: float) -> str:
    total = int(seconds)
    return f"{total // 60}:{total % 60:02d}"


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return datetime.fromtimestamp(epoch, UTC).strftime("%H:%M:%S")


def status(stack: Stack, out: TextIO = sys.stdout, handoffs: int = 8) -> dict[str, Any]:
    """Who holds the GPU, who waits, the last hand-overs."""
    with stack.client("coordinator") as http:
        gpu = check(http.get("/v1/gpu"), "coordinator").json()
        history = check(http.get("/v1/history", params={"limit": handoffs}), "coordinator").json()
    if gpu["holder"]:
        since = time.time() - gpu["granted_at"]
        asked = ", asked to yield" if gpu["yield_requested"] else ""
        out.write(f"GPU: held by {gpu['holder']} ({gpu['priority']}, fence {gpu['fence']}) for {since:.1f} s{asked}\n")
    else:
        out.write("GPU: free\n")
    if gpu.get("quarantine_until"):
        out.write(f"quarantined until {_when(gpu['quarantine_until'])} (Redis lost its data)\n")
    for waiter in gpu["queue"]:
        out.write(f"  waiting: {waiter['holder']} ({waiter['priority']}) for {waiter['waiting_ms'] / 1000:.1f} s\n")
    processes = _processes(stack)
    if processes:
        out.write("processes:\n")
        for name, entry in processes.items():
            restarted = f", last restarted {_when(entry.get('last_restart_at'))}" if entry.get("restarts") else ""
            exited = f" (last exit status {entry['last_exit']})" if entry.get("last_exit") is not None else ""
            out.write(f"  {name:<14} {entry.get('state')}, {entry.get('restarts', 0)} restarts{restarted}{exited}\n")
    if history:
        out.write("last hand-overs (newest first):\n")
        for item in history:
            held = (item["ended_at"] or time.time()) - item["granted_at"]
            end = item["end"] or "holding"
            out.write(
                f"  fence {item['fence']}  {item['holder']:<14} {item['priority']:<11} "
                f"granted {_when(item['granted_at'])}  held {held:6.2f} s  {end}\n"
            )
    return {"gpu": gpu, "history": history, "processes": processes}


def _processes(stack: Stack) -> dict[str, Any]:
    """The launcher's restarts, from the gateway's /ready ({} without a gateway or a launcher)."""
    if "gateway" not in stack.urls:
        return {}
    try:
        with stack.client("gateway", timeout_s=5) as http:
            answer = http.get("/ready")
    except StackError:
        return {}
    return dict(answer.json().get("processes") or {}) if answer.is_success else {}


def chat(
    stack: Stack,
    question: str,
    *,
    rag: bool,
    top_k: int,
    max_tokens: int,
    rag_filter: dict[str, str] | None = None,
    out: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Stream the answer, then its sources (``rag_filter``: the memories it may use, as
    the chat API's ``rag.filter``)."""
    with stack.client("llm", timeout_s=600) as http:
        model = check(http.get("/v1/models"), "llm").json()["data"][0]["id"]
        body: dict[str, Any] = {
            "model": model, "messages": [{"role": "user", "content": question}], "stream": True,
            "max_tokens": max_tokens, "temperature": 0,
        }  # fmt: skip
        if rag:
            body["rag"] = {"top_k": top_k, **({"filter": rag_filter} if rag_filter else {})}
        answer: list[str] = []
        final: dict[str, Any] = {}
        with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if not response.is_success:
                response.read()
                check(response, "llm")
            for event in read_json(response.iter_lines()):
                if "error" in event:
                    raise StackError(f"the answer was cut short: {event['error']['message']}")
                choice = (event.get("choices") or [{}])[0]
                piece = choice.get("delta", {}).get("content")
                if piece:
                    answer.append(piece)
                    out.write(piece)
                    out.flush()
                if choice.get("finish_reason"):
                    final = event
    out.write("\n")
    sources = final.get("sources", [])
    if sources:
        out.write("\nSources:\n")
        for index, source in enumerate(sources, start=1):
            out.write(f"  [{index}] {describe(source)}\n")
    for warning in final.get("baton", {}).get("warnings", []):
        out.write(f"note: {warning}\n")
    return {"answer": "".join(answer), "sources": sources, "baton": final.get("baton", {})}


def describe(source: dict[str, Any]) -> str:
    meta = source.get("metadata", {})
    text = " ".join(str(source.get("text", "")).split())
    if meta.get("kind") == "segment":
        where = f"{meta.get('source')} {_clock(meta.get('start', 0))}-{_clock(meta.get('end', 0))}"
    else:
        where = str(meta.get("source") or meta.get("doc_id") or source.get("id"))
    return f'{where}: "{text[:100]}{"..." if len(text) > 100 else ""}"'


def transcribe(
    stack: Stack,
    path: Path,
    *,
    wait: bool,
    language: str | None = None,
    recorded_at: str | None = None,
    speakers: bool = False,
    out: TextIO = sys.stdout,
) -> dict[str, Any]:
    """Start a job; unless ``wait`` is False, follow it with a progress bar and print the
    transcript (``speakers``: a line per segment, who spoke first)."""
    if not path.is_file():
        raise StackError(f"no such file: {path}")
    form = {k: v for k, v in (("language", language), ("recorded_at", recorded_at)) if v}
    if speakers:
        form["diarize"] = "true"
    with stack.client("transcription", timeout_s=600) as http:
        with path.open("rb") as handle:
            response = check(http.post("/v1/jobs", files={"file": (path.name, handle)}, data=form), "transcription")
        job_id = str(response.json()["job_id"])
        if not wait:
            out.write(f"{job_id}\n")
            return {"job_id": job_id}
        out.write(f"transcribing {path.name} ({response.json()['duration']:.0f} s) as {job_id}\n")
        with http.stream("GET", f"/v1/jobs/{job_id}/events") as events:
            if not events.is_success:
                events.read()
                check(events, "transcription")
            for event in read_json(events.iter_lines()):
                progress = event.get("progress")
                if progress is not None:
                    filled = int(progress * 30)
                    state = event.get("state", "running")
                    out.write(f"\r  [{'#' * filled}{'.' * (30 - filled)}] {progress * 100:5.1f}% {state:<9}")
                    out.flush()
        job = check(http.get(f"/v1/jobs/{job_id}"), "transcription").json()
    out.write("\n")
    if job["state"] != "done":
        raise StackError(f"the job ended {job['state']}: {job.get('error') or ''}".rstrip(": "))
    if speakers:
        for segment in job["segments"]:
            out.write(f"[{_clock(segment['start'])}] {segment.get('speaker', '?')}: {segment['text'].strip()}\n")
    else:
        out.write(job["text"] + "\n")
    return dict(job)


def wait_indexed(stack: Stack, job_id: str, timeout_s: float = 120) -> bool:
    give_up = time.monotonic() + timeout_s
    with stack.client("transcription") as http:
        while time.monotonic() < give_up:
            if check(http.get(f"/v1/jobs/{job_id}"), "transcription").json()["indexed"]:
                return True
            time.sleep(0.5)
    return False


def speakers(
    stack: Stack, action: str, *, name: str | None = None, files: list[Path] | None = None,
    speaker_id: str | None = None, out: TextIO = sys.stdout,
) -> Any:  # fmt: skip
    """Enrolled voices: ``enrol`` (a name and 1-4 samples of 2-10 s), ``list``, ``delete``."""
    with stack.client("transcription", timeout_s=300) as http:
        if action == "enrol":
            for path in files or []:
                if not path.is_file():
                    raise StackError(f"no such file: {path}")
            uploads = [("file", (path.name, path.read_bytes())) for path in files or []]
            voice = check(http.post("/v1/speakers", data={"name": name or ""}, files=uploads), "transcription").json()
            out.write(f"{voice['id']}: {voice['name']} enrolled from {voice['samples']} sample(s)\n")
            return voice
        if action == "delete":
            check(http.delete(f"/v1/speakers/{speaker_id}"), "transcription")
            out.write(f"{speaker_id}: deleted\n")
            return None
        voices = check(http.get("/v1/speakers"), "transcription").json()["data"]
        for voice in voices:
            made = datetime.fromtimestamp(voice["created_at"], UTC).strftime("%Y-%m-%d")
            out.write(f"{voice['id']}  {voice['name']}  ({voice['samples']} sample(s), enrolled {made})\n")
        if not voices:
            out.write("no enrolled voices\n")
        return voices


def ingest(stack: Stack, path: Path, *, doc_id: str | None, out: TextIO = sys.stdout) -> dict[str, Any]:
    if not path.is_file():
        raise StackError(f"no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise StackError(f"{path} is not UTF-8 text") from None
    given: dict[str, Any] = {"text": text, "metadata": {"source": path.name}}
    if doc_id:
        given["id"] = doc_id
    document = DocumentIn.model_construct(**given)
    body = DocumentsIn.model_construct(documents=[document]).model_dump(mode="json", exclude_unset=True)
    with stack.client("rag", timeout_s=300) as http:
        stored = check(http.post("/v1/documents", json=body), "rag").json()
    added = "already stored, nothing added" if stored["chunks"] == 0 else f"{stored['chunks']} chunks stored"
    out.write(f"{stored['ids'][0]}: {added}\n")
    return dict(stored)
