"""Streaming a chat through the gateway vs straight to the LLM service, one run.

    .venv/bin/python -m benchmarks.gateway [--prompts 80] [--max-tokens 64]

One LLM service (the bundled SmolLM2, RAG off, greedy, the response cache bypassed
with ``Cache-Control: no-cache``) and one gateway in front of it; each prompt goes both
ways, the order alternating, every prompt new to both (benchmarks/llm.py two_paths).
Time to first token is from sending the request to the first content piece; decode
speed is (pieces - 1) / (last piece - first piece). The issue's bars: decode >= 0.98x
direct, first token at most +3 ms.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import httpx

from benchmarks.llm import two_paths, two_paths_report
from benchmarks.support import coordinated, dev_token, save
from tests.support.servers import ServiceProcess, free_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    # 80: at 40 the p50s of two runs differed by 1.7 ms (+4.05 and +2.31 ms), near the bar.
    parser.add_argument("--prompts", type=int, default=80)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

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
        gateway = ServiceProcess("gateway", {"GATEWAY_LLM_URL": llm.url, "GATEWAY_LOG_LEVEL": "warning"}, work)
        gateway.start()
        headers = {"Authorization": f"Bearer {token}"}
        direct = httpx.Client(base_url=llm.url, headers=headers, timeout=300)
        through = httpx.Client(base_url=gateway.url, headers=headers, timeout=300)
        try:
            model = direct.get("/v1/models").json()["data"][0]["id"]
            results = two_paths({"direct": direct, "through_gateway": through}, model, args.prompts, args.max_tokens)
        finally:
            direct.close()
            through.close()
            gateway.stop()
            llm.stop()
    report(results)


def report(results: dict[str, Any]) -> None:
    two_paths_report(results, "through_gateway", ttft_bar_ms=3, decode_bar=0.98)
    print(f"results: {save('gateway', results)}")


if __name__ == "__main__":
    main()
