"""JSON log lines carry the service and request id; secrets never reach them."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from harness.servers import UvicornThread
from shared.auth import TokenVerifier
from shared.logs import JsonFormatter, request_id_var
from shared.metrics import Metrics
from shared.settings import AuthSettings
from shared.web import Auth, create_service_app
from tests.conftest import Mint


def test_a_record_is_one_json_object_with_structured_fields() -> None:
    record = logging.makeLogRecord(
        {
            "name": "lease",
            "levelname": "INFO",
            "msg": "granted %s",
            "args": ("now",),
            "fence": 42,
            "token": "eyJ.secret",
        }
    )
    token = request_id_var.set("req-1")
    try:
        line = json.loads(JsonFormatter("coordinator").format(record))
    finally:
        request_id_var.reset(token)
    assert line["service"] == "coordinator"
    assert line["msg"] == "granted now"
    assert line["request_id"] == "req-1"
    assert line["fence"] == 42
    assert line["token"] == "[redacted]"


@pytest.fixture
def access_lines() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("logtest"))
    logger = logging.getLogger("baton.access")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(previous)


def test_access_log_has_the_request_id_and_no_credentials(
    auth_settings: AuthSettings, mint: Mint, access_lines: io.StringIO
) -> None:
    app = create_service_app(
        name="logtest", auth=Auth(TokenVerifier(auth_settings)), metrics=Metrics("logtest"), max_body_bytes=1024
    )
    token = mint()
    with UvicornThread(app) as server:
        response = httpx.get(
            f"{server.url}/v1/info?x=1", headers={"Authorization": f"Bearer {token}", "X-Request-ID": "rid-7"}
        )
        assert httpx.get(f"{server.url}/v1/info").status_code == 401
    assert response.status_code == 200
    lines = [json.loads(line) for line in access_lines.getvalue().splitlines()]
    entry = next(line for line in lines if line.get("request_id") == "rid-7")
    assert entry["path"] == "/v1/info"
    assert entry["status"] == 200
    assert entry["level"] == "debug"  # successes at debug, failures at info and above
    assert token not in access_lines.getvalue()
    assert "x=1" not in access_lines.getvalue()
    refused = next(line for line in lines if line.get("status") == 401)
    assert refused["level"] == "info"
