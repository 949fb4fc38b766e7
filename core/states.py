"""Where a job or an item stands: the states, by the names the database stores, the groups of
them that code asks about, and which changes of state are allowed.

The index carries out every change (`sdq.db.transitions`); each one is checked against the
tables here, so a change no table allows fails the first time it is tried instead of leaving
a row in a state nothing expects (a done item running again, a cancelled one queued).
"""
from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sdq.core.errors import Refused


class Status(str, enum.Enum):
    """Where a job or an item stands; stored as its lower-case value."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


WAITING = (Status.PENDING, Status.QUEUED)
"""Items no worker has taken yet: what reconcile enqueues again and cancel cancels."""
OPEN = (Status.PENDING, Status.QUEUED, Status.RUNNING)
"""Items left to run: a job's remaining work. A job none of whose items is open is over."""
FINISHED = (Status.DONE, Status.FAILED, Status.CANCELLED)
"""Items that will not run again (unless `retry` gives a failed one a fresh start)."""
ENDED = (Status.DONE, Status.FAILED)
"""What the runner concludes a job with once none of its items is open; cancelling or
resuming such a job leaves it as it is."""


class TransitionRefused(Refused):
    """A change of state that the tables below do not allow."""


@dataclass(frozen=True)
class Transitions:
    """The allowed changes of state of one kind of row: each state, the states it may take."""

    kind: str
    """The row, as messages name it ("a job")."""
    allowed: Mapping[Status, tuple[Status, ...]]

    def check(self, old: Status, new: Status) -> Status:
        """`new`, if a row in `old` may take it; else TransitionRefused naming both."""
        if new not in self.allowed[old]:
            raise TransitionRefused(f"{self.kind} cannot go from {old.value} to {new.value}")
        return new

    def sources(self, olds: Iterable[Status], new: Status) -> tuple[Status, ...]:
        """`olds`, each checked to be allowed to become `new`: the states a bulk UPDATE that
        sets `new` may match."""
        states = tuple(olds)
        for old in states:
            self.check(old, new)
        return states


ITEMS = Transitions("an item", {
    Status.PENDING: (Status.QUEUED, Status.RUNNING, Status.DONE, Status.FAILED, Status.CANCELLED),
    Status.QUEUED: (Status.RUNNING, Status.DONE, Status.FAILED, Status.CANCELLED),
    Status.RUNNING: (Status.RUNNING, Status.QUEUED, Status.DONE, Status.FAILED),
    Status.DONE: (),
    Status.FAILED: (Status.PENDING,),
    Status.CANCELLED: (),
})
"""An item is enqueued, taken by a worker (again, once its lease has expired), stored (or
reused from the result cache) or failed; a worker that stops hands it back (queued); a failed
one may be retried; a waiting one may be cancelled. Done and cancelled are for good."""

JOBS = Transitions("a job", {
    Status.PENDING: (Status.QUEUED, Status.RUNNING, Status.DONE, Status.FAILED, Status.CANCELLED),
    Status.QUEUED: (Status.QUEUED, Status.RUNNING, Status.DONE, Status.FAILED, Status.CANCELLED),
    Status.RUNNING: (Status.PENDING, Status.QUEUED, Status.RUNNING, Status.DONE, Status.FAILED,
                     Status.CANCELLED),
    Status.DONE: (Status.QUEUED,),
    Status.FAILED: (Status.QUEUED,),
    Status.CANCELLED: (Status.QUEUED, Status.RUNNING, Status.CANCELLED),
})
"""A job is enqueued (queued) or run in-process (running) when submitted, retried or resumed;
an interrupted in-process run hands it back (pending); the runner ends it (done or failed)
when none of its items is open; cancel ends it unless it ended already. Retry queues any job
again, an ended one included; cancelling a cancelled job again restamps it."""
