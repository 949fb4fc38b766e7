"""Real services for tests and benchmarks: scratch databases on SQLite or the PostgreSQL server,
and what waits in a Redis queue.

Every PostgreSQL database here is a schema of its own (named for the run, dropped after), put
first on the search path through the URL, so concurrent runs on one server never meet; its
sessions end a transaction left idle after STALL_S.
The server comes from SDQ_TEST_POSTGRESQL_URL (default: the CI service on 127.0.0.1:5432).
"""
from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from sqlalchemy.engine import Engine, make_url

from sdq.db.session import engine_from_url
from sdq.jobs.broker import level_lists

POSTGRESQL_URL = os.environ.get(
    "SDQ_TEST_POSTGRESQL_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("SDQ_TEST_REDIS_URL", "redis://127.0.0.1:6379")
OWNER_KEY = "sdq-test:owner"
STALL_S = 60
"""How long a test database lets a session sit idle inside a transaction, and a schema's
DROP wait for a lock, before failing: a leaked transaction (a worker a test left running,
a session never closed) then fails the test that owns it within a minute, instead of
holding the next fixture's DROP SCHEMA for as long as CI lets it."""


@contextmanager
def claimed_redis_db(redis_url: str = REDIS_URL) -> Iterator[str]:
    """A broker URL on a Redis database no other test run is using (claimed by a key that
    expires), flushed afterwards: the only databases a test may flush are the ones it claimed."""
    owner = uuid.uuid4().hex
    for number in range(1, 16):
        client = redis.Redis.from_url(f"{redis_url}/{number}")
        if client.set(OWNER_KEY, owner, nx=True, ex=3600):
            try:
                yield f"{redis_url}/{number}"
            finally:
                client.flushdb()
                client.close()
            return
        client.close()
    raise RuntimeError("every Redis database 1-15 is claimed by another test run")


@contextmanager
def scratch_database(backend: str, folder: Path, postgresql_url: str = POSTGRESQL_URL) -> Iterator[Engine]:
    """An empty database of `backend` (SQLite in `folder`, or a schema on the server) that is
    gone afterwards."""
    if backend == "sqlite":
        engine = engine_from_url(f"sqlite:///{folder / 'sdq.db'}")
        yield engine
        engine.dispose()
        return
    schema = f"sdq_test_{uuid.uuid4().hex[:16]}"
    admin = engine_from_url(postgresql_url)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = make_url(postgresql_url).update_query_dict({"options": (
        f"-csearch_path={schema} -cidle_in_transaction_session_timeout={STALL_S}s")})
    engine = engine_from_url(url)
    try:
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{STALL_S}s'")
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def in_queue(broker_url: str, queue: str) -> int:
    """Messages waiting in `queue`, at every priority level."""
    client = redis.Redis.from_url(broker_url)
    try:
        return sum(client.llen(name) for name in level_lists(queue))
    finally:
        client.close()


def clear_queues(broker_url: str, *queues: str) -> None:
    """Drop every message waiting in `queues`, at every priority level."""
    client = redis.Redis.from_url(broker_url)
    try:
        client.delete(*(name for queue in queues for name in level_lists(queue)))
    finally:
        client.close()
