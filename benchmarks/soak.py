"""A soak: the launched stack under a mixed load from several users, with one of its
processes killed (SIGKILL) at a fixed interval, for a long while.

    .venv/bin/python -m benchmarks.soak [--minutes 30] [--kill-every 5] [--users 4]

Each user (a token of its own: chat, rag:read, rag:write, transcribe) loops through
streamed chats, tool calls, text-to-SQL over the demo database, short uploads and
transcription jobs of the bundled meeting, with a second of thought between requests.
Every ``--kill-every`` minutes the next of llm, transcription, rag, coordinator, gateway
and redis is killed; the launcher's supervisor starts it again.

It prints: every answer's status by kind; each 5xx with its code (the documented ones are
503s: ``service_unavailable`` and ``service_failed`` while a process is started again,
``store_unavailable`` while Redis is, ``gpu_unavailable`` for an upload that waited out
its GPU wait); what got no answer at all, by exception; streams cut by a kill (an error event and
``[DONE]``); whether every job finished with the transcript of an uninterrupted run; each
process's memory (RSS, its children included) at the start, before its kill, after its
restart and at the end; and the p90 first token of the chats in the minute before each
kill and the minute after the process was back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.support import MEETING, percentile, save, table
from harness.launched import LaunchedStack
from harness.samples import WEATHER_TOOL as TOOL
from shared.sse_reader import read_json

MODEL = "smollm2-135m-instruct"
VICTIMS = ("llm", "transcription", "rag", "coordinator", "gateway", "redis")
SPEECH = MEETING.parent
DOCUMENTED_5XX = {
    (503, "service_unavailable"),
    (503, "service_failed"),
    (503, "store_unavailable"),
    (503, "busy"),
    (503, "gpu_unavailable"),
}


@dataclass
class Answer:
    at: float
    user: str
    kind: str
    status: int
    code: str | None = None
    first_token_s: float | None = None
    cut: bool = False
    """A stream that ended with an error event (its service was killed)."""
    no_call: bool = False
    """A tool answer without a call (cut by max_tokens inside it: returned as text)."""


@dataclass
class Soak:
    stack: LaunchedStack
    tokens: dict[str, str]
    reference: str
    until: float
    answers: list[Answer] = field(default_factory=list)
    jobs: dict[str, str] = field(default_factory=dict)
    """job id -> its owner."""
    kills: list[dict[str, Any]] = field(default_factory=list)
    memory: list[dict[str, Any]] = field(default_factory=list)

    def client(self, user: str) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.tokens[user]}", "Cache-Control": "no-cache"}
        return httpx.AsyncClient(base_url=self.stack.url("gateway"), headers=headers, timeout=180)

    def note(
        self, user: str, kind: str, response: httpx.Response | None, error: str | None = None, **extra: Any
    ) -> None:
        code = error
        if response is not None and response.status_code >= 400:
            try:
                code = response.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = None
        status = response.status_code if response is not None else 0
        self.answers.append(Answer(time.monotonic(), user, kind, status, code, **extra))

    # -- the users -----------------------------------------------------------------------

    async def user(self, name: str, seed: int) -> None:
        chooser = random.Random(seed)  # a load mix, not a secret
        kinds = ["chat"] * 4 + ["tool", "sql", "upload", "job"]
        async with self.client(name) as http:
            while time.monotonic() < self.until:
                kind = chooser.choice(kinds)
                try:
                    await getattr(self, kind)(http, name, chooser)
                except httpx.HTTPError as exc:
                    self.note(name, kind, None, error=type(exc).__name__)
                await asyncio.sleep(1.0)

    async def chat(self, http: httpx.AsyncClient, name: str, chooser: random.Random) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Tell me about item {chooser.randrange(10**6)}."}],
            "max_tokens": 48,
            "stream": True,
        }
        sent = time.monotonic()
        first = None
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                self.note(name, "chat", response)
                return
            lines = []
            async for line in response.aiter_lines():
                if first is None and line.startswith("data: {"):
                    first = time.monotonic() - sent
                lines.append(line)
        cut = any("error" in event for event in read_json(iter(lines)))
        self.note(name, "chat", response, first_token_s=None if cut else first, cut=cut)

    async def tool(self, http: httpx.AsyncClient, name: str, chooser: random.Random) -> None:
        city = chooser.choice(["Paris", "Oslo", "Lima", "Kyoto"])
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"What is the weather in {city}?"}],
            "tools": [TOOL],
            "tool_choice": "required",
            "max_tokens": 40,
        }
        response = await http.post("/v1/chat/completions", json=body)
        if response.status_code == 200:
            try:
                json.loads(response.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
            except (ValueError, KeyError, IndexError, TypeError):
                self.note(name, "tool", response, no_call=True)  # 200 without a call: counted apart
                return
        self.note(name, "tool", response)

    async def sql(self, http: httpx.AsyncClient, name: str, chooser: random.Random) -> None:
        question = chooser.choice(
            ["How many workspaces are in the ERROR state?", "Which users have more than one workspace?"]
        )
        body = {"question": question, "database": "inventory", "execute": True, "max_tokens": 64}
        self.note(name, "sql", await http.post("/v1/sql", json=body))

    async def upload(self, http: httpx.AsyncClient, name: str, chooser: random.Random) -> None:
        path = SPEECH / f"sentence-0{chooser.randint(1, 6)}.ogg"
        files = {"file": (path.name, path.read_bytes())}
        self.note(name, "upload", await http.post("/v1/audio/transcriptions", files=files, data={"model": "whisper-1"}))

    async def job(self, http: httpx.AsyncClient, name: str, chooser: random.Random) -> None:
        if sum(1 for owner in self.jobs.values() if owner == name) >= 3:  # a few each: they are long
            return await self.chat(http, name, chooser)
        response = await http.post("/v1/jobs", files={"file": (MEETING.name, MEETING.read_bytes())})
        if response.status_code == 202:
            self.jobs[response.json()["job_id"]] = name
        self.note(name, "job", response)
        return None

    # -- the killer and the watcher ------------------------------------------------------

    def pids(self) -> dict[str, int]:
        return {k: int(v) for k, v in json.loads((self.stack.run_dir / "pids.json").read_text()).items()}

    async def killer(self, every_s: float) -> None:
        turn = 0
        while time.monotonic() + every_s < self.until:
            await asyncio.sleep(every_s)
            victim = VICTIMS[turn % len(VICTIMS)]
            turn += 1
            before = self.pids()
            rss_before = rss_tree(before[victim])
            killed_at = time.monotonic()
            os.kill(before[victim], signal.SIGKILL)
            back_at = await self.back(victim, before[victim])
            self.kills.append(
                {
                    "victim": victim,
                    "killed_at": killed_at,
                    "back_s": round(back_at - killed_at, 2),
                    "back_at": back_at,
                    "rss_mb_before": rss_before,
                    "others_untouched": {k: v for k, v in self.pids().items() if k != victim}
                    == {k: v for k, v in before.items() if k != victim},
                }
            )
            print(f"  killed {victim}: back in {back_at - killed_at:.2f} s", flush=True)

    async def back(self, victim: str, old_pid: int) -> float:
        probe = "coordinator" if victim == "redis" else victim
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                if self.pids().get(victim) != old_pid:
                    try:
                        if (await http.get(f"{self.stack.url(probe)}/ready")).status_code == 200:
                            return time.monotonic()
                    except httpx.HTTPError:
                        pass
                await asyncio.sleep(0.05)

    async def watcher(self) -> None:
        while time.monotonic() < self.until:
            self.memory.append({"at": time.monotonic(), **{k: rss_tree(v) for k, v in self.pids().items()}})
            await asyncio.sleep(15)


def rss_tree(pid: int) -> float:
    """Resident memory of a process and its children, in MB."""
    total = 0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        pending += [int(c) for c in children]
    return round(total / 1024, 1)


async def finish_jobs(soak: Soak) -> dict[str, str]:
    """Wait for every job; each one's final state, and whether its transcript is right."""
    outcome: dict[str, str] = {}
    for job_id, owner in soak.jobs.items():
        async with soak.client(owner) as http:
            give_up = time.monotonic() + 900
            while True:
                response = await http.get(f"/v1/jobs/{job_id}")
                state = response.json().get("state") if response.status_code == 200 else f"http {response.status_code}"
                if state in ("done", "failed", "cancelled") or time.monotonic() > give_up:
                    break
                await asyncio.sleep(1)
            if state == "done":
                outcome[job_id] = "right" if response.json()["text"] == soak.reference else "different"
            else:
                outcome[job_id] = str(state)
    return outcome


def mint(stack: LaunchedStack, user: str) -> str:
    scopes = ("chat", "rag:read", "rag:write", "transcribe")
    made = stack.baton("token", "--sub", user, *(x for s in scopes for x in ("--scope", s)), "--ttl", "6h")
    if made.returncode != 0:
        raise RuntimeError(made.stderr)
    return made.stdout.strip()


async def reference_transcript(stack: LaunchedStack, token: str) -> str:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=stack.url("gateway"), headers=headers, timeout=180) as http:
        created = await http.post("/v1/jobs", files={"file": (MEETING.name, MEETING.read_bytes())})
        job_id = created.json()["job_id"]
        while (view := (await http.get(f"/v1/jobs/{job_id}")).json())["state"] != "done":
            await asyncio.sleep(0.5)
        return str(view["text"])


def p90_ms(samples_s: list[float]) -> int | None:
    return round(percentile(samples_s, 90) * 1000) if samples_s else None


def report(soak: Soak, outcome: dict[str, str], started: float) -> dict[str, Any]:
    by_kind: dict[str, Counter[int]] = {}
    for answer in soak.answers:
        by_kind.setdefault(answer.kind, Counter())[answer.status] += 1
    statuses = sorted({s for c in by_kind.values() for s in c})
    rows = [["kind", *map(str, statuses)]]
    rows += [[kind, *(str(c[s]) for s in statuses)] for kind, c in sorted(by_kind.items())]
    print(table(rows))
    errors = Counter((a.status, a.code) for a in soak.answers if a.status >= 500)
    undocumented = {k: v for k, v in errors.items() if k not in DOCUMENTED_5XX}
    print(f"5xx: {dict(errors)}; not documented: {dict(undocumented)}")
    unanswered = Counter(f"{a.kind} {a.code}" for a in soak.answers if a.status == 0)
    print(f"no answer at all (the gateway itself down, or a timeout): {dict(unanswered)}")
    cut = sum(1 for a in soak.answers if a.cut)
    no_call = sum(1 for a in soak.answers if a.no_call)
    print(f"streams cut by a kill (an error event, then [DONE]): {cut}; tool answers without a call: {no_call}")
    print(f"jobs: {dict(Counter(outcome.values()))} of {len(outcome)}")
    kills = []
    for kill in soak.kills:
        firsts_before = [
            a.first_token_s
            for a in soak.answers
            if a.first_token_s is not None and kill["killed_at"] - 60 <= a.at < kill["killed_at"]
        ]
        firsts_after = [
            a.first_token_s
            for a in soak.answers
            if a.first_token_s is not None and kill["back_at"] < a.at <= kill["back_at"] + 60
        ]
        kills.append(
            {
                "victim": kill["victim"],
                "at_min": round((kill["killed_at"] - started) / 60, 1),
                "back_s": kill["back_s"],
                "others_untouched": kill["others_untouched"],
                "first_token_p90_ms_before": p90_ms(firsts_before),
                "first_token_p90_ms_after": p90_ms(firsts_after),
            }
        )
    rows = [["kill", "at (min)", "back (s)", "others untouched", "first token p90 before", "after (ms)"]]
    rows += [[k["victim"], str(k["at_min"]), str(k["back_s"]), str(k["others_untouched"]),
              str(k["first_token_p90_ms_before"]), str(k["first_token_p90_ms_after"])] for k in kills]  # fmt: skip
    print(table(rows))
    first, last = soak.memory[0], soak.memory[-1]
    rows = [["process", "RSS start (MB)", "RSS end (MB)", "max (MB)"]]
    for name in (k for k in first if k not in ("at", "launcher")):
        peak = max(m.get(name, 0) for m in soak.memory)
        rows.append([name, str(first[name]), str(last.get(name)), str(peak)])
    print(table(rows))
    print("(each process is restarted once by its kill: its end figure is since that restart)")
    return {
        "statuses": {k: dict(v) for k, v in by_kind.items()},
        "errors": {f"{s} {c}": n for (s, c), n in errors.items()},
        "undocumented_5xx": sum(undocumented.values()),
        "unanswered": dict(unanswered),
        "cut_streams": cut,
        "tool_answers_without_a_call": no_call,
        "jobs": outcome,
        "kills": kills,
        "memory": soak.memory,
    }


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="baton-soak-"))
    stack = LaunchedStack(work / "run")
    stack.env["BATON_RESTART_BACKOFF_S"] = "0.2"
    stack.up()
    try:
        users = [f"user{i}" for i in range(args.users)]
        tokens = {user: mint(stack, user) for user in users}
        print("reference transcript of the meeting, uninterrupted ...", flush=True)
        reference = await reference_transcript(stack, tokens[users[0]])
        started = time.monotonic()
        soak = Soak(stack, tokens, reference, started + args.minutes * 60)
        print(f"soaking for {args.minutes} min: {args.users} users, a kill every {args.kill_every} min", flush=True)
        await asyncio.gather(
            soak.killer(args.kill_every * 60),
            soak.watcher(),
            *(soak.user(user, seed) for seed, user in enumerate(users)),
        )
        soak.memory.append({"at": time.monotonic(), **{k: rss_tree(v) for k, v in soak.pids().items()}})
        outcome = await finish_jobs(soak)
        results = report(soak, outcome, started)
        print(f"saved {save('soak', {'minutes': args.minutes, 'users': args.users, **results})}")
    finally:
        stack.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--kill-every", type=float, default=5, help="minutes between kills")
    parser.add_argument("--users", type=int, default=4)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
