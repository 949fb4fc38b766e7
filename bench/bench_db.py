"""Benchmark the generation index: bulk submit rate and search latency at scale.

    python -m bench.bench_db                          # 1 000 000 items, SQLite and PostgreSQL
    python -m bench.bench_db --items 200000 --backend sqlite
    python -m bench.bench_db --postgresql-url postgresql://postgres@127.0.0.1:5432/test
    python -m bench.bench_db --backend postgresql --revision 0001   # the schema before 0002

The corpus is generated, fixed by --seed. Prompts are 8 to 24 words (uniform) drawn
independently from a 5 000-word vocabulary of made-up words by Zipf's law, P(rank k) ∝ 1/k,
so the rank-1 word is in most prompts and a rank-4 000 word in a few hundred of a million.
Seeds are uniform in [0, 2^32). Items arrive as jobs of 100 000, each submitted in one
transaction with `submit_job` and naming one registered model, as `sdq submit`'s items do.
Then, after ANALYZE, each kind of query is timed through `search_items` (first page of 50,
newest first, rows loaded as ORM objects):

  seed     an exact seed taken from the corpus (about one match)
  common   one of the 10 most frequent words
  medium   a word of rank 100 to 200
  rare     a word of rank 4 000 to 5 000
  phrase   two adjacent words taken from a random prompt of the corpus

PostgreSQL runs in a schema of its own, dropped afterwards; SQLite in a temporary file.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sdq.db.models import SEED_LIMIT, Job, Model
from sdq.db.queries import search_items, submit_job
from sdq.db.session import upgrade
from tests.services import scratch_database

VOCABULARY = 5_000
JOB_SIZE = 100_000
SYLLABLES = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]


class Corpus:
    """The generated prompts and seeds, and query terms drawn from them."""

    def __init__(self, items: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        words: set[str] = set()
        while len(words) < VOCABULARY:
            words.add("".join(rng.choice(SYLLABLES, size=int(rng.integers(2, 5)))))
        self.vocabulary = sorted(words, key=lambda w: (len(w), w))
        weights = 1.0 / np.arange(1, VOCABULARY + 1)
        lengths = rng.integers(8, 25, size=items)
        flat = rng.choice(VOCABULARY, size=int(lengths.sum()), p=weights / weights.sum())
        ends = np.cumsum(lengths)
        vocab = self.vocabulary
        self.prompts = [" ".join(vocab[w] for w in flat[end - n:end])
                        for n, end in zip(lengths, ends, strict=True)]
        self.seeds = rng.integers(0, SEED_LIMIT, size=items).tolist()
        self.rng = rng

    def jobs(self, model_id: int) -> Iterator[list[dict[str, Any]]]:
        for start in range(0, len(self.prompts), JOB_SIZE):
            yield [
                {"prompt": self.prompts[n], "seed": self.seeds[n], "sampler": "euler_a",
                 "steps": 30, "cfg": 7.5, "width": 512, "height": 512, "model_id": model_id}
                for n in range(start, min(start + JOB_SIZE, len(self.prompts)))
            ]

    def queries(self, count: int) -> dict[str, list[dict[str, Any]]]:
        rng, vocab = self.rng, self.vocabulary
        phrases = []
        for n in rng.integers(0, len(self.prompts), count):
            tokens = self.prompts[int(n)].split()
            at = int(rng.integers(0, len(tokens) - 1))
            phrases.append({"text": f'"{tokens[at]} {tokens[at + 1]}"'})

        def words(low: int, high: int) -> list[dict[str, Any]]:
            return [{"text": vocab[int(k)]} for k in rng.integers(low, high, count)]

        seeds = [{"seed": self.seeds[int(n)]} for n in rng.integers(0, len(self.seeds), count)]
        return {"seed": seeds, "common": words(0, 10), "medium": words(99, 200),
                "rare": words(3999, 5000), "phrase": phrases}


@contextmanager
def database(backend: str, postgresql_url: str) -> Iterator[Engine]:
    with tempfile.TemporaryDirectory(prefix="sdq-bench-") as folder:
        with scratch_database(backend, Path(folder), postgresql_url) as engine:
            yield engine


def timed(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def run(backend: str, corpus: Corpus, queries: dict[str, list[dict[str, Any]]],
        postgresql_url: str, revision: str) -> dict[str, Any]:
    with database(backend, postgresql_url) as engine:
        upgrade(engine, revision)
        with Session(engine) as session:
            model = Model(sha256="0" * 64, name="bench", architecture="sd1")
            session.add(model)
            session.commit()
            model_id = model.id
        inserted, seconds = 0, 0.0
        for specs in corpus.jobs(model_id):
            with Session(engine) as session:
                seconds += timed(lambda s=session, j=specs: (submit_job(s, Job(), j), s.commit()))
            inserted += len(specs)
            print(f"  {backend}: {inserted:>9,} items, {inserted / seconds:,.0f} items/s",
                  flush=True)
        with engine.begin() as connection:
            connection.exec_driver_sql("ANALYZE")
        result: dict[str, Any] = {"insert": inserted / seconds}
        with Session(engine) as session:
            for kind, filters in queries.items():
                for warm in filters[:10]:
                    search_items(session, **warm)
                latencies = sorted(timed(lambda f=f: search_items(session, **f)) for f in filters)
                result[kind] = (statistics.median(latencies) * 1e3,
                                latencies[int(0.95 * (len(latencies) - 1))] * 1e3)
                session.expunge_all()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200, help="per kind of query")
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--postgresql-url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--seed", type=int, default=20260301)
    parser.add_argument("--revision", default="head",
                        help="schema revision to measure, e.g. 0001 (per-row foreign keys)")
    args = parser.parse_args()

    start = time.perf_counter()
    corpus = Corpus(args.items, args.seed)
    queries = corpus.queries(args.queries)
    print(f"corpus: {args.items:,} prompts in {time.perf_counter() - start:.0f} s", flush=True)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = {backend: run(backend, corpus, queries, args.postgresql_url, args.revision)
               for backend in backends}

    kinds = list(queries)
    print(f"\n{args.items:,} items; search latency p50 / p95 in ms ({args.queries} queries each)\n")
    print("| backend | insert (items/s) | " + " | ".join(kinds) + " |")
    print("|---|---:|" + "---:|" * len(kinds))
    for backend, result in results.items():
        cells = [f"{result[k][0]:.1f} / {result[k][1]:.1f}" for k in kinds]
        print(f"| {backend} | {result['insert']:,.0f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
