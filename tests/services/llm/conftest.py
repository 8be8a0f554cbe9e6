"""The LLM tests' services: Redis and a coordinator and a RAG service (embedded Chroma)
as processes, and each LLM app built from its settings in this process, served over real
HTTP from a thread (``serve_in_thread``): the model loads in well under a second, and
Python is not started again for each configuration."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from harness.servers import RedisServer, Served, ServiceProcess, UvicornThread, environment, free_port, serve_in_thread
from services.llm.app import create_app
from shared.gpu import GpuClient
from tests.conftest import Mint


class Llm:
    def __init__(
        self, service: UvicornThread | ServiceProcess, token: str, coordinator: Served, admin: str, mint: Mint
    ) -> None:
        self.service = service
        self.mint = mint
        self.coordinator = coordinator
        self.http = httpx.Client(base_url=service.url, headers={"Authorization": f"Bearer {token}"}, timeout=300)
        self.gpu_http = httpx.Client(base_url=coordinator.url, headers={"Authorization": f"Bearer {admin}"}, timeout=30)
        self.admin = admin
        self.token = token

    @property
    def url(self) -> str:
        return self.service.url

    def info(self) -> dict[str, Any]:
        """/v1/info as an admin sees it (a user sees the model and the limits only)."""
        return dict(self.http.get("/v1/info", headers={"Authorization": f"Bearer {self.admin}"}).json())

    @property
    def model(self) -> str:
        return str(self.http.get("/v1/models").json()["data"][0]["id"])

    def chat(self, content: str, **options: Any) -> httpx.Response:
        body = {"model": self.model, "messages": [{"role": "user", "content": content}], **options}
        return self.http.post("/v1/chat/completions", json=body)

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(self.gpu_http.get("/v1/history", params={"limit": limit}).json())

    def holder(self, name: str, url: str | None = None) -> GpuClient:
        """A lease client of service ``name`` (only services hold the GPU)."""
        token = self.mint("gpu", sub=f"service:{name}")
        return GpuClient(url or self.coordinator.url, lambda: token)

    def gpu(self) -> dict[str, Any]:
        return dict(self.gpu_http.get("/v1/gpu").json())

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus sample (0 if absent)."""
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {self.admin}"}).text
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        target = f"{name}{{{wanted}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(target + " "):
                return float(line.split()[-1])
        return 0.0


@pytest.fixture(scope="module")
def gpu_stack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, UvicornThread]]:
    """A coordinator and a RAG service for one test module, in threads of this process."""
    prefix = f"llm-{secrets.token_hex(4)}:"
    coordinator = serve_in_thread(
        "coordinator",
        {
            "COORDINATOR_REDIS_URL": redis_server.url,
            "COORDINATOR_KEY_PREFIX": prefix,
            "COORDINATOR_YIELD_GRACE_MS": "300",
        },
    )
    rag = serve_in_thread("rag", {"RAG_CHROMA_PATH": str(tmp_path_factory.mktemp("llm-rag") / "chroma")})
    yield {"coordinator": coordinator, "rag": rag}
    rag.stop()
    coordinator.stop()


StartLlm = Callable[..., Llm]


@pytest.fixture(scope="module")
def start_llm(gpu_stack: dict[str, Served], log_dir: Path, mint: Mint) -> Iterator[StartLlm]:
    started: list[UvicornThread | ServiceProcess] = []

    def start(
        rag_url: str | None = None,
        coordinator: Served | None = None,
        env_extra: dict[str, str] | None = None,
        process: bool = False,
        **settings: object,
    ) -> Llm:
        """``process``: a process of its own, for a test of what the process writes (its log)."""
        coordinator = coordinator or gpu_stack["coordinator"]
        env = {
            "GPU_COORDINATOR_URL": coordinator.url,
            "RAG_SERVICE_URL": rag_url or gpu_stack["rag"].url,
            "GEMMA_CONTEXT_SIZE": "4096",
            "GEMMA_MAX_TOKENS": "4096",
            "GEMMA_MAX_BODY_MB": "1",
            # llama.cpp's threads take both cores while a 4,000-token prompt is read; a
            # 3 s lease lost its renewals once in CI. No test here waits for an expiry.
            "GEMMA_LEASE_TTL_MS": "10000",
        }
        env.update({f"GEMMA_{k.upper()}": str(v) for k, v in settings.items()})
        env.update(env_extra or {})
        service = ServiceProcess("llm", env, log_dir).start() if process else serve_in_thread("llm", env)
        started.append(service)
        return Llm(service, mint("chat", "rag:read", sub="tester"), coordinator, mint("admin", "gpu", sub="ops"), mint)

    yield start
    for service in started:
        service.stop()


@pytest.fixture(scope="module")
def llm(start_llm: StartLlm) -> Llm:
    """SmolLM2, keeping the GPU for 60 s, with the reload path forced on this CPU build."""
    return start_llm(keep_alive_s=60, force_reload="true")


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


class InProcess:
    """The LLM app built in this process (the bundled SmolLM2, no coordinator, RAG down),
    served over real HTTP from a thread, with an OpenAI client of a user's."""

    def __init__(self, app: Any, server: UvicornThread, token: str) -> None:
        self.app = app
        self.server = server
        self.client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=token, max_retries=0, timeout=120)
        self.model = self.client.models.list().data[0].id

    def tokens(self, text: str) -> list[int]:
        return list(self.app.state.parts.engine.vocabulary.tokens(text))

    def ask(self, content: str, **options: Any) -> Any:
        messages: Any = [{"role": "user", "content": content}]
        return self.client.chat.completions.create(model=self.model, messages=messages, **options)


@pytest.fixture(scope="module")
def in_process(redis_server: RedisServer, mint: Mint) -> Iterator[InProcess]:
    env = {
        "GEMMA_COORDINATE": "false",
        "RAG_SERVICE_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens: RAG down
        "GEMMA_CONTEXT_SIZE": "2048",
        "GEMMA_PARALLEL": "4",
        "BATON_REDIS_URL": redis_server.url,
        "BATON_KEY_PREFIX": f"llm-compat-{secrets.token_hex(4)}:",
    }
    with environment(env):
        app = create_app()
    with UvicornThread(app) as server:
        yield InProcess(app, server, mint("chat", sub="compat"))
