"""Secrets have no default, placeholders are refused, *_FILE works, errors name the variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.servers import REPO_ROOT
from services.llm.settings import LLMSettings
from shared.auth import TokenVerifier
from shared.settings import AuthSettings, ConfigError, load_settings


def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("JWT_", "GEMMA_", "GPU_COORDINATOR", "RAG_SERVICE")):
            monkeypatch.delenv(key)


def test_missing_secret_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env(monkeypatch)
    with pytest.raises(ConfigError, match=r"JWT_SECRET is not set.*JWT_SECRET_FILE"):
        TokenVerifier(load_settings(AuthSettings))


@pytest.mark.parametrize("value", ["changeme", "CHANGE-ME", "your-secret-here", "secret", "<secret>", "${JWT_SECRET}"])
def test_placeholders_are_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    clean_env(monkeypatch)
    monkeypatch.setenv("JWT_SECRET", value)
    with pytest.raises(ConfigError, match="JWT_SECRET: is a placeholder"):
        load_settings(AuthSettings)


def test_short_secret_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env(monkeypatch)
    monkeypatch.setenv("JWT_SECRET", "only-twenty-bytes-xx")
    with pytest.raises(ConfigError, match="JWT_SECRET: is shorter than 32 bytes"):
        load_settings(AuthSettings)


def test_file_variant(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env(monkeypatch)
    secret = tmp_path / "jwt"
    secret.write_text("f" * 40 + "\n")
    monkeypatch.setenv("JWT_SECRET_FILE", str(secret))
    settings = load_settings(AuthSettings)
    assert settings.secret is not None and settings.secret.get_secret_value() == "f" * 40
    assert "f" * 40 not in repr(settings)


def test_unreadable_file_variant_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env(monkeypatch)
    monkeypatch.setenv("JWT_SECRET_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="JWT_SECRET_FILE"):
        load_settings(AuthSettings)


def test_the_seed_variable_names_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env(monkeypatch)
    monkeypatch.setenv("JWT_SECRET", "s" * 40)
    monkeypatch.setenv("GEMMA_MODEL_PATH", "/models/gemma.gguf")
    monkeypatch.setenv("GEMMA_GPU_LAYERS", "30")
    monkeypatch.setenv("GPU_COORDINATOR_URL", "http://coordinator:8002")
    monkeypatch.setenv("RAG_SERVICE_URL", "http://rag:8004")
    monkeypatch.setenv("JWT_ONLY", "true")
    settings = load_settings(LLMSettings)
    assert settings.model_path == "/models/gemma.gguf"
    assert settings.gpu_layers == 30
    assert settings.coordinator_url == "http://coordinator:8002"
    assert settings.rag_url == "http://rag:8004"
    assert settings.auth.only is True
    monkeypatch.delenv("GEMMA_GPU_LAYERS")
    defaults = LLMSettings(auth=settings.auth)
    assert (defaults.gpu_layers, defaults.context_size, defaults.batch_size) == (25, 65536, 512)


def test_bad_values_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    clean_env(monkeypatch)
    monkeypatch.setenv("GEMMA_BATCH_SIZE", "zero")
    with pytest.raises(ConfigError, match="GEMMA_BATCH_SIZE"):
        load_settings(LLMSettings)


@pytest.mark.slow  # starts each service's process
@pytest.mark.parametrize("service", ["coordinator", "rag", "llm", "transcription"])
@pytest.mark.parametrize("secret", [None, "changeme"])
def test_services_refuse_to_start_without_a_real_secret(service: str, secret: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JWT_")}
    if secret is not None:
        env["JWT_SECRET"] = secret
    result = subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert lines, result.stderr
    assert lines[-1]["level"] == "critical"
    assert "JWT_SECRET" in lines[-1]["msg"]
    assert "Traceback" not in result.stderr
