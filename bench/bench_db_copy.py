"""Where PostgreSQL's time goes in a bulk submit: one 100 000-item job, loaded into variants of
the migrated `items` table.

    python -m bench.bench_db_copy
    python -m bench.bench_db_copy --repeats 3 --postgresql-url postgresql://postgres@127.0.0.1:5432/test

The rows (the `bench_db` corpus, so prompts have 8 to 24 Zipf-drawn words) are encoded once as
COPY text in memory and sent in one piece, so the time is the server's: parsing, heap, indexes,
constraint triggers, WAL, commit. Each variant starts from a freshly migrated, empty schema and
changes one thing; each repeat empties the table and checkpoints first. Revision 0001 checked
items' references with per-row foreign keys, the current schema with one check per statement
(migrations/versions/0002...). `model_id` variants give every item a model, as `sdq submit`
does, which is a second reference to check.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from bench.bench_db import Corpus
from sdq.db.session import upgrade
from tests.services import scratch_database

COLUMNS = ("job_id", "row_index", "prompt", "negative_prompt", "seed", "sampler", "steps", "cfg", "eta", "width", "height",
           "model_id", "status", "attempts", "created_at")
ITEMS = 100_000
DROP_FULL_TEXT = "ALTER TABLE items DROP COLUMN prompt_tsv"
# name: (items carry a model_id, schema revision, then these statements)
VARIANTS: dict[str, tuple[bool, str, list[str]]] = {
    "per-row foreign keys (revision 0001)": (False, "0001", []),
    "per-row foreign keys (revision 0001), with model_id": (True, "0001", []),
    "as migrated: one reference check per statement": (False, "head", []),
    "as migrated, with model_id": (True, "head", []),
    "as migrated, without the full-text column and index": (False, "head", [DROP_FULL_TEXT]),
}


def copy_text(corpus: Corpus, model_id: int | None) -> bytes:
    """The job's rows in COPY's text format (the corpus has no tab, newline or backslash)."""
    model = r"\N" if model_id is None else str(model_id)
    return "".join(
        f"1\t{n}\t{prompt}\t\t{seed}\teuler_a\t30\t7.5\t0\t512\t512\t{model}\tpending\t0\t2026-11-29 00:00:00+00\n"
        for n, (prompt, seed) in enumerate(zip(corpus.prompts, corpus.seeds, strict=True))
    ).encode()


def measure(url: str, revision: str, statements: list[str], data: bytes, repeats: int) -> list[float]:
    with tempfile.TemporaryDirectory() as folder, scratch_database("postgresql", Path(folder), url) as engine:
        upgrade(engine, revision)
        with engine.begin() as connection:
            for statement in statements:
                connection.exec_driver_sql(statement)
        seconds = []
        for _ in range(repeats):
            with engine.begin() as connection:
                connection.exec_driver_sql("TRUNCATE items, jobs, models")
                connection.execute(text(
                    "INSERT INTO models (id, sha256, name, architecture, created_at)"
                    " VALUES (1, repeat('a', 64), 'bench', 'sd1', now());"
                    "INSERT INTO jobs (id, defaults, priority, tags, status, item_count, created_at)"
                    " VALUES (1, '{}', 0, '[]', 'pending', 0, now())"
                ))
            with engine.connect() as connection:
                connection.exec_driver_sql("CHECKPOINT")
                cursor = connection.connection.driver_connection.cursor()
                start = time.perf_counter()
                with cursor.copy(f"COPY items ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                    copy.write(data)
                connection.commit()
                seconds.append(time.perf_counter() - start)
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--postgresql-url", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    corpus = Corpus(ITEMS, 20260301)
    data = {with_model: copy_text(corpus, 1 if with_model else None) for with_model in (False, True)}
    print(f"| items table ({ITEMS:,} rows in one COPY) | seconds (median of {args.repeats}) | rows/s |")
    print("|---|---:|---:|")
    for name, (with_model, revision, statements) in VARIANTS.items():
        seconds = statistics.median(
            measure(args.postgresql_url, revision, statements, data[with_model], args.repeats)
        )
        print(f"| {name} | {seconds:.2f} | {ITEMS / seconds:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
