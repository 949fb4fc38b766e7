"""The outage policy: storage and database failures are waited out within the window, then
reported as a TransientError; the item's own errors are never retried."""
from __future__ import annotations

import pytest
from sqlalchemy.exc import OperationalError

from sdq.images.storage import StorageError
from sdq.worker.outage import TransientError, retrying


def flaky(failures: list[BaseException]):  # type: ignore[no-untyped-def]
    """An action that raises each of `failures` in turn, then returns how often it ran."""
    tries: list[int] = []

    def action() -> int:
        tries.append(1)
        if len(tries) <= len(failures):
            raise failures[len(tries) - 1]
        return len(tries)
    return action


def test_an_outage_is_waited_out_and_the_action_runs_once_it_ends() -> None:
    assert retrying("storing images", flaky([StorageError("503 Slow Down")]), 60) == 2


def test_past_the_window_the_outage_is_reported_with_what_failed() -> None:
    refused = OperationalError("UPDATE items", {}, Exception("connection refused"))
    with pytest.raises(TransientError, match=r"^claiming items failed 1 times over 0s: .*connection refused"):
        retrying("claiming items", flaky([refused] * 5), 0)


def test_an_error_of_the_item_is_not_retried() -> None:
    with pytest.raises(ValueError, match="bad prompt"):
        retrying("storing images", flaky([ValueError("bad prompt")]), 60)
