"""Where a job or an item stands: the states, by the names the database stores."""
from __future__ import annotations

import enum


class Status(str, enum.Enum):
    """Where a job or an item stands; stored as its lower-case value."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
