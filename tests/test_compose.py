"""compose.yaml and the images agree with the code, checked without a Docker engine."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib import import_module
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import SecretStr

from harness.servers import free_port
from services.coordinator.settings import CoordinatorSettings
from services.gateway.settings import GatewaySettings
from services.llm.settings import LLMSettings
from services.rag.settings import RAGSettings
from services.transcription.settings import TranscriptionSettings
from shared.settings import AuthSettings, BatonSettings, LimitSettings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS: dict[str, type[BatonSettings]] = {
    "coordinator": CoordinatorSettings,
    "rag": RAGSettings,
    "llm": LLMSettings,
    "transcription": TranscriptionSettings,
    "gateway": GatewaySettings,
}
SERVICES = ("coordinator", "rag", "llm", "transcription")
"""Those that check tokens and read models (the gateway does neither)."""
GPU_SERVICES = {"llm", "transcription"}


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's !reset tag."""


ComposeLoader.add_constructor("!reset", lambda loader, node: {"__reset__": True})


def load(name: str) -> dict[str, Any]:
    return dict(yaml.load((ROOT / name).read_text(), Loader=ComposeLoader))  # noqa: S506 - a SafeLoader subclass


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load("compose.yaml")


def variables(cls: type[BatonSettings]) -> set[str]:
    """Every environment variable the settings class reads (aliases and *_FILE included)."""
    names = set()
    for field_name, field in cls.model_fields.items():
        if field_name == "auth":
            continue
        alias = field.validation_alias
        choices = getattr(alias, "choices", None)
        found = [c for c in choices if isinstance(c, str)] if choices else [cls.env_name(field_name)]
        names.update(found)
        if field.annotation is SecretStr or SecretStr in getattr(field.annotation, "__args__", ()):
            names.update(f"{name}_FILE" for name in found)
    return names


def allowed(service: str) -> set[str]:
    return variables(SETTINGS[service]) | variables(AuthSettings) | variables(LimitSettings) | {"BATON_MODELS_DIR"}


def dockerfile_stages() -> dict[str, list[str]]:
    """Stage name -> its lines, from docker/Dockerfile."""
    stages: dict[str, list[str]] = {}
    current = ""
    for line in (ROOT / "docker" / "Dockerfile").read_text().splitlines():
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = match.group(1)
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def test_every_service_is_there_with_a_healthcheck(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "chroma", *SETTINGS}
    for name, service in services.items():
        assert service["healthcheck"]["test"], name
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services
            assert condition == {"condition": "service_healthy"}, (name, dependency)


def test_every_environment_variable_is_a_real_setting(compose: dict[str, Any]) -> None:
    for name in SETTINGS:
        environment = set(compose["services"][name]["environment"])
        unknown = environment - allowed(name)
        assert not unknown, f"{name} sets variables it does not read: {sorted(unknown)}"
    for name, service in load("compose.cpu.yaml")["services"].items():
        unknown = set(service.get("environment", {})) - allowed(name)
        assert not unknown, f"compose.cpu.yaml: {name}: {sorted(unknown)}"


def test_services_listen_where_their_healthchecks_and_peers_look(compose: dict[str, Any]) -> None:
    prefixes = {"coordinator": "COORDINATOR", "rag": "RAG", "llm": "GEMMA", "transcription": "TRANSCRIPTION"}
    ports = {}
    for name, prefix in prefixes.items():
        service = compose["services"][name]
        env = service["environment"]
        assert env[f"{prefix}_HOST"] == "0.0.0.0"  # noqa: S104 - in a container, by design
        ports[name] = env[f"{prefix}_PORT"]
        assert service["healthcheck"]["test"] == ["CMD", "python", "-m", "shared.healthcheck", ports[name]]
    for name in ("llm", "transcription"):
        env = compose["services"][name]["environment"]
        assert env["GPU_COORDINATOR_URL"] == f"http://coordinator:{ports['coordinator']}"
        assert env["RAG_SERVICE_URL"] == f"http://rag:{ports['rag']}"
    assert compose["services"]["rag"]["environment"]["RAG_CHROMA_URL"] == "http://chroma:8000"


def test_no_healthcheck_argument_holds_a_space(compose: dict[str, Any]) -> None:
    """podman's Docker API splits exec-form arguments at spaces: `bash -c "echo > ..."`
    ran as `bash -c echo`, healthy whatever the port said (found by the first real up)."""
    for name, service in compose["services"].items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and not any(re.search(r"\s", part) for part in test), name


def test_the_healthcheck_module_says_not_ready_when_nothing_answers() -> None:
    from shared.healthcheck import main

    assert main([str(free_port())]) == 1
    assert main(["not-a-port"]) == 2


def test_no_published_port_is_used_twice(compose: dict[str, Any]) -> None:
    published = [str(p).split(":")[0] for s in compose["services"].values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)) == len(SETTINGS)


def test_gpu_services_reserve_the_gpu_and_the_cpu_variant_removes_it(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if name in GPU_SERVICES:
            assert devices and devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"], name
        else:
            assert not devices, name
    cpu = load("compose.cpu.yaml")["services"]
    assert set(cpu) == GPU_SERVICES
    for service in cpu.values():
        assert service["deploy"] == {"__reset__": True}
    assert cpu["transcription"]["environment"]["TRANSCRIPTION_DEVICE"] == "cpu"
    assert cpu["llm"]["environment"]["GEMMA_GPU_LAYERS"] == "0"


def test_models_are_read_only_and_the_secret_is_a_compose_secret(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert "secrets" not in gateway and "volumes" not in gateway  # it checks no token and loads no model
    for name in SERVICES:
        service = compose["services"][name]
        assert "./models:/models:ro" in service["volumes"]
        assert service["secrets"] == ["jwt_secret"]
        assert service["environment"]["JWT_SECRET_FILE"] == "/run/secrets/jwt_secret"
    assert compose["secrets"]["jwt_secret"]["file"].startswith("${JWT_SECRET_FILE:?")
    redis = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in redis and "--appendfsync always" in redis


def test_referenced_files_volumes_and_images_exist(compose: dict[str, Any]) -> None:
    stages = dockerfile_stages()
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        if "build" in service:
            build = service["build"]
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()
            assert build["target"] in stages, name
        else:
            assert re.fullmatch(r"[\w./-]+:\d[\w.-]*", service["image"]), f"{name}: image not pinned"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), volume
            else:
                assert source in declared, volume
    for arg, default in re.findall(r"^ARG (\w+_(?:IMAGE|BASE))=(\S+)$", (ROOT / "docker/Dockerfile").read_text(), re.M):
        assert re.search(r":\d[\w.-]*$", default), f"{arg} is not pinned: {default}"


def test_each_service_runs_its_own_app(compose: dict[str, Any]) -> None:
    stages = dockerfile_stages()
    for name in SETTINGS:
        command = compose["services"][name]["command"]
        assert command == ["python", "-m", f"services.{name}"]
        assert f'CMD ["python", "-m", "services.{name}"]' in stages[name]
        assert "USER 10001:10001" in stages[name]
        main = import_module(f"services.{name}.app")
        assert callable(main.create_app)
        assert (ROOT / "services" / name / "__main__.py").read_text().count(f"services.{name}.app") == 1


@pytest.mark.parametrize(
    "dockerfile", ["docker/Dockerfile", "docker/local/chroma.Dockerfile", "docker/local/redis.Dockerfile"]
)
def test_the_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run([str(hadolint), dockerfile], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "script", ["docker/build-venv.sh", "docker/runtime-setup.sh", "docker/local/redis-entrypoint.sh"]
)
def test_the_image_scripts_are_valid_posix_sh(script: str) -> None:
    result = subprocess.run(["sh", "-n", script], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert (ROOT / script).stat().st_mode & 0o111, f"{script} is not executable"


@pytest.mark.parametrize("script", ["scripts/build-llama-wheel.sh", "scripts/gpu-measure.sh"])
def test_the_cuda_build_scripts_are_valid_bash(script: str) -> None:
    result = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert (ROOT / script).stat().st_mode & 0o111, f"{script} is not executable"


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="Debian's docker-compose is not installed")
def test_docker_compose_config_validates(tmp_path: Path) -> None:
    secret = tmp_path / "jwt.secret"
    secret.write_text("x" * 48)
    env = {**os.environ, "JWT_SECRET_FILE": str(secret)}
    result = subprocess.run(
        ["docker-compose", "-f", "compose.yaml", "config", "-q"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    missing = subprocess.run(
        ["docker-compose", "-f", "compose.yaml", "config", "-q"],
        cwd=ROOT,
        env={k: v for k, v in env.items() if k != "JWT_SECRET_FILE"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert missing.returncode != 0 and "set JWT_SECRET_FILE" in missing.stderr


def test_the_llm_reads_the_example_databases_compose_names(compose: dict[str, Any]) -> None:
    """The JSON survives YAML (one line, as GEMMA_SQL_DATABASES is read); the image builds the files."""
    environment = compose["services"]["llm"]["environment"]
    databases = json.loads(environment["GEMMA_SQL_DATABASES"])
    assert databases == {
        "inventory": "sqlite:////opt/baton/sql/inventory.db",
        "shop": "sqlite:////opt/baton/sql/shop.db",
    }
    assert environment["GEMMA_SQL_DEFAULT_DATABASE"] in databases
    assert "python -m baton.demo.databases /opt/baton/sql" in Path("docker/Dockerfile").read_text()
