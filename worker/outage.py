"""The outage policy: storage and the database going away is infrastructure, never an item's
fault. Such failures are retried with capped exponential backoff for as long as the outage
window lasts; no item is failed or charged an attempt for them. Past the window the caller
hands its items back (queued, the attempt given back) for a later delivery."""
from __future__ import annotations

import logging
import time
from itertools import count
from typing import Callable, TypeVar

from sqlalchemy.exc import DisconnectionError, OperationalError

from sdq.images.storage import StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKOFF_S = 0.5
BACKOFF_CAP_S = 30.0
"""Longest wait between two tries during an outage: a service back after a long cut is used
within this long."""
TRANSIENT = (StorageError, OperationalError, DisconnectionError)
"""Infrastructure failures, waited out: storage and database down or refusing. They never count
as an attempt of an item. Anything else is the item's (or the model's) own failure."""


class TransientError(RuntimeError):
    """Storage or database stayed down for the whole outage window; the unfinished items
    were handed back (queued, the attempt not counted) so that a later delivery takes them."""


def retrying(what: str, action: Callable[[], T], window_s: float) -> T:
    """`action`, retried on infrastructure failures with exponential backoff capped at
    BACKOFF_CAP_S, for as long as the outage window (`window_s`) lasts; then TransientError.
    The window, not a number of tries, bounds it: a database restart or an S3 outage of
    minutes is waited out."""
    deadline = time.monotonic() + window_s
    for attempt in count(1):
        try:
            return action()
        except TRANSIENT as exc:
            wait = min(BACKOFF_CAP_S, BACKOFF_S * 2 ** (attempt - 1))
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransientError(f"{what} failed {attempt} times over "
                                     f"{window_s:.0f}s: {exc}") from exc
            log.warning("%s failed (try %d, %.0fs of the outage window left), retrying: %s",
                        what, attempt, left, exc)
            time.sleep(min(wait, left))
    raise AssertionError("unreachable")
