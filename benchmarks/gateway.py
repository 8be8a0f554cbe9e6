"""Streaming a chat through the gateway vs straight to the LLM service, one run.

    .venv/bin/python -m benchmarks.gateway [--prompts 80] [--max-tokens 64] [--stand-in]

One LLM service (the bundled SmolLM2, RAG off, greedy, the response cache bypassed
with ``Cache-Control: no-cache``) and one gateway in front of it; each prompt goes both
ways, the order alternating, every prompt new to both (benchmarks/llm.py two_paths).
Time to first token is from sending the request to the first content piece; decode
speed is (pieces - 1) / (last piece - first piece). The issue's bars: decode >= 0.98x
direct, first token at most +3 ms.

``--stand-in`` puts a stand-in service in the LLM's place (an OpenAI stream: 20 ms
before the first piece, then a piece every 5 ms, no model, no lease): what the relay
itself adds, apart from three processes contending for two cores with llama.cpp.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from benchmarks.llm import two_paths, two_paths_report
from benchmarks.support import coordinated, dev_token, save
from harness.servers import ServiceProcess, UvicornThread, free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    # 80: at 40 the p50s of two runs differed by 1.7 ms (+4.05 and +2.31 ms), near the bar.
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stand-in", action="store_true", help="a stand-in service instead of the LLM")
    args = parser.parse_args()
    if args.stand_in:
        with stand_in() as url, tempfile.TemporaryDirectory() as tmp:
            results = through_gateway(url, "none", Path(tmp), "stand-in", args.prompts, args.max_tokens)
        report(results, "gateway-stand-in")
        return

    token = dev_token()
    with tempfile.TemporaryDirectory() as tmp, coordinated(Path(tmp)) as (_, coordinator):
        work = Path(tmp)
        env = {
            "GPU_COORDINATOR_URL": coordinator.url,
            "RAG_SERVICE_URL": f"http://127.0.0.1:{free_port()}",
            "GEMMA_MODEL_PATH": args.model,
            "GEMMA_LOG_LEVEL": "warning",
        }
        llm = ServiceProcess("llm", env, work).start()
        try:
            model = httpx.get(f"{llm.url}/v1/models", headers={"Authorization": f"Bearer {token}"}).json()["data"][0]
            results = through_gateway(llm.url, token, work, model["id"], args.prompts, args.max_tokens)
        finally:
            llm.stop()
    report(results)


def through_gateway(url: str, token: str, work: Path, model: str, prompts: int, max_tokens: int) -> dict[str, Any]:
    """The chats straight to ``url`` and through a gateway in front of it, alternating."""
    gateway = ServiceProcess("gateway", {"GATEWAY_LLM_URL": url, "GATEWAY_LOG_LEVEL": "warning"}, work).start()
    headers = {"Authorization": f"Bearer {token}"}
    direct = httpx.Client(base_url=url, headers=headers, timeout=300)
    through = httpx.Client(base_url=gateway.url, headers=headers, timeout=300)
    try:
        return two_paths({"direct": direct, "through_gateway": through}, model, prompts, max_tokens)
    finally:
        direct.close()
        through.close()
        gateway.stop()


@contextmanager
def stand_in() -> Iterator[str]:
    """A service that streams like the LLM, without a model, on a thread of this process."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]) -> StreamingResponse:
        async def pieces() -> AsyncIterator[str]:
            await asyncio.sleep(0.020)
            for i in range(int(body.get("max_tokens") or 16)):
                chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": f" w{i}"}}]}
                yield f"data: {json.dumps(chunk)}\n\n"
                await asyncio.sleep(0.005)
            yield "data: [DONE]\n\n"

        return StreamingResponse(pieces(), media_type="text/event-stream")

    with UvicornThread(app) as server:
        yield server.url


def report(results: dict[str, Any], name: str = "gateway") -> None:
    two_paths_report(results, "through_gateway", ttft_bar_ms=3, decode_bar=0.98)
    print(f"results: {save(name, results)}")


if __name__ == "__main__":
    main()
