"""Filters, paging, progress counts and batches."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session

from sdq.db.models import Item, Job, Model, Status
from sdq.db.queries import batch_items, search_items, status_counts, submit_job

from .helpers import add_job, spec

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def ids(items: list[Item]) -> list[int]:
    return [item.id for item in items]


@pytest.fixture
def two_jobs(session: Session) -> tuple[Job, Job]:
    """An older and a newer job of three items each (seeds 0, 1, 2), all prompts with "fox"."""
    old = add_job(session, ["a red fox", "a grey fox", "a fox cub"], created_at=T0)
    new = add_job(session, ["a red fox", "two foxes", "a fox den"],
                  created_at=T0 + timedelta(days=1))
    return old, new


def test_newest_first(session: Session, two_jobs: tuple[Job, Job]) -> None:
    found = search_items(session).items
    assert ids(found) == sorted(ids(found), reverse=True)
    assert [item.job_id for item in found] == [two_jobs[1].id] * 3 + [two_jobs[0].id] * 3


def test_by_seed(session: Session, two_jobs: tuple[Job, Job]) -> None:
    found = search_items(session, seed=1).items
    assert [(i.job_id, i.seed) for i in found] == [(two_jobs[1].id, 1), (two_jobs[0].id, 1)]


def test_by_job_status_and_time(session: Session, two_jobs: tuple[Job, Job]) -> None:
    old, new = two_jobs
    session.execute(update(Item).where(Item.row_index == 2).values(status=Status.FAILED))
    assert {i.job_id for i in search_items(session, job_id=old.id).items} == {old.id}
    assert len(search_items(session, status=Status.FAILED).items) == 2
    assert len(search_items(session, since=T0 + timedelta(hours=1)).items) == 3
    before_new = search_items(session, until=T0 + timedelta(hours=1)).items
    assert {i.job_id for i in before_new} == {old.id}
    assert len(search_items(session, since=T0, until=T0 + timedelta(days=2)).items) == 6


def test_by_model_name_or_hash_prefix(session: Session, two_jobs: tuple[Job, Job]) -> None:
    model = Model(name="sd-v1-5", sha256="ab" * 32, architecture="sd-v1")
    other = Model(name="tiny", sha256="cd" * 32, architecture="sd-v1")
    session.add_all([model, other])
    session.flush()
    session.execute(update(Item).where(Item.job_id == two_jobs[0].id).values(model_id=model.id))
    assert model.short_hash == "ab" * 5
    for reference in ("sd-v1-5", "abab", "ABABABAB", "a"):
        assert {i.job_id for i in search_items(session, model=reference).items} == {two_jobs[0].id}
    for reference in ("%", "sd-v1", "abc", "tiny"):
        assert search_items(session, model=reference).items == []


def test_filters_combine(session: Session, two_jobs: tuple[Job, Job]) -> None:
    old, new = two_jobs
    session.execute(update(Item).where(Item.row_index == 0).values(status=Status.DONE))
    found = search_items(session, text="red fox", seed=0, job_id=new.id, status=Status.DONE,
                         since=T0 + timedelta(hours=1))
    assert [(item.job_id, item.prompt) for item in found.items] == [(new.id, "a red fox")]
    assert search_items(session, text="red fox", seed=1).items == []


@pytest.mark.parametrize(("text", "sizes"), [(None, [2, 2, 2]), ("fox", [2, 2, 1])])
def test_keyset_pages(
    session: Session, two_jobs: tuple[Job, Job], text: str | None, sizes: list[int]
) -> None:
    everything = ids(search_items(session, text=text, limit=100).items)
    pages, before = [], None
    while True:
        page = search_items(session, text=text, limit=2, before=before)
        pages.append(ids(page.items))
        if page.next_before is None:
            break
        before = page.next_before
    assert [item for page in pages for item in page] == everything
    assert [len(page) for page in pages] == sizes  # "two foxes" has no word "fox"


def test_a_full_last_page_says_it_is_last(session: Session, two_jobs: tuple[Job, Job]) -> None:
    page = search_items(session, limit=6)
    assert len(page.items) == 6 and page.next_before is None


def test_limit_must_be_positive(session: Session) -> None:
    with pytest.raises(ValueError, match="limit"):
        search_items(session, limit=0)


def test_status_counts(session: Session) -> None:
    job = add_job(session, ["a", "b", "c", "d"])
    session.execute(update(Item).where(Item.row_index < 2).values(status=Status.DONE))
    session.execute(update(Item).where(Item.row_index == 2).values(status=Status.FAILED))
    counts = status_counts(session, job.id)
    assert counts == {Status.PENDING: 1, Status.QUEUED: 0, Status.RUNNING: 0, Status.DONE: 2,
                      Status.FAILED: 1, Status.CANCELLED: 0}
    assert sum(status_counts(session, job.id + 1).values()) == 0


def test_batch_items_in_position_order(session: Session) -> None:
    job = submit_job(session, Job(), [spec(seed=n) for n in range(5)])
    for row, position in ((4, 0), (1, 1), (3, 2)):
        session.execute(update(Item).where(Item.job_id == job.id, Item.row_index == row)
                        .values(batch_id="b-1", batch_position=position))
    assert [item.row_index for item in batch_items(session, "b-1")] == [4, 1, 3]
    assert batch_items(session, "b-2") == []


def test_by_template_values(session: Session) -> None:
    """Submitted with the values (COPY on PostgreSQL, INSERT on SQLite), found by them."""
    specs = [spec(f"a {color} fox", seed=n) | {"template": "a {red|blue} fox",
                                          "template_values": {"v1": color, "cfg": cfg}}
             for n, (color, cfg) in enumerate([("red", 5.0), ("blue", 5.0), ("blue", 7.5)])]
    job = submit_job(session, Job(), specs + [spec("plain", seed=9)])
    session.commit()

    def found(**values: str) -> list[str]:
        return [i.prompt for i in search_items(session, job_id=job.id, values=values).items]

    assert found(v1="blue") == ["a blue fox", "a blue fox"]
    assert found(v1="blue", cfg="7.5") == ["a blue fox"]
    assert found(cfg="5.0") == ["a blue fox", "a red fox"]
    assert found(v1="green") == []
    assert session.get(Item, search_items(session, values={"cfg": "7.5"}).items[0].id
                       ).template_values == {"v1": "blue", "cfg": 7.5}
