"""RAG service vs direct chromadb calls on the same data, one run, embedded Chroma.

    .venv/bin/python -m benchmarks.rag [--tiers 10000 100000] [--ingest 2000] [--queries 200]

For each tier (chunks already stored), two identical embedded Chroma databases are
filled with the same chunks and vectors: one the service process opens, one this
process queries directly. Then, on both:
- ingest: the same ``--ingest`` new chunks (text, embedded on the way in) through
  ``POST /v1/documents`` vs ``collection.add(documents=...)``, in batches of 100;
- query: the same questions through ``POST /v1/query`` (top 5, recency off, so both
  do the same work; and once more with the default recency bias) vs
  ``collection.query(query_texts=...)``.
Service and direct calls alternate, so load from elsewhere falls on both alike.

The bulk of each tier is embedded once (cached in benchmarks/results/) and loaded
with its vectors: embedding 100k chunks twice would take hours on two cores, and the
bulk load is not what is measured.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import chromadb
import httpx
import numpy as np
from chromadb.api.shared_system_client import SharedSystemClient

from benchmarks.support import RESULTS, dev_token, ratio, save, summary_ms, table
from harness.servers import ServiceProcess
from services.rag.store import MiniLM
from shared.presets import PRESETS

COLLECTION = "memories"
SUBJECTS = [
    "The finance team",
    "Maria",
    "The Harbor project",
    "Our Berlin customer",
    "The support desk",
    "Kevin",
    "The data platform",
    "The mobile app",
    "Legal",
    "The board",
    "Priya",
    "The design group",
    "Sales",
    "The security team",
    "Facilities",
    "The ML team",
    "Tomás",
    "The Lighthouse release",
    "Aisha",
    "Marketing",
]
VERBS = ["moved", "approved", "postponed", "reviewed", "cancelled", "doubled", "cut", "shipped", "audited", "planned"]
OBJECTS = [
    "the quarterly budget",
    "the onboarding flow",
    "the database migration",
    "the hiring plan",
    "the offsite",
    "the pricing page",
    "the incident report",
    "the API rate limits",
    "the privacy training",
    "the roadmap",
    "the GPU reservation",
    "the invoice template",
    "the load tests",
    "the translation work",
    "the on-call rota",
]
WHEN = [
    "on Monday",
    "before the audit",
    "by the end of March",
    "after the outage",
    "for next quarter",
    "last week",
    "until further notice",
    "in the Riverside office",
    "during the all-hands",
    "ahead of the launch",
]


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(WHEN)}; "
        f"ticket {rng.randrange(10000, 99999)} tracks it and {rng.randrange(2, 60)} people were told."
        for _ in range(n)
    ]


def questions(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"What did {rng.choice(SUBJECTS).lower()} do about {rng.choice(OBJECTS)}?" for _ in range(n)]


def embeddings(texts: list[str], embedder: MiniLM) -> np.ndarray:
    cache = RESULTS / f"rag-embeddings-{len(texts)}.npy"
    if cache.exists():
        return np.load(cache)
    started = time.monotonic()
    vectors = np.concatenate([np.array(embedder(texts[i : i + 1024])) for i in range(0, len(texts), 1024)])
    print(f"embedded {len(texts)} bulk chunks once in {time.monotonic() - started:.0f} s (cached in {cache})")
    RESULTS.mkdir(exist_ok=True)
    np.save(cache, vectors)
    return vectors


def metadata(index: int, created: float) -> dict[str, Any]:
    """What the service stores with a one-chunk document."""
    return {
        "kind": "document",
        "doc_id": f"bulk-{index}",
        "doc_hash": f"{index:032x}",
        "created_at": created,
        "chunks": 1,
        "chunk": 0,
    }


def fill(path: Path, embedder: MiniLM, texts: list[str], vectors: np.ndarray, upto: int) -> None:
    """Load bulk chunks [count, upto) with their vectors into the database at ``path``."""
    client = chromadb.PersistentClient(path=str(path), settings=chromadb.Settings(anonymized_telemetry=False))
    collection = client.get_or_create_collection(
        COLLECTION, embedding_function=embedder.for_chroma, configuration={"hnsw": {"space": "cosine"}}
    )
    start, step, now = collection.count(), client.get_max_batch_size(), time.time()
    for i in range(start, upto, step):
        end = min(upto, i + step)
        collection.add(
            ids=[f"bulk-{j}#0" for j in range(i, end)],
            embeddings=vectors[i:end],
            documents=texts[i:end],
            metadatas=[metadata(j, now) for j in range(i, end)],
        )
    SharedSystemClient.clear_system_cache()  # let go of the files before the service opens them


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiers", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--ingest", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()

    embedder = MiniLM(PRESETS["all-minilm-l6-v2"].location())
    bulk_texts = corpus(max(args.tiers), seed=1)
    bulk_vectors = embeddings(bulk_texts, embedder)
    asks = questions(args.queries, seed=2)
    token = dev_token()
    results: dict[str, Any] = {}
    rows = [["chunks", "figure", "service", "direct", "service/direct", "overhead"]]
    with tempfile.TemporaryDirectory() as tmp:
        service_db, direct_db = Path(tmp) / "service", Path(tmp) / "direct"
        for tier in sorted(args.tiers):
            bulk = tier - args.ingest
            fill(service_db, embedder, bulk_texts, bulk_vectors, bulk)
            fill(direct_db, embedder, bulk_texts, bulk_vectors, bulk)
            fresh = corpus(args.ingest, seed=tier)
            service = ServiceProcess("rag", {"RAG_CHROMA_PATH": str(service_db), "RAG_LOG_LEVEL": "warning"}, Path(tmp))
            service.start()
            direct_client = chromadb.PersistentClient(
                path=str(direct_db), settings=chromadb.Settings(anonymized_telemetry=False)
            )
            direct = direct_client.get_or_create_collection(COLLECTION, embedding_function=embedder.for_chroma)
            try:
                with httpx.Client(
                    base_url=service.url, headers={"Authorization": f"Bearer {token}"}, timeout=600
                ) as http:
                    figures = measure(http, direct, fresh, asks, tier)
            finally:
                service.stop()
                SharedSystemClient.clear_system_cache()
            results[str(tier)] = figures
            ing = figures["ingest_chunks_per_s"]
            rows.append(
                [
                    f"{tier:,}",
                    "ingest chunks/s",
                    f"{ing['service']:.1f}",
                    f"{ing['direct']:.1f}",
                    ratio(ing["service"], ing["direct"]),
                    "",
                ]
            )
            for label, key in (("query p50", "p50_ms"), ("query p99", "p99_ms")):
                ours, theirs = figures["query"]["service"][key], figures["query"]["direct"][key]
                rows.append(
                    [
                        f"{tier:,}",
                        label,
                        f"{ours:.2f} ms",
                        f"{theirs:.2f} ms",
                        ratio(ours, theirs),
                        f"{ours - theirs:+.2f} ms",
                    ]
                )
            biased = figures["query_with_recency"]["service"]
            rows.append(
                [
                    f"{tier:,}",
                    "query p50/p99, recency on",
                    f"{biased['p50_ms']:.2f}/{biased['p99_ms']:.2f} ms",
                    "",
                    "",
                    "",
                ]
            )
    print(table(rows))
    overheads = [results[t]["query"]["service"]["p50_ms"] - results[t]["query"]["direct"]["p50_ms"] for t in results]
    ingest = [
        results[t]["ingest_chunks_per_s"]["service"] / results[t]["ingest_chunks_per_s"]["direct"] for t in results
    ]
    print(
        f"targets: query overhead < 5 ms: {'met' if max(overheads) < 5 else 'NOT met'} "
        f"(worst +{max(overheads):.2f} ms); "
        f"ingest >= 0.9x direct: {'met' if min(ingest) >= 0.9 else 'NOT met'} (worst {min(ingest):.2f}x)"
    )
    print(f"written to {save('rag', results)}")


def measure(http: httpx.Client, direct: Any, fresh: list[str], asks: list[str], tier: int) -> dict[str, Any]:
    """Service and direct calls interleaved, batch by batch and question by question,
    so that whatever else the machine does falls on both alike."""
    batch = 100
    service_s = direct_s = 0.0
    now = time.time()
    for i in range(0, len(fresh), batch):
        ids = range(i, min(len(fresh), i + batch))
        docs = [{"id": f"new-{tier}-{j}", "text": fresh[j]} for j in ids]
        started = time.monotonic()
        http.post("/v1/documents", json={"documents": docs}).raise_for_status()
        service_s += time.monotonic() - started
        started = time.monotonic()
        direct.add(
            ids=[f"new-{tier}-{j}#0" for j in ids],
            documents=[fresh[j] for j in ids],
            metadatas=[{**metadata(j, now), "doc_id": f"new-{tier}-{j}"} for j in ids],
        )
        direct_s += time.monotonic() - started

    for question in asks[:10]:  # warm both paths
        http.post("/v1/query", json={"query": question, "top_k": 5, "recency_bias": 0})
        direct.query(query_texts=[question], n_results=5)
    service_q, direct_q, biased_q = [], [], []
    for question in asks:
        started = time.monotonic()
        http.post("/v1/query", json={"query": question, "top_k": 5, "recency_bias": 0}).raise_for_status()
        service_q.append(time.monotonic() - started)
        started = time.monotonic()
        direct.query(query_texts=[question], n_results=5, include=["documents", "metadatas", "distances"])
        direct_q.append(time.monotonic() - started)
        started = time.monotonic()
        http.post("/v1/query", json={"query": question, "top_k": 5}).raise_for_status()
        biased_q.append(time.monotonic() - started)
    return {
        "ingest_chunks_per_s": {"service": round(len(fresh) / service_s, 1), "direct": round(len(fresh) / direct_s, 1)},
        "query": {"service": summary_ms(service_q), "direct": summary_ms(direct_q)},
        "query_with_recency": {"service": summary_ms(biased_q)},
    }


if __name__ == "__main__":
    main()
