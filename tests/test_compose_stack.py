"""`docker compose up` for real: every image of compose.yaml built from docker/Dockerfile,
the whole stack started in containers on the CPU, driven over its published ports as a
user would, Redis restarted under a lease, and everything taken down, volumes included.

The runtime is Debian's podman behind its Docker API, driven by Debian's docker-compose
(harness/containers.py). Base images cannot be pulled here, so every image is
built on a local Debian base (build argument), Chroma from the pinned chromadb and
Redis from Debian's redis-server (docker/local/). The compose file the test runs is
derived from compose.yaml: the CPU variant of compose.cpu.yaml applied (docker-compose v1
has no ``!reset``), the local images named, each service published on a host port the
runtime picks as it binds (a port picked beforehand can be taken by another socket
before the container binds it: that failed a CI run), read back once it is up.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from harness.apt import Unavailable
from harness.containers import Podman, ensure_installed
from harness.servers import REPO_ROOT, wait_until
from harness.speech import long_meeting
from tests.conftest import Mint
from tests.test_compose import SERVICES, SETTINGS, load

# The first test builds the images: about 4 minutes without a cache, under 1 with one.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

PROJECT = "batontest"
PORTS = {"coordinator": 8002, "rag": 8004, "llm": 8001, "transcription": 8003, "gateway": 8000}
MEETING = REPO_ROOT / "baton" / "demo" / "speech" / "meeting.ogg"
FIGURES: dict[str, object] = {}
"""What the fixtures measured; the first test prints them ("measured" section)."""
STARTED: list[float] = []
"""When the module's first fixture began: the module's wall time is measured from it."""
TEST_ENV = {
    # Small answers and a short keep-alive: the CPU of a CI machine, not a GPU box.
    "llm": {"GEMMA_MODEL_PATH": "smollm2-135m-instruct", "GEMMA_CONTEXT_SIZE": "4096", "GEMMA_KEEP_ALIVE_S": "2"},
    "transcription": {"TRANSCRIPTION_MODEL": "whisper-tiny.en"},
}


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (REPO_ROOT / "docker" / "Dockerfile").read_text(), re.M)
    assert match, name
    return match.group(1)


def derive(compose: dict[str, Any], images: dict[str, str]) -> dict[str, Any]:
    """compose.yaml as a CPU box without registry access runs it."""
    derived = copy.deepcopy(compose)
    cpu = load("compose.cpu.yaml")["services"]
    for name, service in derived["services"].items():
        service["image"] = images[name]
        service.pop("build", None)
        service.pop("deploy", None)  # what compose.cpu.yaml's `!reset {}` does
        service["environment"] = {
            **service.get("environment", {}),
            **cpu.get(name, {}).get("environment", {}),
            **TEST_ENV.get(name, {}),
        }
        if name in PORTS:
            service["ports"] = [f"127.0.0.1::{PORTS[name]}"]  # the host port: whichever is free at bind time
        service["volumes"] = [re.sub(r"^\./", f"{REPO_ROOT}/", volume) for volume in service.get("volumes", [])]
    return derived


class Compose:
    def __init__(self, podman: Podman, file: Path, secret: Path, socket: str) -> None:
        self.podman = podman
        self.file = file
        self.env = {**podman.env, "DOCKER_HOST": socket, "DOCKER_BUILDKIT": "0", "JWT_SECRET_FILE": str(secret)}

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", "-p", PROJECT, "-f", str(self.file), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def container(self, service: str) -> str:
        result = self("ps", "-q", service)
        assert result.returncode == 0 and result.stdout.strip(), result.stderr
        return result.stdout.split()[0]

    def health(self) -> dict[str, str]:
        states = {}
        for service in (*SETTINGS, "redis", "chroma"):
            found = self("ps", "-q", service).stdout.split()
            if found:
                inspected = json.loads(self.podman("inspect", found[0]))[0]
                states[service] = inspected["State"].get("Health", {}).get("Status", "") or inspected["State"]["Status"]
        return states

    def published(self, service: str) -> str:
        """The host address (127.0.0.1:port) the runtime published the service's port on."""
        result = self("port", service, str(PORTS[service]))
        address = result.stdout.strip()
        assert result.returncode == 0 and re.fullmatch(r"127\.0\.0\.1:\d+", address), result.stdout + result.stderr
        return address

    def logs(self) -> str:
        return self("logs", "--no-color", "--tail", "40").stdout[-12000:]


@pytest.fixture(scope="module")
def podman() -> Podman:
    try:
        ensure_installed()
    except Unavailable as exc:
        pytest.skip(f"no container runtime: {exc}")
    return Podman()


@pytest.fixture(scope="module")
def images(podman: Podman) -> dict[str, str]:
    """Every image of compose.yaml, built the way compose would, on the local base."""
    started = time.monotonic()
    STARTED.append(started)
    base = podman.base_image()
    uv = podman.uv_image(dockerfile_arg("UV_IMAGE").rsplit(":", 1)[1])
    wheels = REPO_ROOT / "docker" / "wheels"
    copied = _copy_native_llama_wheel(wheels)
    args = {
        "UV_IMAGE": uv,
        "DEBIAN_IMAGE": base,
        "LLM_BASE": base,
        "TRANSCRIPTION_BASE": base,
        "PYTHON_DIST": "system",
        # Without torch: its CUDA build from PyPI is about 4 GB; diarization is tested natively.
        "TRANSCRIPTION_EXTRAS": "transcription",
    }
    built = {}
    try:
        compose = load("compose.yaml")
        for name, service in compose["services"].items():
            tag = f"localhost/baton-test-{name}:latest"
            if "build" in service:
                build = service["build"]
                podman.build(
                    tag, str(REPO_ROOT / build["context"] / build["dockerfile"]), target=build["target"], args=args
                )
            else:
                podman.build(
                    tag, str(REPO_ROOT / "docker" / "local" / f"{name}.Dockerfile"), args={"BASE": base, "UV_IMAGE": uv}
                )
            built[name] = tag
    finally:
        if copied:
            copied.unlink()
    FIGURES["images built (s)"] = round(time.monotonic() - started)
    sizes = {name: int(json.loads(podman("image", "inspect", tag))[0]["Size"]) for name, tag in built.items()}
    FIGURES["image sizes (MB)"] = {name: round(size / 1e6) for name, size in sizes.items()}
    return built


def _copy_native_llama_wheel(wheels: Path) -> Path | None:
    """The llama-cpp-python wheel the native install compiled (pip's cache), so the image
    does not compile it a second time. None when one is there already or none is cached."""
    if any(wheels.glob("*.whl")):
        return None
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "list", "llama_cpp_python", "--format=abspath"],
        capture_output=True,
        text=True,
        check=False,
    )
    found = [Path(line) for line in listed.stdout.split() if line.endswith(".whl")]
    if not found:
        return None
    target = wheels / found[-1].name
    shutil.copy2(found[-1], target)
    return target


@pytest.fixture(scope="module")
def stack(
    podman: Podman, images: dict[str, str], jwt_secret: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Compose, dict[str, str]]]:
    folder = tmp_path_factory.mktemp("compose")
    secret = folder / "jwt.secret"
    secret.write_text(jwt_secret)
    secret.chmod(0o644)  # read by the services' uid 10001 through the compose secret
    file = folder / "compose.yaml"
    file.write_text(yaml.safe_dump(derive(load("compose.yaml"), images), sort_keys=False))
    with podman.api() as socket, podman.healthchecks(PROJECT):
        compose = Compose(podman, file, secret, socket)
        compose("down", "-v", "--remove-orphans")  # a run that was killed left it up
        started = time.monotonic()
        try:
            up = compose("up", "-d", timeout=900)
            assert up.returncode == 0, f"{up.stdout}{up.stderr}\n{compose.health()}\n{compose.logs()}"
            try:
                wait_until(
                    lambda: list(compose.health().values()) == ["healthy"] * (len(SETTINGS) + 2),
                    600,
                    "every container to be healthy",
                    1.0,
                )
            except AssertionError:
                raise AssertionError(f"{compose.health()}\n{compose.logs()}") from None
            FIGURES["up to healthy (s)"] = round(time.monotonic() - started)
            yield compose, {name: f"http://{compose.published(name)}" for name in PORTS}
        finally:
            down = compose("down", "-v", "--remove-orphans", timeout=300)
            left = podman("volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}")
            assert down.returncode == 0 and not left.split(), down.stderr + left


Stack = tuple[Compose, dict[str, str]]


def get(url: str, token: str, **params: Any) -> httpx.Response:
    return httpx.get(url, headers={"Authorization": f"Bearer {token}"}, params=params, timeout=60)


def test_every_service_answers_a_token_signed_with_the_compose_secret(
    stack: Stack, mint: Mint, record_property: Any
) -> None:
    for name, value in FIGURES.items():
        record_property(f"measured: {name}", value)
    compose, urls = stack
    assert set(compose.health().values()) == {"healthy"}
    token = mint()
    for name in SERVICES:
        url = urls[name]
        info = get(f"{url}/v1/info", token)
        assert info.status_code == 200, (name, info.text)
        assert info.json()["service"] == name
        assert get(f"{url}/v1/info", "not-a-token").status_code == 401
    gpu = get(f"{urls['coordinator']}/v1/gpu", token).json()
    assert gpu["holder"] is None
    # The gateway: every service's models at one address, the token checked behind it.
    models = get(f"{urls['gateway']}/v1/models", token)
    assert models.status_code == 200 and {"whisper-1", "all-minilm-l6-v2"} <= {m["id"] for m in models.json()["data"]}
    assert get(f"{urls['gateway']}/v1/models", "not-a-token").status_code == 401
    assert get(f"{urls['gateway']}/v1/gpu", token).json()["holder"] is None
    # The console is in the image, and here no page gets a development token.
    page = get(f"{urls['gateway']}/console/", token)
    assert page.status_code == 200 and "console.js" in page.text
    assert get(f"{urls['gateway']}/console/dev-token", token).status_code == 404


def test_nothing_runs_as_root_models_are_read_only_and_data_is_owned(stack: Stack) -> None:
    compose, _ = stack
    podman = compose.podman
    for service in (*SETTINGS, "redis", "chroma"):
        container = compose.container(service)
        users = podman("top", container, "huser").split()[1:]
        assert users and "root" not in users and "0" not in users, (service, users)
    for service in SERVICES:
        container = compose.container(service)
        writing = subprocess.run(
            ["podman", "exec", container, "sh", "-c", "touch /models/written-by-a-service"],
            env=podman.env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert writing.returncode != 0 and "Read-only file system" in writing.stderr, (service, writing.stderr)
    for service in ("rag", "transcription"):
        owner = podman("exec", compose.container(service), "stat", "-c", "%u", "/data").strip()
        assert owner == "10001", service


def baton(urls: dict[str, str], token: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BATON_TOKEN": token, "BATON_RUN_DIR": "/nonexistent"}
    env.update({f"BATON_{name.upper()}_URL": url for name, url in urls.items()})
    return subprocess.run(
        [sys.executable, "-m", "baton.cli", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_the_demo_transcribes_indexes_and_answers_with_sources_in_containers(stack: Stack, mint: Mint) -> None:
    """`baton demo` against the containers: a job on the bundled meeting, its transcript
    indexed into Chroma's server through RAG, a chat whose sources cite it."""
    compose, urls = stack
    result = baton(urls, mint(), "demo")
    assert result.returncode == 0, result.stdout + result.stderr + compose.logs()
    out = result.stdout
    assert "Sources:" in out and "meeting.ogg" in out
    assert "The answer cites" in out and "cites 0 " not in out
    written = compose.podman("exec", compose.container("transcription"), "find", "/data", "-newer", "/etc/hostname")
    assert written.split(), "the job wrote nothing to its volume"
    owners = compose.podman("exec", compose.container("transcription"), "find", "/data", "!", "-uid", "10001")
    assert not owners.split(), owners


@pytest.fixture(scope="module")
def twice_the_meeting(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return long_meeting(tmp_path_factory.mktemp("audio"), 2)[0]


def test_a_question_interrupts_a_job_across_containers(stack: Stack, mint: Mint, twice_the_meeting: Path) -> None:
    _, urls = stack
    token = mint()
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(headers=headers, timeout=120) as http:
        with twice_the_meeting.open("rb") as handle:
            submitted = http.post(f"{urls['transcription']}/v1/jobs", files={"file": (twice_the_meeting.name, handle)})
        assert submitted.status_code == 202, submitted.text
        job_url = f"{urls['transcription']}/v1/jobs/{submitted.json()['job_id']}"

        def job() -> dict[str, Any]:
            return dict(http.get(job_url).json())

        wait_until(lambda: job()["state"] == "running" and job()["segments"], 300, "the job to be under way", 0.25)
        asked_at = time.time()
        chat = http.post(
            f"{urls['llm']}/v1/chat/completions",
            headers={"Cache-Control": "no-cache"},  # it must run on the model: it interrupts the job
            json={
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "What is the new deadline for the Harbor report?"}],
                "max_tokens": 24,
                "temperature": 0,
            },
        )
        assert chat.status_code == 200, chat.text
        wait_until(lambda: job()["state"] == "done", 600, "the interrupted job to finish", 0.25)
        finished = job()
        assert finished["yields"] >= 1, finished
        history = list(reversed(http.get(f"{urls['coordinator']}/v1/history", params={"limit": 50}).json()))
    asked = next(h for h in history if h["holder"] == "llm" and h["requested_at"] >= asked_at - 1)
    before = next(h for h in reversed(history) if h["fence"] < asked["fence"])
    after = next(h for h in history if h["fence"] > asked["fence"])
    assert (before["holder"], before["end"]) == ("transcription", "released")
    assert after["holder"] == "transcription"
    assert before["fence"] < asked["fence"] < after["fence"]
    assert asked["requested_at"] < before["ended_at"] <= asked["granted_at"]


def test_a_lease_outlives_a_restart_of_the_redis_container(stack: Stack, mint: Mint, record_property: Any) -> None:
    """docs/operations.md: Redis writes every lease change to its append-only file before it
    answers, so the lease survives a restart; the holder keeps it, same fence, and the
    stack goes on granting."""
    compose, urls = stack
    coordinator = urls["coordinator"]
    holder = {"Authorization": f"Bearer {mint('gpu', sub='service:transcription')}"}
    with httpx.Client(base_url=coordinator, headers=holder, timeout=60) as http:
        granted = http.post(
            "/v1/leases", json={"holder": "transcription", "priority": "batch", "ttl_ms": 60000, "wait_ms": 30000}
        )
        assert granted.status_code == 201, granted.text
        lease = granted.json()
        restarted = compose("restart", "redis", timeout=300)
        assert restarted.returncode == 0, restarted.stderr
        renewals: list[int] = []

        def renewed() -> bool:
            response = http.post(f"/v1/leases/{lease['lease_id']}/renew")
            renewals.append(response.status_code)
            assert response.status_code in (200, 503), response.text
            return response.status_code == 200 and response.json()["fence"] == lease["fence"]

        wait_until(renewed, 120, "the lease to be renewed after the restart", 0.5)
        gpu = get(f"{coordinator}/v1/gpu", mint()).json()
        assert (gpu["holder"], gpu["fence"]) == ("transcription", lease["fence"])
        assert not gpu.get("quarantine_until"), gpu  # the data survived: no quarantine
        assert http.delete(f"/v1/leases/{lease['lease_id']}").status_code == 204
    # The services use the restarted Redis: a chat takes the card again, with a higher fence.
    token = mint()
    chat = httpx.post(
        f"{urls['llm']}/v1/chat/completions",
        headers={"Authorization": f"Bearer {token}"},
        json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
        timeout=120,
    )
    assert chat.status_code == 200, chat.text
    history = get(f"{coordinator}/v1/history", token, limit=5).json()
    assert any(h["holder"] == "llm" and h["fence"] > lease["fence"] for h in history), history
    record_property("measured: the compose tests in all, images included (s)", round(time.monotonic() - STARTED[0]))
