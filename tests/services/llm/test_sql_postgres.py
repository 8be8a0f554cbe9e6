"""Text-to-SQL on a real PostgreSQL server: the schema read from its catalog, every
statement in a READ ONLY transaction (even for a role that may write), the
statement_timeout, and the service answering over it."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator

import psycopg
import pytest

from baton.demo.databases import INVENTORY_DDL, build
from harness.apt import Unavailable
from harness.postgres import PostgresServer
from harness.servers import ServiceProcess, free_port
from services.llm.sql.databases import DatabaseUnavailable, PostgresDatabase, QueryFailed, QueryTimeout
from tests.services.llm.conftest import Llm, StartLlm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    try:
        server = PostgresServer().start()
    except Unavailable as exc:
        pytest.skip(str(exc))
    try:
        # The tables belong to "owner", a role that may write them: what keeps the
        # service from writing is its READ ONLY transaction, not the role.
        with psycopg.connect(server.url(), autocommit=True) as admin:
            admin.execute("CREATE ROLE owner LOGIN")
            admin.execute("CREATE DATABASE inventory OWNER owner")
        sqlite_copy = build(tmp_path_factory.mktemp("pg-source"))["inventory"]
        source = sqlite3.connect(sqlite_copy)
        with psycopg.connect(server.url("owner", "inventory")) as owner:
            owner.execute(INVENTORY_DDL)
            for table in ("directories", "bundles", "workspaces"):
                rows = source.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608 (fixed names)
                marks = ", ".join(["%s"] * len(rows[0]))
                with owner.cursor() as cursor:
                    cursor.executemany(f"INSERT INTO {table} VALUES ({marks})", rows)  # noqa: S608 (fixed names)
        source.close()
        yield server
    finally:
        server.stop()


def counts(server: PostgresServer) -> dict[str, int]:
    with psycopg.connect(server.url("owner", "inventory")) as conn:
        return {
            t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]  # type: ignore[index]  # noqa: S608
            for t in ("directories", "bundles", "workspaces")
        }


def test_the_schema_is_read_from_the_catalog(postgres: PostgresServer) -> None:
    schema = PostgresDatabase("inv", postgres.url("owner", "inventory")).schema()
    assert set(schema.tables) == {"directories", "bundles", "workspaces"}
    assert schema.tables["workspaces"].column_names()[:3] == ["workspace_id", "user_name", "state"]
    assert ("workspaces", "bundle_id", "bundles", "bundle_id") in schema.edges()


def test_every_statement_runs_in_a_read_only_transaction(postgres: PostgresServer) -> None:
    database = PostgresDatabase("inv", postgres.url("owner", "inventory"))
    before = counts(postgres)
    for statement in (
        "DELETE FROM workspaces",
        "UPDATE bundles SET monthly_cost = 0",
        "CREATE TABLE stolen (x INT)",
        "INSERT INTO directories VALUES ('d-x', 'x', 'x')",
        "SELECT * INTO copied FROM workspaces",
    ):
        with pytest.raises(QueryFailed, match="read-only transaction"):
            database.run(statement, 10, 5)
    assert counts(postgres) == before
    rows = database.run("SELECT COUNT(*) FROM workspaces WHERE state = 'AVAILABLE'", 10, 5)
    assert rows.columns == ["count"] and rows.rows == [[20]]


def test_a_slow_statement_is_stopped_by_the_statement_timeout(postgres: PostgresServer) -> None:
    database = PostgresDatabase("inv", postgres.url("owner", "inventory"))
    started = time.monotonic()
    with pytest.raises(QueryTimeout, match=r"longer than 0\.3 s"):
        database.run("SELECT pg_sleep(30)", 1, 0.3)
    assert time.monotonic() - started < 20  # stopped, not waited out
    assert database.run("SELECT 1", 1, 5).rows == [[1]]  # the next statement runs as before


def test_an_unreachable_server_names_no_address() -> None:
    port = free_port()
    database = PostgresDatabase("inv", f"postgresql://owner:s3cret-pw@127.0.0.1:{port}/inventory", 1.0)
    with pytest.raises(DatabaseUnavailable) as caught:
        database.schema()
    assert str(caught.value) == "the database inv cannot be reached"


@pytest.fixture(scope="module")
def pg_llm(start_llm: StartLlm, postgres: PostgresServer) -> Llm:
    gone = f"postgresql://owner:s3cret-pw@127.0.0.1:{free_port()}/inventory"
    urls = {"inventory": postgres.url("owner", "inventory"), "gone": gone}
    return start_llm(process=True, sql_databases=json.dumps(urls), sql_timeout_s=2)  # its log is read


def test_the_service_answers_over_postgresql(pg_llm: Llm, postgres: PostgresServer) -> None:
    shown = pg_llm.http.get("/v1/info", headers={"Authorization": f"Bearer {pg_llm.admin}"}).json()
    # Read at start, before any question; the server that is not there, not yet.
    assert {d["name"]: d["tables"] for d in shown["sql_databases"]} == {"inventory": 3, "gone": None}
    before = counts(postgres)
    answer = pg_llm.http.post(
        "/v1/sql", json={"question": "How many workspaces are there?", "database": "inventory", "execute": True}
    )
    assert answer.status_code in (200, 422), answer.text
    if answer.status_code == 200:
        body = answer.json()
        assert body["sql"].startswith("SELECT ") and body["columns"] and body["rows"] is not None
    else:  # valid SQL PostgreSQL refuses (a small model's GROUP BY): its reason, not a 500
        assert answer.json()["error"]["code"] == "query_failed"
    gone = pg_llm.http.post("/v1/sql", json={"question": "How many?", "database": "gone"})
    assert gone.status_code == 503 and gone.json()["error"]["code"] == "database_unavailable"
    assert "127.0.0.1" not in gone.text and "s3cret" not in gone.text
    info = pg_llm.http.get("/v1/info", headers={"Authorization": f"Bearer {pg_llm.admin}"}).json()
    assert {"name": "gone", "kind": "postgresql", "default": False, "tables": None} in info["sql_databases"]
    assert "s3cret" not in json.dumps(info)
    assert isinstance(pg_llm.service, ServiceProcess)
    logged = pg_llm.service.log_path.read_text(errors="replace")
    assert "database unreachable" in logged and "s3cret" not in logged and "@127.0.0.1" not in logged
    assert counts(postgres) == before
