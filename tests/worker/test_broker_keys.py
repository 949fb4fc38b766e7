"""Upgrading a broker that an sdq release with the ":" separator wrote: waiting messages keep
their priority order and publishing works again."""
from __future__ import annotations

from kombu import Connection, Exchange, Queue

from sdq.core.jobspec import PRIORITIES
from sdq.jobs.broker import broker_priority
from sdq.worker.broker_keys import upgrade_broker_keys
from tests.services import clear_queues, in_queue

QUEUE = "sdq.0123456789"


def connection(broker_url: str, **options: object) -> Connection:
    return Connection(broker_url, transport_options={"priority_steps": list(PRIORITIES), **options})


def publish(conn: Connection, body: str, priority: int) -> None:
    queue = Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE)
    conn.Producer().publish(body, exchange=queue.exchange, routing_key=QUEUE, declare=[queue],
                            priority=broker_priority(priority), serializer="json")


def drain(conn: Connection) -> list[str]:
    taken: list[str] = []
    with conn.SimpleQueue(Queue(QUEUE, Exchange(QUEUE, type="direct"), routing_key=QUEUE)) as queue:
        while len(taken) < 10:
            try:
                message = queue.get(timeout=1)
            except queue.Empty:
                return taken
            taken.append(message.payload)
            message.ack()
    return taken


def test_old_separator_keys_are_renamed_and_keep_their_order(redis_db: str) -> None:
    clear_queues(redis_db, QUEUE)
    with connection(redis_db, sep=":") as old:
        for body, priority in [("low-1", 0), ("top-1", 9), ("low-2", 0), ("top-2", 9)]:
            publish(old, body, priority)
    # Priority 9 is level 0, the bare list; priority 0 sat in the old "sdq.…:9".
    assert upgrade_broker_keys(redis_db) == 2
    assert upgrade_broker_keys(redis_db) == 0
    assert in_queue(redis_db, QUEUE) == 4
    with connection(redis_db) as new:
        publish(new, "low-3", 0)  # routed by the binding table the old release wrote
        assert drain(new) == ["top-1", "top-2", "low-1", "low-2", "low-3"]
