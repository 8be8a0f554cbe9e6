"""The command-line client against a stack from the native launcher, and its errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from baton.launcher import _alive
from harness.launched import LaunchedStack
from harness.servers import REPO_ROOT, free_port

pytestmark = pytest.mark.slow

SPEECH = Path(__file__).resolve().parents[2] / "baton" / "demo" / "speech"


def test_status_chat_ingest_transcribe(launched: LaunchedStack, tmp_path: Path) -> None:
    notes = tmp_path / "plan.txt"
    notes.write_text("The Orion launch is scheduled for the ninth of October. The venue is the Lisbon office.")
    stored = launched.baton("ingest", str(notes), "--id", "orion-plan")
    assert stored.returncode == 0, stored.stderr
    assert stored.stdout.strip() == "orion-plan: 1 chunks stored"
    assert (
        launched.baton("ingest", str(notes), "--id", "orion-plan")
        .stdout.strip()
        .endswith("already stored, nothing added")
    )

    answer = launched.baton("chat", "When is the Orion launch scheduled?", "--top-k", "2", "--max-tokens", "40")
    assert answer.returncode == 0, answer.stderr
    assert "Sources:" in answer.stdout and "plan.txt" in answer.stdout

    queued = launched.baton("transcribe", str(SPEECH / "sentence-03.ogg"), "--no-wait")
    assert queued.returncode == 0 and queued.stdout.startswith("job-")
    waited = launched.baton("transcribe", str(SPEECH / "sentence-04.ogg"))
    assert waited.returncode == 0, waited.stderr
    assert "100.0% done" in waited.stdout and "chess" in waited.stdout.lower()
    spoken = launched.baton("transcribe", str(SPEECH / "sentence-05.ogg"), "--speakers")
    assert spoken.returncode == 0, spoken.stderr
    assert "[0:00] A: She asked" in spoken.stdout
    enrolled = launched.baton("speakers", "enrol", "Sarah", str(SPEECH / "sentence-02.ogg"))
    assert enrolled.returncode == 0, enrolled.stderr
    speaker_id = enrolled.stdout.split(":")[0]
    assert enrolled.stdout.strip().endswith("Sarah enrolled from 1 sample(s)")
    named = launched.baton("transcribe", str(SPEECH / "sentence-05.ogg"), "--speakers")
    assert "] Sarah: She asked" in named.stdout, named.stdout
    assert f"{speaker_id}  Sarah  (1 sample(s)" in launched.baton("speakers", "list").stdout
    assert launched.baton("speakers", "delete", speaker_id).stdout.strip() == f"{speaker_id}: deleted"
    assert launched.baton("speakers", "list").stdout.strip() == "no enrolled voices"
    missing = launched.baton("speakers", "delete", speaker_id)
    assert missing.returncode == 1 and "no speaker" in missing.stderr

    status = launched.baton("status")
    assert status.returncode == 0
    assert status.stdout.startswith("GPU: ")
    assert "last hand-overs" in status.stdout and "transcription" in status.stdout


def test_clear_errors(launched: LaunchedStack, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATON_")}

    def baton(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "baton.cli", *args],
            cwd=REPO_ROOT,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    missing = baton("status", BATON_RUN_DIR=str(tmp_path))
    assert missing.returncode == 1 and "no running stack found" in missing.stderr and "baton up" in missing.stderr
    refused = baton(
        "status",
        "--token",
        "not-a-token",
        "--coordinator-url",
        launched.url("coordinator"),
        BATON_RUN_DIR=str(tmp_path),
    )
    assert refused.returncode == 1 and "refused the token" in refused.stderr
    token = launched.info["token"]
    gone = baton(
        "status", "--token", token, "--coordinator-url", f"http://127.0.0.1:{free_port()}", BATON_RUN_DIR=str(tmp_path)
    )
    assert gone.returncode == 1 and "cannot reach the coordinator service" in gone.stderr
    no_file = baton("transcribe", str(tmp_path / "nope.ogg"), BATON_RUN_DIR=str(launched.run_dir))
    assert no_file.returncode == 1 and "no such file" in no_file.stderr
    assert "Traceback" not in missing.stderr + refused.stderr + gone.stderr + no_file.stderr


def test_the_demo_starts_and_stops_a_stack_of_its_own(tmp_path: Path) -> None:
    own = LaunchedStack(tmp_path / "run")
    result = own.baton("demo", timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Starting the stack" in result.stdout and "Stopping the stack the demo started" in result.stdout
    assert not (tmp_path / "run" / "stack.json").exists()
    assert processes_mentioning(str(tmp_path / "run")) == []


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line or environment contains ``text`` (Redis has its
    data folder in its arguments; services have the run folder's JWT secret file in theirs)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            seen = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if text.encode() in seen and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found
