"""``baton demo``: the stack's main job in one command.

Start the stack if it is not running, transcribe the bundled meeting recording,
index it, ask a question about it and stream an answer that cites the transcript
segment it used; then show how the GPU was handed over.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import httpx

from baton import commands
from baton.launcher import LauncherSettings, start_detached, stop_detached
from baton.stack import Stack, StackError

MEETING = Path(__file__).resolve().parent / "speech" / "meeting.ogg"
QUESTION = "What is the new deadline for the Harbor report?"


def _running(settings: LauncherSettings) -> Stack | None:
    try:
        stack = Stack.find(settings.run_dir)
        httpx.get(f"{stack.url('llm')}/health", timeout=2).raise_for_status()
    except (StackError, httpx.HTTPError):
        return None
    return stack


def run(settings: LauncherSettings, *, keep: bool, question: str = QUESTION, out: TextIO = sys.stdout) -> int:
    def say(line: str) -> None:
        out.write(line + "\n")

    found = _running(settings)
    started_here = found is None
    if found is None:
        say("Starting the stack (as `baton up --detach` would)...")
        if start_detached(settings, say=say) != 0:
            return 1
        found = Stack.find(settings.run_dir)
    stack = found
    try:
        out.write(f"\n1. Transcribing the bundled meeting recording ({MEETING.name}) as a job:\n")
        job = commands.transcribe(stack, MEETING, wait=True, recorded_at=datetime.now(UTC).isoformat(), out=out)
        out.write("\n2. Indexing the transcript as memories... ")
        out.write("done\n" if commands.wait_indexed(stack, job["job_id"]) else "still pending (RAG unreachable?)\n")
        out.write(f"\n3. Asking: {question}\n\n")
        # From this transcript's memories: on a stack that already holds other
        # transcripts of the same meeting, those can rank first (a test run saw it).
        answer = commands.chat(
            stack, question, rag=True, top_k=3, max_tokens=80, rag_filter={"job_id": job["job_id"]}, out=out
        )
        out.write("\n4. How the GPU was handed over:\n")
        commands.status(stack, out=out)
        cited = [s for s in answer["sources"] if s.get("metadata", {}).get("job_id") == job["job_id"]]
        out.write(f"\nThe answer cites {len(cited)} segment(s) of the transcript it just made.\n")
        return 0 if cited else 1
    except StackError as exc:
        out.write(f"\nerror: {exc}\n")
        return 1
    finally:
        if started_here and not keep:
            out.write("\nStopping the stack the demo started (use --keep to leave it running).\n")
            stop_detached(settings, say=say)
