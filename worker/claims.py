"""Claiming items: leases, the thread that renews them, and the claimed item as plain data."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Iterable

from sqlalchemy import update
from sqlalchemy.exc import OperationalError

from sdq.core.params import BatchShape, GenerationParams
from sdq.db.base import utcnow
from sdq.db.models import Item, Status

if TYPE_CHECKING:
    from sdq.worker.runner import Runner

log = logging.getLogger(__name__)

LEASE_S = 120
"""How long a claim lasts without renewal: the longest a redelivered batch whose worker died
waits before taking the items over. Capped by the broker's visibility timeout, so a lost
machine's items are free by the time its message comes back."""


@dataclass(frozen=True)
class Work:
    """A claimed item as plain data, so threads never share ORM objects."""

    id: int
    job_id: int
    row_index: int
    params: GenerationParams
    attempt: int
    safety_checker: str | None = None
    """The job's checker (a folder or hub id), None for no check."""
    on_flag: str = "keep"

    @property
    def shape(self) -> BatchShape:
        """What items must share to be denoised in one batch."""
        return self.params.shape


def leased(status: Status, lease_expires_at: Any, now: Any) -> bool:
    """Running under a lease that has not run out: its holder may be alive."""
    return status == Status.RUNNING and lease_expires_at is not None and lease_expires_at > now


class LeaseKeeper(threading.Thread):
    """Renews the leases of the items a runner holds, every third of the lease."""

    def __init__(self, runner: Runner) -> None:
        super().__init__(name="sdq-lease", daemon=True)
        self.runner = runner
        self.ids: set[int] = set()
        self.stopped = threading.Event()

    def hold(self, ids: Iterable[int]) -> None:
        self.ids.update(ids)

    def __enter__(self) -> "LeaseKeeper":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.join(timeout=30)

    def run(self) -> None:
        while not self.stopped.wait(self.runner.lease_s / 3):
            ids = list(self.ids)
            if not ids:
                continue
            try:
                with self.runner.sessions.begin() as session:
                    session.execute(
                        update(Item).where(Item.id.in_(ids), Item.status == Status.RUNNING,
                                           Item.worker_host == self.runner.worker_name)
                        .values(lease_expires_at=utcnow() + timedelta(seconds=self.runner.lease_s)))
            except OperationalError as exc:  # the next renewal may get through; the lease has slack
                log.warning("lease renewal failed: %s", exc)
