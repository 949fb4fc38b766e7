"""Job and item states: the names the database stores, the groups code asks about, and which
changes of state are allowed."""
from __future__ import annotations

import pytest

from sdq.core.states import ENDED, FINISHED, ITEMS, JOBS, OPEN, WAITING, Status, TransitionRefused


def test_states_are_stored_by_their_lower_case_names() -> None:
    assert [s.value for s in Status] == ["pending", "queued", "running", "done", "failed",
                                         "cancelled"]


def test_the_groups_split_the_states_as_their_names_say() -> None:
    assert set(OPEN) | set(FINISHED) == set(Status) and not set(OPEN) & set(FINISHED)
    assert set(WAITING) == set(OPEN) - {Status.RUNNING}
    assert set(ENDED) == set(FINISHED) - {Status.CANCELLED}


@pytest.mark.parametrize(("old", "new"), [
    (Status.PENDING, Status.QUEUED), (Status.QUEUED, Status.RUNNING),
    (Status.RUNNING, Status.RUNNING), (Status.RUNNING, Status.QUEUED),
    (Status.RUNNING, Status.DONE), (Status.QUEUED, Status.DONE), (Status.RUNNING, Status.FAILED),
    (Status.FAILED, Status.PENDING), (Status.QUEUED, Status.CANCELLED),
])
def test_items_take_the_steps_of_the_queue(old: Status, new: Status) -> None:
    assert ITEMS.check(old, new) is new


@pytest.mark.parametrize(("old", "new"), [
    (Status.DONE, Status.RUNNING), (Status.DONE, Status.PENDING),
    (Status.CANCELLED, Status.QUEUED), (Status.RUNNING, Status.CANCELLED),
    (Status.FAILED, Status.DONE), (Status.QUEUED, Status.PENDING),
])
def test_an_item_never_leaves_done_or_cancelled_nor_is_a_running_one_cancelled(
        old: Status, new: Status) -> None:
    message = f"an item cannot go from {old.value} to {new.value}"
    with pytest.raises(TransitionRefused, match=message):
        ITEMS.check(old, new)


def test_every_finished_state_is_final_but_a_failed_items_retry() -> None:
    for state in FINISHED:
        assert set(ITEMS.allowed[state]) <= {Status.PENDING}


def test_jobs_are_retried_from_any_state_and_ended_ones_only_so() -> None:
    assert JOBS.sources(Status, Status.QUEUED) == tuple(Status)
    for state in ENDED:
        assert JOBS.allowed[state] == (Status.QUEUED,)
    # The runner ends any job not finished yet (pending, queued or running).
    assert JOBS.sources(OPEN, Status.DONE) == OPEN
    with pytest.raises(TransitionRefused, match="a job cannot go from failed to cancelled"):
        JOBS.sources((Status.RUNNING, Status.FAILED), Status.CANCELLED)


def test_only_an_interrupted_run_hands_its_job_back_to_pending() -> None:
    assert [s for s in Status if Status.PENDING in JOBS.allowed[s]] == [Status.RUNNING]
