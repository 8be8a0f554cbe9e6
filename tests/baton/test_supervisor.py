"""The launcher's supervisor on small real processes: what dies is started again after a
backoff that doubles, what crash-loops is left down, and the others never stop."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from baton.launcher import LauncherSettings, Supervisor, read_supervisor
from harness.servers import wait_until

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    settings = LauncherSettings(
        run_dir=tmp_path / "run",
        restart_backoff_s=0.05,
        restart_max_backoff_s=0.4,
        crash_loop_restarts=4,
        crash_loop_window_s=60,
    )
    said: list[str] = []
    made = Supervisor(settings, say=said.append)
    made.paths.logs.mkdir(parents=True)
    yield made
    made.stop()


def run(supervisor: Supervisor) -> tuple[threading.Event, threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=supervisor.supervise, args=(stop, 0.01), daemon=True)
    thread.start()
    return stop, thread


def test_a_process_that_dies_is_started_again_and_the_others_run_on(supervisor: Supervisor, tmp_path: Path) -> None:
    flag = tmp_path / "second-life"
    # Dies the first time (status 3), lives the second.
    script = f"import pathlib, sys, time\np = pathlib.Path({str(flag)!r})\nif not p.exists(): p.touch(); sys.exit(3)\n"
    supervisor._spawn("llm", [sys.executable, "-c", script + "time.sleep(600)"], {})
    supervisor._spawn("rag", SLEEPER, {})
    llm, rag = supervisor.children
    rag_pid = rag.process.pid
    stop, thread = run(supervisor)
    try:
        wait_until(lambda: llm.restarts == 1 and llm.process.poll() is None, 30, "the llm to be started again")
        wait_until(lambda: read_supervisor(supervisor.paths)["services"]["llm"]["restarts"] == 1, 10, "the record")
        state = read_supervisor(supervisor.paths)["services"]
        assert state["llm"]["state"] == "running" and state["llm"]["last_exit"] == 3
        assert state["llm"]["pid"] == llm.process.pid
        assert state["rag"] == {**state["rag"], "restarts": 0, "state": "running", "pid": rag_pid}
        assert rag.process.poll() is None and rag.process.pid == rag_pid
        assert json.loads(supervisor.paths.pids.read_text())["llm"] == llm.process.pid
    finally:
        stop.set()
        thread.join(10)


def test_a_crash_loop_is_left_down_after_backoffs_that_double(supervisor: Supervisor) -> None:
    supervisor._spawn("transcription", [sys.executable, "-c", "raise SystemExit(7)"], {})
    supervisor._spawn("gateway", SLEEPER, {})
    dying, gateway = supervisor.children
    waits: list[float] = []
    original = supervisor._watch

    def watched(child):
        changed = original(child)
        if child is dying and changed and child.due is not None:
            waits.append(round(child.due - child.started, 3))
        return changed

    supervisor._watch = watched  # type: ignore[method-assign]
    stop, thread = run(supervisor)
    try:
        wait_until(lambda: dying.failed, 30, "the crash loop to be noticed")
    finally:
        stop.set()
        thread.join(10)
    assert dying.restarts == 4 and dying.state == "failed"
    assert read_supervisor(supervisor.paths)["services"]["transcription"]["state"] == "failed"
    assert gateway.process.poll() is None  # the rest runs on
    # Each wait is at least twice the one before, up to the ceiling (0.4 s).
    assert len(waits) == 4
    backoffs = [0.05, 0.1, 0.2, 0.4]
    for waited, least in zip(waits, backoffs, strict=True):
        assert waited >= least, waits
