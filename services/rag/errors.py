"""How RAG answers its domain's errors (shared.errors.map_errors, once, in the app)."""

from __future__ import annotations

from services.rag.store import StoreFailed
from shared.errors import ErrorTable, ServiceUnavailable

ERRORS: ErrorTable = {
    StoreFailed: lambda exc: ServiceUnavailable(str(exc), retry_after_s=5, code="store_unavailable"),
}
