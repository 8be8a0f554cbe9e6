"""kill -9 of each process of the launched stack while it serves a load: the supervisor
starts it again, the others never stop, a stream it was sending ends with an error event
and ``[DONE]``, and no job or memory is lost. A stack of its own: these tests kill its
processes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.launched import LaunchedStack
from harness.servers import wait_until
from harness.speech import long_meeting
from shared.sse_reader import read_json

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
BACK_WITHIN_S = 10.0
"""The issue's bar: a killed process answers ``/ready`` again within this."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedStack]:
    made = LaunchedStack(tmp_path_factory.mktemp("supervised") / "run")
    made.env["BATON_RESTART_BACKOFF_S"] = "0.2"
    # A killed service's lease is the coordinator's until its TTL (15 s as shipped): the
    # new process waits that out before it holds the card again. Shorter here, so that
    # the tests wait less for what they do not measure (the services' tests use 2 s).
    made.env["GEMMA_LEASE_TTL_MS"] = made.env["TRANSCRIPTION_LEASE_TTL_MS"] = "4000"
    # Greedy decoding, as the transcription service's tests: the job test compares two
    # transcripts of this one service, not their words (docs/testing.md).
    made.env["TRANSCRIPTION_BEAM_SIZE"] = "1"
    made.up()
    yield made
    made.down()


@pytest.fixture(scope="module")
def gateway(stack: LaunchedStack) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {stack.info['token']}", "Cache-Control": "no-cache"}
    with httpx.Client(base_url=stack.url("gateway"), headers=headers, timeout=120) as http:
        yield http


def pids(stack: LaunchedStack) -> dict[str, int]:
    return {k: int(v) for k, v in json.loads((stack.run_dir / "pids.json").read_text()).items()}


def restarts(stack: LaunchedStack) -> dict[str, int]:
    state = json.loads((stack.run_dir / "supervisor.json").read_text())["services"]
    return {name: int(entry["restarts"]) for name, entry in state.items()}


class Load:
    """Chats, memory queries and GPU reads through the gateway from a thread, until
    stopped: what each answered, by route."""

    def __init__(self, stack: LaunchedStack) -> None:
        self._stack = stack
        self._stop = threading.Event()
        self.answers: list[tuple[float, str, int]] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self._stack.info['token']}", "Cache-Control": "no-cache"}
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
        calls: list[tuple[str, Callable[[httpx.Client], httpx.Response]]] = [
            ("chat", lambda http: http.post("/v1/chat/completions", json=chat)),
            ("query", lambda http: http.post("/v1/query", json={"query": "deadline", "top_k": 2})),
            ("gpu", lambda http: http.get("/v1/gpu")),
        ]
        with httpx.Client(base_url=self._stack.url("gateway"), headers=headers, timeout=60) as http:
            while not self._stop.is_set():
                for route, call in calls:
                    try:
                        status = call(http).status_code
                    except httpx.HTTPError:
                        status = 0
                    self.answers.append((time.monotonic(), route, status))
                    self._stop.wait(0.05)  # a client that is refused does not spin

    def statuses(self, after: float) -> set[int]:
        return {status for at, _, status in self.answers if at >= after}


def kill_and_wait(stack: LaunchedStack, name: str) -> float:
    """SIGKILL one process; the seconds until the supervisor's new one is ready."""
    before = pids(stack)
    killed_at = time.monotonic()
    os.kill(before[name], signal.SIGKILL)

    def back() -> bool:
        now = pids(stack)
        if now[name] == before[name]:
            return False
        if name == "redis":
            return bool(httpx.get(f"{stack.url('coordinator')}/ready", timeout=2).status_code == 200)
        try:
            return httpx.get(f"{stack.url(name)}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(back, 60, f"{name} to be started again and ready", 0.05)
    took = time.monotonic() - killed_at
    after = pids(stack)
    assert {k: v for k, v in after.items() if k != name} == {k: v for k, v in before.items() if k != name}
    return took


def served(gateway: httpx.Client) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    answer = gateway.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text


def test_a_stream_whose_llm_is_killed_ends_with_an_error_event_and_the_llm_comes_back(
    stack: LaunchedStack, gateway: httpx.Client, record_property: Any
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
        "max_tokens": 2000,
        "stream": True,
    }
    lines: list[str] = []
    took = 0.0
    with Load(stack) as load:
        with gateway.stream("POST", "/v1/chat/completions", json=body) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                lines.append(line)
                if line.startswith("data: {") and sum(x.startswith("data: {") for x in lines) == 5:
                    took = kill_and_wait(stack, "llm")
        back_at = time.monotonic()
        wait_until(lambda: 200 in load.statuses(back_at), 30, "the load to be served again", 0.05)
    events = list(read_json(iter(lines)))
    assert events[-1]["error"]["code"] == "service_failed", events[-1]
    assert [x for x in lines if x][-1] == "data: [DONE]"
    record_property("measured: llm back after kill -9 in", f"{took:.2f} s")
    assert took < BACK_WITHIN_S
    assert restarts(stack)["llm"] == 1
    served(gateway)


def test_a_job_whose_transcription_service_is_killed_finishes_with_the_same_transcript(
    stack: LaunchedStack, gateway: httpx.Client, tmp_path: Path, record_property: Any
) -> None:
    recording, _ = long_meeting(tmp_path, 2)

    def submit() -> str:
        with recording.open("rb") as handle:
            answer = gateway.post("/v1/jobs", files={"file": (recording.name, handle)})
        assert answer.status_code == 202, answer.text
        return str(answer.json()["job_id"])

    def job(job_id: str) -> dict[str, Any]:
        answer = gateway.get(f"/v1/jobs/{job_id}")
        return dict(answer.json()) if answer.status_code == 200 else {}

    reference = submit()
    wait_until(lambda: job(reference).get("state") == "done", 300, "the reference job", 0.25)
    killed = submit()
    wait_until(lambda: len(job(killed).get("segments", [])) >= 3, 120, "the job to be under way", 0.1)
    with Load(stack):
        took = kill_and_wait(stack, "transcription")
    wait_until(lambda: job(killed).get("state") == "done", 300, "the killed job to finish", 0.25)
    assert job(killed)["text"] == job(reference)["text"]
    record_property("measured: transcription back after kill -9 in", f"{took:.2f} s")
    assert took < BACK_WITHIN_S
    served(gateway)


@pytest.mark.parametrize("name", ["rag", "coordinator", "redis", "gateway"])
def test_each_other_process_killed_under_load_comes_back_and_loses_nothing(
    stack: LaunchedStack, gateway: httpx.Client, name: str, record_property: Any
) -> None:
    marker = f"the {name} survives: magenta-{os.getpid()}-{name}"
    stored = gateway.post("/v1/documents", json={"documents": [{"text": marker}]})
    assert stored.status_code == 200, stored.text
    conversation = gateway.post("/v1/conversations", json={"title": f"kept over {name}"})
    assert conversation.status_code == 201, conversation.text
    with Load(stack) as load:
        took = kill_and_wait(stack, name)
        back_at = time.monotonic()
        wait_until(lambda: 200 in load.statuses(back_at), 30, "the load to be served again", 0.05)
    found = gateway.post("/v1/query", json={"query": marker, "top_k": 1})
    assert found.status_code == 200, found.text
    assert found.json()["results"][0]["text"] == marker
    assert gateway.get(f"/v1/conversations/{conversation.json()['id']}").status_code == 200
    record_property(f"measured: {name} back after kill -9 in", f"{took:.2f} s")
    assert took < BACK_WITHIN_S
    assert restarts(stack)[name] == 1
    served(gateway)
