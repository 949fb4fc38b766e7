"""Named groups of job and item states (the values `db.models.Status` stores), so that a rule
such as "finished" is spelled once."""
from __future__ import annotations

FINISHED = frozenset({"done", "failed", "cancelled"})
"""States nothing changes any more: an item here is never claimed, failed or handed back."""
OPEN_ITEM = frozenset({"pending", "queued", "running"})
"""Item states still to run: a job with an item here is not finished."""
