"""Check the memory store against its journal, or rebuild it from the journal.

    python -m services.rag.rebuild --check     # exit 0: the store holds what the journal does
    python -m services.rag.rebuild             # rebuild, then check

Run it where the RAG service runs, with its settings (``RAG_CHROMA_PATH`` or
``RAG_CHROMA_URL``, ``RAG_JOURNAL_PATH``), while the service is stopped: it refuses
to run beside it. With the launcher's defaults, from the repository: ``baton down``,
then ``.venv/bin/python -m services.rag.rebuild``. In compose: ``docker compose stop
rag``, then ``docker compose run --rm rag python -m services.rag.rebuild``.

A rebuild keeps the old data: an embedded store's folder is moved aside to
``<folder>.damaged-<time>``, and a fresh one is filled from the journal. On a Chroma
server every collection is deleted and filled again from the journal. Every record
answered 2xx is in the journal, so nothing stored is lost; records whose write failed
(a 503) are not brought back.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TextIO

from chromadb.api import ClientAPI

from services.rag.journal import Busy, Journal
from services.rag.settings import RAGSettings
from services.rag.store import MemoryStore, MiniLM, open_client
from shared.auth import AuthSettings
from shared.presets import resolve
from shared.settings import ConfigError, load_settings

log = logging.getLogger(__name__)


def problems(client: ClientAPI, journal: Journal, embedder: MiniLM) -> list[str]:
    """What differs between Chroma and the journal; empty when the store is whole."""
    found: list[str] = []
    try:
        stored = {c.name: c for c in client.list_collections()}
    except Exception as exc:  # whatever Chroma raises, the store cannot be read
        return [f"Chroma cannot list its collections ({type(exc).__name__})"]
    expected = journal.collections()
    probe = [list(map(float, embedder(["a check of the index"])[0]))]
    for name in sorted(set(expected) | set(stored)):
        want = expected.get(name, 0)
        if name not in stored:
            found.append(f"{name}: missing ({want} records in the journal)")
            continue
        collection = stored[name]
        try:
            missing = 0
            for batch in journal.records(name):
                keys = [record.key for record in batch]
                missing += len(keys) - len(collection.get(ids=keys, include=[])["ids"])
            count = collection.count()
            if count:
                collection.query(query_embeddings=probe, n_results=1, include=[])  # type: ignore[arg-type]
        except Exception as exc:  # a damaged segment fails here
            found.append(f"{name}: cannot be read ({type(exc).__name__})")
            continue
        if missing:
            found.append(f"{name}: {missing} of {want} records missing")
        extra = count - (want - missing)
        if extra > 0:
            found.append(f"{name}: {extra} records that are not in the journal (their writes failed)")
    return found


def rebuild(settings: RAGSettings, journal: Journal, embedder: MiniLM, out: TextIO = sys.stdout) -> ClientAPI:
    """A fresh store filled from the journal; the old one kept aside (embedded) or emptied (server)."""
    if journal.fact("imported") is None:
        raise ConfigError(
            "the journal was never filled (the RAG service copies its store into it when it starts): "
            "there is nothing to rebuild from"
        )
    if settings.chroma_url is None and settings.chroma_path.exists():
        aside = settings.chroma_path.with_name(f"{settings.chroma_path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        settings.chroma_path.rename(aside)
        out.write(f"the old store is kept at {aside}\n")
    client = open_client(settings)
    if settings.chroma_url is not None:
        for collection in client.list_collections():
            client.delete_collection(collection.name)
    store = MemoryStore(client, embedder, settings, journal)
    for name, count in sorted(journal.collections().items()):
        done = 0
        for batch in journal.records(name):
            store.restore(name, batch)
            done += len(batch)
        out.write(f"{name}: {done} of {count} records restored\n")
    return client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.rag.rebuild", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare the store with its journal")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        # The store's settings only: a rebuild needs no JWT secret.
        settings = load_settings(RAGSettings, auth=AuthSettings.model_construct())
        journal = Journal(settings.journal)
        journal.hold()
    except (ConfigError, Busy) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    try:
        embedder = MiniLM(resolve(settings.embedding_model, "embedding")[0])
        if args.check:
            client: ClientAPI | None = None
            try:
                client = open_client(settings)
            except Exception as exc:  # a store that cannot even be opened
                found = [f"Chroma cannot be opened ({type(exc).__name__})"]
            else:
                found = problems(client, journal, embedder)
        else:
            client = rebuild(settings, journal, embedder)
            found = problems(client, journal, embedder)
        total = sum(journal.collections().values())
    except ConfigError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    finally:
        journal.close()
    where = settings.chroma_url or Path(settings.chroma_path)
    if found:
        sys.stderr.write(f"the store at {where} differs from its journal ({total} records):\n")
        for line in found:
            sys.stderr.write(f"  {line}\n")
        if args.check:
            sys.stderr.write("rebuild it from the journal: python -m services.rag.rebuild (stop the service first)\n")
        return 1
    sys.stdout.write(f"the store at {where} holds every record of its journal ({total} records)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
