"""Every route of the transcription service, through its app built from parts in this
process (``build`` then ``create_app``, over httpx's ASGITransport): real faster-whisper
workers with tiny.en and a real Redis; the card granted at once (no coordinator), and
the RAG service a stand-in that keeps what it was sent. Hand-overs, kills and restarts
stay in test_transcription.py and test_handover.py, which need processes."""

from __future__ import annotations

import asyncio
import json
import math
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai.types.audio import Transcription, TranscriptionSegment, TranscriptionVerbose
from openai.types.audio.transcription import UsageDuration
from pydantic import TypeAdapter

from harness.routes import misanswered, walk
from harness.servers import RedisServer
from services.transcription.app import create_app
from services.transcription.parts import build
from services.transcription.schemas import JobEvent, TranscriptDelta, TranscriptDone
from services.transcription.settings import TranscriptionSettings
from shared.auth import ON_BEHALF_OF, SCOPES
from shared.openapi import honest_openapi
from shared.settings import AuthSettings
from shared.sse_reader import read_json
from tests.conftest import Mint
from tests.services.transcription.conftest import MEETING, SPEECH, silence


class Indexed:
    """The RAG service's stand-in: what it was sent, answered 200 (and transcripts
    deleted, 204); 503 while ``down``."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.for_whom: list[str | None] = []
        self.deleted: list[str] = []
        self.down = False

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            return httpx.Response(503, json={"error": {"message": "down", "type": "server_error"}})
        if request.method == "DELETE" and request.url.path.startswith("/v1/documents/"):
            self.deleted.append(request.url.path.rsplit("/", 1)[1])
            return httpx.Response(204)
        assert request.url.path == "/v1/segments"
        self.bodies.append(json.loads(request.content))
        self.for_whom.append(request.headers.get(ON_BEHALF_OF))
        return httpx.Response(200, json={"stored": len(self.bodies[-1]["segments"])})


class App:
    def __init__(self, app: Any, mint: Mint, indexed: Indexed) -> None:
        self.app = app
        self.mint = mint
        self.indexed = indexed

    def client(self, *scopes: str, sub: str = "tester") -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.mint(*scopes, sub=sub)}"} if scopes else {}
        transport = httpx.ASGITransport(app=self.app)
        return httpx.AsyncClient(transport=transport, base_url="http://tx", headers=headers, timeout=120)


@pytest.fixture(scope="module")
async def tx_app(
    redis_server: RedisServer, auth_settings: AuthSettings, mint: Mint, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[App]:
    settings = TranscriptionSettings(
        auth=auth_settings,
        redis_url=redis_server.url,
        key_prefix=f"tx-{secrets.token_hex(4)}:",
        data_dir=tmp_path_factory.mktemp("tx-data"),
        coordinate=False,
        max_upload_mb=1,
        max_duration_s=100,
        index_retry_max_s=1,
    )
    indexed = Indexed()
    app = create_app(build(settings, rag_transport=httpx.MockTransport(indexed)))
    async with app.router.lifespan_context(app):
        yield App(app, mint, indexed)


@pytest.fixture
async def http(tx_app: App) -> AsyncIterator[httpx.AsyncClient]:
    async with tx_app.client("transcribe") as client:
        yield client


async def transcribe(http: httpx.AsyncClient, path: Path, **form: Any) -> httpx.Response:
    files = {"file": (path.name, await asyncio.to_thread(path.read_bytes))}
    return await http.post("/v1/audio/transcriptions", files=files, data={"model": "whisper-1", **form})


async def test_the_models_and_the_ops_routes(tx_app: App, http: httpx.AsyncClient) -> None:
    models = (await http.get("/v1/models")).json()
    assert [m["id"] for m in models["data"]] == ["whisper-tiny.en", "whisper-1"]
    assert models["data"][0]["created"] > 1_600_000_000  # the model files' time, not 0
    alias = (await http.get("/v1/models/whisper-1")).json()
    assert alias["id"] == "whisper-1" and alias["created"] == models["data"][0]["created"]
    missing = await http.get("/v1/models/whisper-9")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert (await http.get("/health")).json()["status"] == "ok"
    assert (await http.get("/ready")).json() == {"status": "ready", "service": "transcription", "redis": "ok",
                                                 "model": "whisper-tiny.en"}  # fmt: skip
    async with tx_app.client("admin") as admin:
        assert "transcription_jobs" in (await admin.get("/metrics")).text
        document = (await admin.get("/openapi.json")).json()
    assert {"/v1/audio/transcriptions", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/events"} <= set(
        document["paths"]
    )
    language = document["components"]["schemas"]["Body_create_job_v1_jobs_post"]["properties"]["language"]
    assert language["enum"] == ["", "en"]  # tiny.en: English, or detect
    assert (await http.get("/metrics")).status_code == 403
    async with tx_app.client() as nobody:
        assert (await nobody.get("/v1/models")).status_code == 401


async def test_info_and_scopes(tx_app: App, http: httpx.AsyncClient) -> None:
    shown = (await http.get("/v1/info")).json()
    assert set(shown) == {"service", "version", "model", "limits"} and shown["model"] == "whisper-tiny.en"
    async with tx_app.client("admin") as admin:
        info = (await admin.get("/v1/info")).json()
    assert info["model"] == "whisper-tiny.en" and info["chunk_length_s"] == 30 and info["workers"] == 2
    async with tx_app.client("chat") as chat_only:
        assert (await chat_only.get("/v1/jobs")).status_code == 403
        assert (await transcribe(chat_only, SPEECH / "sentence-01.ogg")).status_code == 403


@pytest.mark.parametrize("response_format", ["json", "text", "srt", "vtt", "verbose_json"])
async def test_response_formats(http: httpx.AsyncClient, response_format: str) -> None:
    response = await transcribe(
        http,
        SPEECH / "sentence-03.ogg",
        response_format=response_format,
        **({"timestamp_granularities[]": "word"} if response_format == "verbose_json" else {}),
    )
    assert response.status_code == 200, response.text
    if response_format == "json":
        assert "kitchen" in response.json()["text"]
        usage = Transcription.model_validate(response.json()).usage
        assert isinstance(usage, UsageDuration) and usage.type == "duration" and usage.seconds > 3
    elif response_format == "text":
        assert "kitchen" in response.text
    elif response_format == "srt":
        assert response.text.startswith("1\n00:00:0") and " --> " in response.text
    elif response_format == "vtt":
        assert response.text.startswith("WEBVTT\n\n00:00:0")
    else:
        body = response.json()
        assert body["language"] == "en" and body["duration"] > 3
        assert body["segments"][0]["end"] > body["segments"][0]["start"]
        assert any(w["word"].strip().lower().startswith("kitchen") for w in body["words"])
        assert body["usage"] == {"type": "duration", "seconds": math.ceil(body["duration"])}
        # Every field of OpenAI's segment, typed as its SDK types them, from faster-whisper's own values.
        parsed = TranscriptionVerbose.model_validate(body)
        for segment in body["segments"]:
            assert set(segment) == set(TranscriptionSegment.model_fields)
            assert TranscriptionSegment.model_validate(segment, strict=True).tokens
            assert segment["compression_ratio"] > 0 and segment["temperature"] == 0.0
        assert parsed.segments and parsed.segments[0].tokens == body["segments"][0]["tokens"]


async def test_a_stream_sends_each_segment_then_the_whole_text(http: httpx.AsyncClient) -> None:
    files = {"file": ("sentence-03.ogg", (SPEECH / "sentence-03.ogg").read_bytes())}
    response = await http.post("/v1/audio/transcriptions", files=files, data={"model": "whisper-1", "stream": "true"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.text.rstrip().endswith("data: [DONE]")
    events = list(read_json(response.text.splitlines()))
    as_documented = TypeAdapter(TranscriptDelta | TranscriptDone)
    for event in events:
        as_documented.validate_python(event)
    deltas, done = events[:-1], events[-1]
    assert deltas and all(e["type"] == "transcript.text.delta" for e in deltas)
    assert done["type"] == "transcript.text.done" and "kitchen" in done["text"]
    assert done["text"] == "".join(e["delta"] for e in deltas).strip()
    assert done["usage"]["type"] == "duration" and done["usage"]["seconds"] > 3


async def test_silence_gives_empty_text(http: httpx.AsyncClient, tmp_path: Path) -> None:
    response = await transcribe(http, silence(tmp_path / "quiet.ogg", 5))
    assert response.status_code == 200
    assert response.json()["text"] == ""


@pytest.mark.parametrize(
    ("content", "name", "form", "status", "code"),
    [
        (b"hello, this is not audio at all " * 50, "notes.wav", {}, 400, "invalid_audio"),
        (bytes(range(256)) * 40, "song.mp3", {}, 400, "invalid_audio"),
        (b"", "empty.ogg", {}, 400, "invalid_audio"),
        (b"x" * (1024 * 1024 + 10), "big.wav", {}, 413, "payload_too_large"),
        (None, "sentence-01.ogg", {"language": "xx"}, 400, "invalid_language"),
        (None, "sentence-01.ogg", {"language": "fr"}, 400, "invalid_language"),
        (None, "sentence-01.ogg", {"response_format": "pdf"}, 400, None),
        (None, "sentence-01.ogg", {"model": "gpt-9-audio"}, 404, "model_not_found"),
        (None, "sentence-01.ogg", {"temperature": "3"}, 400, None),
    ],
)
async def test_bad_input(
    http: httpx.AsyncClient, content: bytes | None, name: str, form: dict[str, str], status: int, code: str | None
) -> None:
    data = content if content is not None else (SPEECH / name).read_bytes()
    for endpoint, fields in (("/v1/audio/transcriptions", {"model": "whisper-1", **form}), ("/v1/jobs", form)):
        if endpoint == "/v1/jobs" and set(form) & {"model", "response_format", "temperature"}:
            continue
        response = await http.post(endpoint, files={"file": (name, data)}, data=fields)
        assert response.status_code == status, (endpoint, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        if code:
            assert error["code"] == code
        if code == "invalid_audio" and content:
            assert "Supported formats: flac" in error["message"]


async def test_audio_longer_than_the_limit_is_413(http: httpx.AsyncClient, tmp_path: Path) -> None:
    response = await transcribe(http, silence(tmp_path / "long.ogg", 110))
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "audio_too_long"


def _multipart(filename: bytes, content: bytes, **fields: str) -> tuple[bytes, dict[str, str]]:
    """A form upload built by hand, with the file name's bytes as given (httpx would
    percent-encode a NUL; curl and hostile clients do not)."""
    parts = [
        b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="' + filename + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n"
    ]
    for name, value in fields.items():
        parts.append(f'--b0undary\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    return b"".join(parts) + b"--b0undary--\r\n", {"Content-Type": "multipart/form-data; boundary=b0undary"}


async def test_a_file_name_with_a_nul_byte_is_cleaned_not_a_500(http: httpx.AsyncClient) -> None:
    audio_bytes = (SPEECH / "sentence-01.ogg").read_bytes()
    body, headers = _multipart(b"x.\x00", audio_bytes, model="whisper-1")
    spoken = await http.post("/v1/audio/transcriptions", content=body, headers=headers)
    assert spoken.status_code == 200, spoken.text
    body, headers = _multipart(b"x.\x00", audio_bytes)
    queued = await http.post("/v1/jobs", content=body, headers=headers)
    assert queued.status_code == 202, queued.text
    assert (await http.get(f"/v1/jobs/{queued.json()['job_id']}")).json()["file"] == "x."


async def test_a_job_from_upload_to_index_is_its_owners_alone(tx_app: App, http: httpx.AsyncClient) -> None:
    files = {"file": ("meeting.ogg", MEETING.read_bytes())}
    created = await http.post("/v1/jobs", files=files, data={"recorded_at": "2026-12-01T10:00:00Z"})
    assert created.status_code == 202, created.text
    job_id = created.json()["job_id"]
    assert created.json()["state"] in ("queued", "running") and created.json()["duration"] > 30

    # Its events: a snapshot, progress, the end; then the transcript indexed for its owner.
    events = await http.get(f"/v1/jobs/{job_id}/events")
    assert events.status_code == 200 and events.text.rstrip().endswith("data: [DONE]")
    seen = list(read_json(events.text.splitlines()))
    as_documented = TypeAdapter(JobEvent)
    for event in seen:
        as_documented.validate_python(event)
    assert seen[0]["type"] == "snapshot" and seen[-1]["state"] == "done"
    done = (await http.get(f"/v1/jobs/{job_id}")).json()
    assert done["state"] == "done" and done["progress"] == 1 and "deadline" in done["text"].lower()
    listed = (await http.get("/v1/jobs", params={"limit": 200})).json()["jobs"]
    assert job_id in [job["job_id"] for job in listed] and "text" not in listed[0]
    cancelled = await http.delete(f"/v1/jobs/{job_id}")  # finished: nothing to cancel, it says so
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "done"

    # Another user finds nothing of it; an admin reads it.
    async with tx_app.client("transcribe", sub="mallory") as mallory:
        for method, path in (("GET", f"/v1/jobs/{job_id}"), ("GET", f"/v1/jobs/{job_id}/events"),
                             ("DELETE", f"/v1/jobs/{job_id}")):  # fmt: skip
            assert (await mallory.request(method, path)).status_code == 404
        assert job_id not in [job["job_id"] for job in (await mallory.get("/v1/jobs")).json()["jobs"]]
    async with tx_app.client("transcribe", "admin", sub="ops") as admin:
        assert (await admin.get(f"/v1/jobs/{job_id}")).json()["owner"] == "tester"

    async with asyncio.timeout(60):  # indexing follows the end, retried until RAG takes it
        while not (await http.get(f"/v1/jobs/{job_id}")).json()["indexed"]:
            await asyncio.sleep(0.05)
    sent = [body for body in tx_app.indexed.bodies if body["job_id"] == job_id]
    assert len(sent) == 1 and sent[0]["source"] == "meeting.ogg" and sent[0]["recorded_at"].startswith("2026-12-01")
    assert tx_app.indexed.for_whom[tx_app.indexed.bodies.index(sent[0])] == "tester"
    assert " ".join(s["text"] for s in sent[0]["segments"]).split() == done["text"].split()


async def test_every_route_answers_in_process_as_documented(tx_app: App) -> None:
    """Each operation of /openapi.json asked once with the least a client sends (an empty
    body, ``x`` for an id), with every scope: no 5xx, no 405, each status documented."""
    document = honest_openapi(tx_app.app)
    async with tx_app.client(*SCOPES) as http:
        answers = await walk(http, document)
    assert misanswered(answers, document) == []
    assert len(answers) >= 15
