"""Speakers in transcripts: OpenAI's diarized_json with known speakers, speakers in
verbose_json, srt and vtt, and bad input refused before anything is decoded. The app is
built in this process with real workers (tiny.en, CAM++); the bundled meeting has three
espeak-ng voices, and the bundled sentences are clips of the same three voices."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from openai.types.audio import TranscriptionDiarized

from baton.demo.speech.make_speech import MEETING as LINES
from shared.sse_reader import read_json
from tests.services.transcription.conftest import MEETING, SPEECH, silence
from tests.services.transcription.test_routes import App, http, transcribe, tx_app

__all__ = ["http", "tx_app"]

VOICE_OF = {"en-us": "John", "en-us+f3": "Sarah", "en-us+m7": "Tom"}
"""Who each voice of the meeting is, by the sentence clip that is their reference."""
CLIPS = {"John": "sentence-01.ogg", "Sarah": "sentence-02.ogg", "Tom": "sentence-03.ogg"}


def data_url(path: Path, mime: str = "audio/ogg") -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def words(text: str) -> set[str]:
    return set(re.sub(r"[^a-z ]", " ", text.lower()).split())


def speaker_of(text: str) -> str | None:
    """The meeting's speaker of a segment: the one whose line shares most of its words."""
    heard = words(text)
    scores = [(len(heard & words(line)) / max(1, len(heard)), VOICE_OF[voice]) for voice, line in LINES]
    score, name = max(scores)
    return name if score >= 0.6 else None


def agreement(segments: list[dict[str, Any]]) -> float:
    """The share of segments (with a clear line) labelled with their line's speaker."""
    judged = [(speaker_of(s["text"]), s["speaker"]) for s in segments]
    judged = [(want, got) for want, got in judged if want is not None]
    assert len(judged) >= 8
    return sum(want == got for want, got in judged) / len(judged)


@pytest.fixture
async def sdk(tx_app: App) -> AsyncIterator[AsyncOpenAI]:
    transport = httpx.ASGITransport(app=tx_app.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tx/v1", timeout=300) as client:
        # The SDK annotates its client as httpx2's; httpx's has the same interface.
        yield AsyncOpenAI(api_key=tx_app.mint("transcribe"), base_url="http://tx/v1", http_client=client)  # type: ignore[arg-type]


async def test_the_sdk_gets_named_speakers_from_known_references(sdk: AsyncOpenAI) -> None:
    names = list(CLIPS)
    with MEETING.open("rb") as meeting:
        result = await sdk.audio.transcriptions.create(
            model="whisper-1",
            file=meeting,
            response_format="diarized_json",
            known_speaker_names=names,
            known_speaker_references=[data_url(SPEECH / CLIPS[name]) for name in names],
        )
    assert isinstance(result, TranscriptionDiarized)
    segments = [s.model_dump() for s in result.segments]
    assert {s["speaker"] for s in segments} == set(names)
    assert all(s["type"] == "transcript.text.segment" and s["end"] > s["start"] for s in segments)
    assert agreement(segments) >= 0.9
    assert result.usage is not None and result.duration > 60


async def test_without_known_speakers_voices_are_letters_in_order_of_first_speech(http: httpx.AsyncClient) -> None:
    response = await transcribe(http, MEETING, response_format="diarized_json")
    assert response.status_code == 200, response.text
    segments = response.json()["segments"]
    labels = [s["speaker"] for s in segments]
    assert sorted(set(labels)) == ["A", "B", "C"]
    assert [label for i, label in enumerate(labels) if label not in labels[:i]] == ["A", "B", "C"]
    # One letter per voice: relabelled by the meeting's script, it agrees with it.
    letter_of: dict[str, str] = {}
    for segment in segments:
        if (name := speaker_of(segment["text"])) is not None:
            letter_of.setdefault(segment["speaker"], name)
    assert agreement([{**s, "speaker": letter_of.get(s["speaker"])} for s in segments]) >= 0.9


async def test_verbose_json_srt_and_vtt_say_who_spoke_when_asked(http: httpx.AsyncClient) -> None:
    verbose = await transcribe(
        http, MEETING, response_format="verbose_json", diarize="true", **{"timestamp_granularities[]": "word"}
    )
    assert verbose.status_code == 200, verbose.text
    body = verbose.json()
    assert all(s["speaker"] in {"A", "B", "C"} for s in body["segments"])
    assert body["words"] and all(w["speaker"] in {"A", "B", "C"} for w in body["words"])
    for segment in body["segments"]:  # a segment's words are inside it, in order
        inside = [
            w for w in body["words"] if segment["start"] - 0.01 <= w["start"] and w["end"] <= segment["end"] + 0.01
        ]
        assert inside and all(a["start"] <= b["start"] for a, b in itertools.pairwise(inside))
    vtt = await transcribe(http, SPEECH / "sentence-02.ogg", response_format="vtt", diarize="true")
    assert "<v A>" in vtt.text
    srt = await transcribe(http, SPEECH / "sentence-02.ogg", response_format="srt", diarize="true")
    assert "[A] " in srt.text
    plain = await transcribe(http, SPEECH / "sentence-02.ogg", response_format="verbose_json")
    assert "speaker" not in plain.json()["segments"][0]


@pytest.mark.parametrize(
    ("form", "param"),
    [
        ({"known_speaker_names[]": ["A", "B"], "known_speaker_references[]": ["x"]}, "known_speaker_names"),
        (
            {"known_speaker_names[]": [f"n{i}" for i in range(5)], "known_speaker_references[]": ["x"] * 5},
            "known_speaker_names",
        ),
        (
            {"known_speaker_names[]": ["A"], "known_speaker_references[]": ["not a data url"]},
            "known_speaker_references",
        ),
        (
            {"known_speaker_names[]": ["A"], "known_speaker_references[]": ["data:text/plain;base64,aGVsbG8="]},
            "known_speaker_references",
        ),
        (
            {"known_speaker_names[]": ["A"], "known_speaker_references[]": ["data:audio/wav;base64,aGVsbG8="]},
            "known_speaker_references",
        ),
        ({"known_speaker_names[]": ["A", "A"], "known_speaker_references[]": ["x", "x"]}, "known_speaker_names"),
    ],
)
async def test_bad_known_speakers_are_refused_before_the_upload_is_decoded(
    http: httpx.AsyncClient, tmp_path: Path, form: dict[str, Any], param: str
) -> None:
    # The upload is not audio: had it been decoded first, the answer would name "file".
    not_audio = tmp_path / "upload.ogg"
    not_audio.write_bytes(b"not audio at all")
    response = await transcribe(http, not_audio, response_format="diarized_json", **form)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("seconds", [1.0, 11.0])
async def test_a_reference_under_two_or_over_ten_seconds_is_refused(
    http: httpx.AsyncClient, tmp_path: Path, seconds: float
) -> None:
    clip = silence(tmp_path / "clip.ogg", seconds)
    response = await transcribe(
        http,
        SPEECH / "sentence-01.ogg",
        response_format="diarized_json",
        **{"known_speaker_names[]": ["A"], "known_speaker_references[]": [data_url(clip)]},
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "known_speaker_references"
    assert (
        "2 to 10 s" in response.json()["error"]["message"] or "longer than 10 s" in response.json()["error"]["message"]
    )


async def test_speaker_fields_that_would_be_ignored_are_refused(http: httpx.AsyncClient) -> None:
    clip = SPEECH / "sentence-01.ogg"
    diarize_json = await transcribe(http, clip, response_format="json", diarize="true")
    assert diarize_json.status_code == 400 and diarize_json.json()["error"]["param"] == "diarize"
    names_alone = await transcribe(
        http, clip, **{"known_speaker_names[]": ["A"], "known_speaker_references[]": [data_url(clip)]}
    )
    assert names_alone.status_code == 400 and names_alone.json()["error"]["param"] == "known_speaker_names"


async def submit(http: httpx.AsyncClient, path: Path, **form: Any) -> str:
    files = {"file": (path.name, await asyncio.to_thread(path.read_bytes))}
    response = await http.post("/v1/jobs", files=files, data=form)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


async def finished(http: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    events = await http.get(f"/v1/jobs/{job_id}/events")  # the stream, read to its end
    assert events.text.rstrip().endswith("data: [DONE]")
    job: dict[str, Any] = (await http.get(f"/v1/jobs/{job_id}")).json()
    assert job["state"] == "done", job
    return job


async def test_a_job_labels_speakers_with_word_timestamps_inside_its_segments(
    tx_app: App, http: httpx.AsyncClient
) -> None:
    job = await finished(http, await submit(http, MEETING, **{"timestamp_granularities[]": "word"}))
    assert job["diarize"] is True and job["speakers"] == ["A", "B", "C"]  # diarized by default
    segments = job["segments"]
    assert [s["speaker"] for s in segments][:1] == ["A"]
    letter_of: dict[str, str] = {}
    for segment in segments:
        if (name := speaker_of(segment["text"])) is not None:
            letter_of.setdefault(segment["speaker"], name)
    assert agreement([{**s, "speaker": letter_of.get(s["speaker"])} for s in segments]) >= 0.9
    for segment in segments:
        spoken = segment["words"]
        assert spoken and all(w["speaker"] == segment["speaker"] for w in spoken)
        assert all(segment["start"] - 0.01 <= w["start"] <= w["end"] <= segment["end"] + 0.01 for w in spoken)
        assert all(a["end"] <= b["start"] + 0.01 for a, b in itertools.pairwise(spoken))
    plain = await finished(http, await submit(http, SPEECH / "sentence-01.ogg", diarize="false"))
    assert plain["diarize"] is False and "speaker" not in plain["segments"][0] and "words" not in plain["segments"][0]


async def test_a_job_whose_worker_is_killed_mid_way_resumes_and_labels_identically(
    tx_app: App, http: httpx.AsyncClient
) -> None:
    recording = MEETING  # 72 s: three decode windows
    whole = await finished(http, await submit(http, recording))
    parts = tx_app.app.state.parts
    job_id = await submit(http, recording)
    async with parts.runner.events.subscribe(job_id) as events:
        while (event := await asyncio.wait_for(events.get(), 120)) is not None and event["type"] != "progress":
            pass
    for worker in list(parts.pool.workers):  # mid-way: at least one window stored, more to come
        os.kill(worker.pid, signal.SIGKILL)
    resumed = await finished(http, job_id)
    assert 0 < len([s for s in whole["segments"] if s["start"] < 30]) < len(whole["segments"])
    fields = ("id", "start", "end", "text", "speaker")
    assert [[s[f] for f in fields] for s in resumed["segments"]] == [[s[f] for f in fields] for s in whole["segments"]]
    assert resumed["speakers"] == whole["speakers"] == ["A", "B", "C"]


async def enrol(client: httpx.AsyncClient, name: str, *clips: Path) -> httpx.Response:
    files = [("file", (clip.name, await asyncio.to_thread(clip.read_bytes))) for clip in clips]
    return await client.post("/v1/speakers", data={"name": name}, files=files)


async def test_enrolled_voices_label_jobs_and_uploads_by_name_and_stay_their_owners(tx_app: App) -> None:
    owner_client, other_client = (
        tx_app.client("transcribe", sub="enroller"),
        tx_app.client("transcribe", sub="stranger"),
    )
    async with owner_client as owner, other_client as other:
        enrolled = {}
        for name, clip in CLIPS.items():
            response = await enrol(owner, name, SPEECH / clip)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["name"] == name and body["samples"] == 1 and "vector" not in body
            enrolled[name] = body["id"]
        listed = (await owner.get("/v1/speakers")).json()
        assert [v["name"] for v in listed["data"]] == list(CLIPS)
        # Another owner sees none of them, cannot delete one, and is not labelled by them.
        assert (await other.get("/v1/speakers")).json()["data"] == []
        assert (await other.delete(f"/v1/speakers/{enrolled['John']}")).status_code == 404
        theirs = await finished(other, await submit(other, MEETING))
        assert set(theirs["speakers"]) == {"A", "B", "C"}

        job_id = await submit(owner, MEETING)
        async with tx_app.app.state.parts.runner.events.subscribe(job_id) as events:  # long before it ends
            while (event := await asyncio.wait_for(events.get(), 120)) is not None and event["type"] != "indexed":
                pass
        job = await finished(owner, job_id)
        assert job["indexed"] and set(job["speakers"]) == set(CLIPS)
        assert agreement(job["segments"]) >= 0.9
        upload = await transcribe(owner, MEETING, response_format="diarized_json")
        assert agreement(upload.json()["segments"]) >= 0.9

        # Its memories carry the names too.
        sent = next(b for b in tx_app.indexed.bodies if b["job_id"] == job["job_id"])
        assert {s["speaker"] for s in sent["segments"]} == set(CLIPS)

        assert (await owner.delete(f"/v1/speakers/{enrolled['Tom']}")).status_code == 204
        assert [v["name"] for v in (await owner.get("/v1/speakers")).json()["data"]] == ["John", "Sarah"]
        for name in ("John", "Sarah"):
            assert (await owner.delete(f"/v1/speakers/{enrolled[name]}")).status_code == 204


async def test_a_bad_enrolment_is_refused(http: httpx.AsyncClient, tmp_path: Path) -> None:
    short = silence(tmp_path / "short.ogg", 1.0)
    assert (await enrol(http, "Ann", short)).json()["error"]["param"] == "file"
    assert (await enrol(http, "Ann", *[SPEECH / "sentence-01.ogg"] * 5)).status_code == 400
    not_audio = tmp_path / "x.ogg"
    not_audio.write_bytes(b"nope")
    refused = await enrol(http, "Ann", not_audio)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "file"
    assert (await enrol(http, " ", SPEECH / "sentence-01.ogg")).status_code == 400


async def test_naming_a_jobs_speakers_afterwards_renames_its_transcript_memories_and_can_enrol(tx_app: App) -> None:
    async with tx_app.client("transcribe", sub="namer") as owner, tx_app.client("transcribe", sub="nosy") as nosy:
        tx_app.indexed.down = True  # RAG down: the transcript waits to be written into memories
        try:
            job_id = await submit(owner, MEETING)
            refused = await owner.patch(f"/v1/jobs/{job_id}/speakers", json={"A": "John"})
            assert refused.status_code == 409  # while it runs, or while its memories are written
            job = await finished(owner, job_id)
            # Named while its memories are being written, they would be written with the old labels.
            writing = await owner.patch(f"/v1/jobs/{job_id}/speakers", json={job["segments"][0]["speaker"]: "John"})
            assert writing.status_code == 409 and writing.json()["error"]["code"] == "job_indexing", writing.text
            async with tx_app.app.state.parts.runner.events.subscribe(job_id) as events:
                tx_app.indexed.down = False
                while (event := await asyncio.wait_for(events.get(), 120)) is not None and event["type"] != "indexed":
                    pass
        finally:
            tx_app.indexed.down = False
        job = await finished(owner, job_id)
        first = job["segments"][0]["speaker"]
        assert (await nosy.patch(f"/v1/jobs/{job_id}/speakers", json={first: "Eve"})).status_code == 404
        assert (await owner.patch(f"/v1/jobs/{job_id}/speakers", json={"Z": "Zed"})).status_code == 400
        assert (await owner.patch(f"/v1/jobs/{job_id}/speakers", json={first: ""})).status_code == 400

        async with tx_app.app.state.parts.runner.events.subscribe(job_id) as events:
            named = await owner.patch(f"/v1/jobs/{job_id}/speakers?enrol=true", json={first: "Chair"})
            assert named.status_code == 200, named.text
            while (event := await asyncio.wait_for(events.get(), 120)) is not None and event["type"] != "indexed":
                pass
        renamed = named.json()
        assert "Chair" in renamed["speakers"] and first not in renamed["speakers"]
        assert [s["speaker"] for s in renamed["segments"]] == [
            "Chair" if s["speaker"] == first else s["speaker"] for s in job["segments"]
        ]
        # The memories were written again, with the name, after the old ones were removed.
        assert job_id in tx_app.indexed.deleted
        again = [b for b in tx_app.indexed.bodies if b["job_id"] == job_id][-1]
        assert "Chair" in {s["speaker"] for s in again["segments"]}
        # And the voice is enrolled: the next recording of it is labelled by the name.
        assert [v["name"] for v in (await owner.get("/v1/speakers")).json()["data"]] == ["Chair"]
        upload = await transcribe(owner, SPEECH / "sentence-01.ogg", response_format="diarized_json")
        assert {s["speaker"] for s in upload.json()["segments"]} == {"Chair"}


async def test_a_diarized_stream_sends_whole_segments_with_their_speakers(http: httpx.AsyncClient) -> None:
    response = await transcribe(http, SPEECH / "sentence-02.ogg", response_format="diarized_json", stream="true")
    assert response.status_code == 200 and response.text.rstrip().endswith("data: [DONE]")
    events = list(read_json(response.text.splitlines()))
    segments = [e for e in events if e["type"] == "transcript.text.segment"]
    assert segments and all(e["speaker"] == "A" and e["id"].startswith("seg_") for e in segments)
    assert events[-1]["type"] == "transcript.text.done" and "finance" in events[-1]["text"]
