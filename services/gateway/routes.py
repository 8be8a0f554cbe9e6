"""The routing table: which service answers which path, written once, here. The
gateway (services/gateway/app.py) routes by it, natively and in compose; docs/api.md's
list of routes is checked against it (tests/services/gateway/test_gateway.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    path: str
    service: str
    subtree: bool = False
    """Also every path below ``path`` (``/v1/jobs/{id}/events`` under ``/v1/jobs``)."""

    def matches(self, path: str) -> bool:
        return path == self.path or (self.subtree and path.startswith(self.path + "/"))


ROUTES: tuple[Route, ...] = (
    Route("/v1/chat", "llm", subtree=True),
    Route("/chat", "llm", subtree=True),
    Route("/v1/completions", "llm"),
    Route("/v1/responses", "llm"),
    Route("/v1/conversations", "llm", subtree=True),
    Route("/v1/sql", "llm"),
    Route("/query", "llm"),
    Route("/v1/audio", "transcription", subtree=True),
    Route("/v1/jobs", "transcription", subtree=True),
    Route("/v1/speakers", "transcription", subtree=True),
    Route("/v1/embeddings", "rag"),
    Route("/v1/documents", "rag", subtree=True),
    Route("/v1/segments", "rag"),
    Route("/v1/query", "rag"),
    Route("/v1/stats", "rag"),
    Route("/v1/leases", "coordinator", subtree=True),
    Route("/v1/waiters", "coordinator", subtree=True),
    Route("/v1/gpu", "coordinator"),
    Route("/v1/events", "coordinator"),
    Route("/v1/history", "coordinator"),
)

MODELS_FROM = ("llm", "transcription", "rag")
"""Services whose ``GET /v1/models`` the gateway's merges, in this order."""


def service_for(path: str) -> str | None:
    for route in ROUTES:
        if route.matches(path):
            return route.service
    return None
