"""What the store holds, kept beside it in SQLite: the source of a rebuild.

Every record the RAG service writes to Chroma (a chunk or a segment: its id, text and
metadata) is written here in the same step, and committed only once Chroma accepted
it; a delete removes it here too. So the journal holds exactly what was answered 2xx,
and a damaged Chroma can be rebuilt from it (``python -m services.rag.rebuild``);
the embeddings are computed again, the same as before.

The service holds an exclusive lock on ``<journal>.lock`` while it runs, so a rebuild
cannot run beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    collection TEXT NOT NULL,
    key TEXT NOT NULL,
    document TEXT NOT NULL,
    metadata TEXT NOT NULL,
    PRIMARY KEY (collection, key)
);
CREATE TABLE IF NOT EXISTS facts (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class Busy(Exception):
    """Another process (the running RAG service) holds the journal."""


@dataclass(frozen=True)
class Record:
    key: str
    document: str
    metadata: dict[str, Any]


class Journal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock_file: IO[bytes] | None = None

    def hold(self) -> None:
        """Take the journal for this process alone; Busy if another has it."""
        handle = (self.path.parent / f"{self.path.name}.lock").open("ab")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise Busy(f"{self.path} is held by another process (a RAG service, or a rebuild)") from None
        self._lock_file = handle

    def close(self) -> None:
        self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    @contextlib.contextmanager
    def change(self) -> Iterator[Change]:
        """One atomic change: committed when the block ends normally, else undone."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield Change(self._db)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def fact(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM facts WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def collections(self) -> dict[str, int]:
        """Records per collection."""
        rows = self._db.execute("SELECT collection, count(*) FROM records GROUP BY collection")
        return {str(name): int(count) for name, count in rows}

    def records(self, collection: str, batch: int = 500) -> Iterator[list[Record]]:
        """A collection's records in batches, in key order."""
        after = ""
        while True:
            rows = self._db.execute(
                "SELECT key, document, metadata FROM records WHERE collection = ? AND key > ? ORDER BY key LIMIT ?",
                (collection, after, batch),
            ).fetchall()
            if not rows:
                return
            yield [Record(str(k), str(d), json.loads(m)) for k, d, m in rows]
            after = str(rows[-1][0])


class Change:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def put(self, collection: str, keys: Sequence[str], documents: Sequence[str], metadatas: Sequence[Any]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)",
            [
                (collection, key, document, json.dumps(dict(meta), ensure_ascii=False))
                for key, document, meta in zip(keys, documents, metadatas, strict=True)
            ],
        )

    def remove(self, collection: str, keys: Sequence[str]) -> None:
        self._db.executemany("DELETE FROM records WHERE collection = ? AND key = ?", [(collection, k) for k in keys])

    def set_fact(self, name: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO facts VALUES (?, ?)", (name, value))
