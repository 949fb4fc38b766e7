"""The outage policy: storage and database failures are waited out, never charged to an item."""
from __future__ import annotations

from sqlalchemy.exc import DisconnectionError, OperationalError

from sdq.images.storage import StorageError

BACKOFF_S = 0.5
BACKOFF_CAP_S = 30.0
"""Longest wait between two tries during an outage: a service back after a long cut is used
within this long."""
OUTAGE_S = 1800.0
"""How long storage or the database may stay down before a runner hands its items back
(`SDQ_OUTAGE_TIMEOUT`): long enough for a restart or a failover, never a reason to fail them."""
TRANSIENT = (StorageError, OperationalError, DisconnectionError)
"""Infrastructure failures, waited out: storage and database down or refusing. They never count
as an attempt of an item. Anything else is the item's (or the model's) own failure."""


class TransientError(RuntimeError):
    """Storage or database stayed down for the whole outage window; the unfinished items
    were handed back (queued, the attempt not counted) so that a later delivery takes them."""
