"""A store damaged on purpose: /ready says so; reads and writes answer 503 in the envelope."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import Mint
from tests.support.servers import ServiceProcess

pytestmark = pytest.mark.slow


def test_a_damaged_store_is_not_ready_and_writes_get_503(tmp_path: Path, log_dir: Path, mint: Mint) -> None:
    store = tmp_path / "chroma"
    service = ServiceProcess("rag", {"RAG_CHROMA_PATH": str(store)}, log_dir).start()
    try:
        token = mint("rag:read", "rag:write", sub="alice")
        with httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
            assert http.post("/v1/documents", json={"documents": [{"text": "kept safe"}]}).status_code == 200
            assert http.get("/ready").status_code == 200
            database = store / "chroma.sqlite3"
            with database.open("r+b") as raw:  # the SQLite header, overwritten
                raw.write(b"this is no longer a database....." * 4)
            assert http.get("/ready").status_code == 503
            write = http.post("/v1/documents", json={"documents": [{"text": "after the damage"}]})
            assert write.status_code == 503, write.text
            assert write.json()["error"]["code"] == "store_unavailable" and "Retry-After" in write.headers
            assert str(store) not in write.text
            for read in (http.get("/v1/stats"), http.post("/v1/query", json={"query": "kept"})):
                assert read.status_code == 503, read.text
    finally:
        service.stop()
