"""The RAG service's parts, built from its settings: ``build(settings)``. The app (app.py)
is made from them, so a test can build them around a store of its own and serve them
in-process."""

from __future__ import annotations

from dataclasses import dataclass

from services.rag.journal import Busy
from services.rag.settings import RAGSettings
from services.rag.store import MemoryStore
from shared.presets import UnknownModel
from shared.service import Foundation
from shared.settings import ConfigError, load_settings


@dataclass
class Parts:
    settings: RAGSettings
    base: Foundation
    store: MemoryStore

    async def close(self) -> None:
        await self.base.guards.aclose()
        self.store.close()


def build(settings: RAGSettings | None = None, store: MemoryStore | None = None) -> Parts:
    """The service's parts; ``store`` replaces the one its settings name (Chroma and the
    embedding model)."""
    settings = settings or load_settings(RAGSettings)
    base = Foundation.build("rag", settings)
    if store is None:
        try:
            store = MemoryStore.open(settings)
        except (UnknownModel, FileNotFoundError) as exc:
            raise ConfigError(f"RAG_EMBEDDING_MODEL: {exc}") from None
        except Busy as exc:
            raise ConfigError(f"RAG_JOURNAL_PATH: {exc}") from None
    return Parts(settings, base, store)
