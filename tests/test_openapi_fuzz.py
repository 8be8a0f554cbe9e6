"""Schemathesis against the services of a stack from the launcher: each operation of
their `/openapi.json`, with valid and invalid input, on a bounded budget, every check
schemathesis has (tests/schemathesis.toml says what differs). No 5xx, and every answer
as the document says (status, content type, headers, body schema)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.launched import LaunchedStack

pytestmark = pytest.mark.slow

EXAMPLES = 12
"""Cases per operation and phase."""
MAX_TIME_S = 75
"""Each service's whole run (fuzzing and stateful testing repeat until it is spent)."""
CONFIG = Path(__file__).with_name("schemathesis.toml")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LaunchedStack]:
    """A stack of its own: what the fuzzer stores and holds must not meet other tests.
    Its LLM answers in seconds (a short context and answer): a valid chat of 8,192
    tokens of random text and 512 tokens of answer took a minute on 2 cores, past the
    request timeout, and the fuzzer tests what is answered, not how fast."""
    stack = LaunchedStack(tmp_path_factory.mktemp("fuzzed") / "run")
    stack.env.update(GEMMA_CONTEXT_SIZE="1024", GEMMA_MAX_TOKENS="16", GEMMA_DEFAULT_MAX_TOKENS="16")
    stack.up()
    yield stack
    stack.down()


def schemathesis(stack: LaunchedStack, service: str, token: str, folder: Path) -> subprocess.Popen[str]:
    """A schemathesis run against one service; what it prints goes to ``folder/out.log``."""
    with (folder / "out.log").open("w") as out:
        return subprocess.Popen(
            [
                str(Path(sys.executable).with_name("schemathesis")),
                "--config-file",
                str(CONFIG),
                "run",
                f"{stack.url(service)}/openapi.json",
                "--header",
                f"Authorization: Bearer {token}",
                "--max-examples",
                str(EXAMPLES),
                "--max-time",
                str(MAX_TIME_S),
                "--generation-deterministic",
                "--request-timeout",
                "60",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={**stack.env, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""},
            cwd=folder,
        )


def finished(process: subprocess.Popen[str], folder: Path) -> None:
    returncode = process.wait(timeout=900)
    assert returncode == 0, (folder / "out.log").read_text(errors="replace")[-8000:]


@pytest.fixture(scope="module")
def token(fuzzed: LaunchedStack) -> str:
    # A service's token: not rate-limited, so the budget goes to the cases, not to 429s.
    minted = fuzzed.baton("token", "--sub", "service:fuzzer", "--ttl", "1h")
    assert minted.returncode == 0, minted.stderr
    return minted.stdout.strip()


@pytest.fixture(scope="module")
def side_runs(
    fuzzed: LaunchedStack, token: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[subprocess.Popen[str], Path]]]:
    """The runs that start together, before the LLM's: RAG's, transcription's and the
    coordinator's, whose cases mostly wait (on leases and their deadlines) and which goes
    on beside the LLM's run too. All four at once cut the LLM's cases to 200 (of about
    2,100), so the LLM's run starts once RAG's and transcription's have ended. Their
    cases mostly wait on I/O, not the CPU: one after another (each beside the
    coordinator) they ran RAG 6,023 and transcription 5,522 cases, the file 238 s; side
    by side 6,514 and 6,494, the LLM 2,825 and the coordinator 160, the file 161 s
    (one run each, 2026-12-07)."""
    runs = {}
    for service in SIDE:
        folder = tmp_path_factory.mktemp(f"fuzz-{service}")
        runs[service] = (schemathesis(fuzzed, service, token, folder), folder)
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:
            process.kill()
            process.wait()


SIDE = ("rag", "transcription", "coordinator")


@pytest.mark.parametrize("service", [*SIDE[:2], "llm", SIDE[2]])
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    fuzzed: LaunchedStack,
    token: str,
    side_runs: dict[str, tuple[subprocess.Popen[str], Path]],
    service: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    if service in side_runs:
        process, folder = side_runs[service]
    else:
        process, folder = schemathesis(fuzzed, service, token, tmp_path), tmp_path
    finished(process, folder)
    record_property(f"measured: schemathesis, {service}", cases(folder))


def cases(folder: Path) -> str:
    """What schemathesis says it ran (its summary's test-case line)."""
    lines = (folder / "out.log").read_text(errors="replace").splitlines()
    found = [line.strip() for line in lines if "test cases" in line.lower() or "generated" in line.lower()]
    return found[-1] if found else "(no count in its output)"
