"""Experience-store retrieval latency per invocation, at 1k and 100k records. Prints JSON.

A store is built in a temporary directory from synthetic word-problem trajectories, embedded by
a tiny randomly initialised reasoner whose hidden size (384) matches all-MiniLM-L6-v2's, so the
matrix sizes are those of a real deployment. Per invocation we time, for one query at a time:

- ``dense_search_ms``: exact cosine search (matrix product + top-k) with the query already embedded;
- ``dense_total_ms``: the same plus embedding the query with the reasoner embedder;
- ``bm25_ms``: BM25 search (``bm25s``) with the query's scores over every record.

The build (embedding every record, appending the log) is reported too, once.

    python benchmarks/retrieval.py [--sizes 1000,100000] [--queries 50]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time

import torch

from memgen.experience import ExperienceRecord, ExperienceStore, ReasonerEmbedder
from memgen.precision import cpu_capability
from memgen.tiny import tiny_causal_lm, tiny_tokenizer

NAMES = ["Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Ivy", "Jon", "Kim"]
ITEMS = ["pens", "cups", "eggs", "keys", "hats", "toys", "cards", "books"]
VERBS = ["finds", "drops", "gets", "loses", "wins", "pays"]


def problem(rng: random.Random, i: int) -> ExperienceRecord:
    text = (
        f"Q: {rng.choice(NAMES)} has {rng.randint(1, 9)} {rng.choice(ITEMS)}. "
        + " ".join(f"{rng.choice(VERBS)} {rng.randint(1, 9)}." for _ in range(rng.randint(2, 4)))
        + f" #{i}"
    )
    return ExperienceRecord(task="bench", input=text, trajectory=" 3,+2=5,so 5.", success=True, reward=1.0)


def ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench(size: int, queries: int, embedder) -> dict:
    rng = random.Random(size)
    records = [problem(rng, i) for i in range(size)]
    asks = [problem(rng, size + i).input for i in range(queries)]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        store = ExperienceStore(f"{tmp}/dense", embedder)
        store.add_many(records)
        store.flush()
        build_s = time.perf_counter() - start
        q = embedder.embed(asks)
        dense_search = statistics.median(ms(lambda v=v: (v[None] @ store._vectors.T).topk(4), 3) for v in q[:queries])
        dense_total = statistics.median(ms(lambda a=a: store.search(a, 4), 3) for a in asks)
        store.close()
        lexical = ExperienceStore(f"{tmp}/dense", retriever="bm25", read_only=True)
        lexical.search(asks[0], 4)  # builds the BM25 index once
        bm25 = statistics.median(ms(lambda a=a: lexical.search(a, 4), 3) for a in asks)
    return {
        "records": size,
        "dim": embedder.dim,
        "build_seconds": round(build_s, 2),
        "dense_search_ms": round(dense_search, 3),
        "dense_total_ms": round(dense_total, 3),
        "bm25_ms": round(bm25, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="200 records, 5 queries: checks the script runs (CI)")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.queries = "200", 5
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    # One thin layer: the benchmark is about search, and 100k records must embed in minutes on 2 cores.
    model = tiny_causal_lm(
        tokenizer, hidden_size=384, num_layers=1, num_heads=6, num_kv_heads=2, intermediate_size=384
    ).eval()
    embedder = ReasonerEmbedder(model, tokenizer, max_tokens=48, batch_size=256)
    results = [bench(int(s), args.queries, embedder) for s in args.sizes.split(",")]
    print(
        json.dumps(
            {
                "benchmark": "retrieval",
                "results": results,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "cpu_capability": cpu_capability(),
                "python": platform.python_version(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
