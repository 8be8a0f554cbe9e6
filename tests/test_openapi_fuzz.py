"""Schemathesis against the services of a stack from the launcher: each operation of
their `/openapi.json`, with valid and invalid input, on a bounded budget, every check
schemathesis has (tests/schemathesis.toml says what differs). No 5xx, and every answer
as the document says (status, content type, headers, body schema)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
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


@pytest.mark.parametrize("service", ["coordinator", "rag", "transcription", "llm"])
def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    fuzzed: LaunchedStack, service: str, tmp_path: Path
) -> None:
    # A service's token: not rate-limited, so the budget goes to the cases, not to 429s.
    minted = fuzzed.baton("token", "--sub", "service:fuzzer", "--ttl", "1h")
    assert minted.returncode == 0, minted.stderr
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "--config-file",
            str(CONFIG),
            "run",
            f"{fuzzed.url(service)}/openapi.json",
            "--header",
            f"Authorization: Bearer {minted.stdout.strip()}",
            "--max-examples",
            str(EXAMPLES),
            "--max-time",
            str(MAX_TIME_S),
            "--generation-deterministic",
            "--request-timeout",
            "60",
        ],
        capture_output=True,
        text=True,
        env={**fuzzed.env, "NO_COLOR": "1", "SCHEMATHESIS_HOOKS": ""},
        cwd=tmp_path,
        timeout=900,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
