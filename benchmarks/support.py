"""What every benchmark needs: percentiles, a table, a results file, real servers."""

from __future__ import annotations

import json
import os
import secrets
import statistics
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.servers import RedisServer, ServiceProcess
from harness.speech import long_meeting as long_meeting  # the benchmarks use the tests' recordings

RESULTS = Path(__file__).resolve().parent / "results"
MEETING = Path(__file__).resolve().parents[1] / "baton" / "demo" / "speech" / "meeting.ogg"


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(samples_s: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3) if ms else float("nan"),
    }


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def ratio(a: float, b: float) -> str:
    if not b or b != b or a != a:
        return "n/a"
    return f"{a / b:.2f}x"


def metric(text: str, name: str) -> float:
    """One sample from a Prometheus text page (``llm_reload_seconds_count``, say); 0 if absent."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def save(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def dev_token() -> str:
    """A fresh JWT secret for this run, exported so that every service started from here
    shares it, and a token with every scope."""
    from pydantic import SecretStr

    from shared.auth import SCOPES, TokenIssuer
    from shared.settings import AuthSettings

    secret = secrets.token_urlsafe(48)
    os.environ["JWT_SECRET"] = secret
    return TokenIssuer(AuthSettings(secret=SecretStr(secret))).mint("bench", SCOPES, 3600)


def service_token(name: str) -> str:
    """A token of service ``name``, from the secret ``dev_token`` exported: only services
    hold the GPU, each under its own name."""
    from pydantic import SecretStr

    from shared.auth import TokenIssuer
    from shared.settings import AuthSettings

    issuer = TokenIssuer(AuthSettings(secret=SecretStr(os.environ["JWT_SECRET"])))
    return issuer.mint(f"service:{name}", ("gpu",), 3600)


@contextmanager
def coordinated(work: Path, **settings: str) -> Iterator[tuple[RedisServer, ServiceProcess]]:
    """A real Redis and a coordinator process on it, stopped on exit."""
    redis = RedisServer(work / "redis").start()
    coordinator = ServiceProcess("coordinator", {"COORDINATOR_REDIS_URL": redis.url, **settings}, work)
    try:
        coordinator.start()
        yield redis, coordinator
    finally:
        coordinator.stop()
        redis.stop()
