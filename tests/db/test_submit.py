"""Bulk submit: every item in, exactly as given, or nothing at all."""
from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from sdq.db.models import SEED_LIMIT, Item, Job, Status
from sdq.db.queries import search_items, submit_job

from .helpers import spec

MANY = 20_000  # several insert chunks; the bench measures 100 000 per job


def count(session: Session, table: type) -> int:
    return session.scalar(select(func.count()).select_from(table))


def test_many_items_in_one_submit(session: Session) -> None:
    specs = (spec(f"prompt {n} of many", seed=n, tags=["bulk"] if n % 2 else None)
             for n in range(MANY))
    job = submit_job(session, Job(name="many", defaults={"steps": 20}, tags=["t"]), specs)
    session.commit()
    assert job.item_count == MANY == count(session, Item)
    last = session.scalars(select(Item).where(Item.row_index == MANY - 1)).one()
    assert (last.job_id, last.seed, last.prompt, last.status, last.attempts, last.tags) == (
        job.id, MANY - 1, f"prompt {MANY - 1} of many", Status.PENDING, 0, ["bulk"])
    assert last.created_at == job.created_at
    assert [i.row_index for i in search_items(session, text='"prompt 12345"').items] == [12345]


def test_item_fields_round_trip(session: Session) -> None:
    awkward = 'tab\there, newline\nthere, back\\slash, \\N, \\., "quotes", 🐉, ' + "é" * 900
    given = spec(awkward, negative_prompt="blurry\t\\N", seed=SEED_LIMIT - 1, sampler="dpmpp_2m",
                 steps=30, cfg=6.5, eta=0.25, width=768, height=640, tags=["a", "ü"], row_index=7)
    submit_job(session, Job(), [given])
    session.commit()
    item = session.scalars(select(Item)).one()
    assert {name: getattr(item, name) for name in given} == given
    assert item.negative_prompt == "blurry\t\\N"


@pytest.mark.parametrize("bad", [spec(seed=SEED_LIMIT), {"prompt": "no seed"}])
def test_a_failed_submit_leaves_nothing(session: Session, bad: dict) -> None:
    """The bad item comes last, after several chunks have reached the database."""
    specs = [spec(f"doomed {n}", seed=n) for n in range(MANY)] + [bad]
    with pytest.raises((IntegrityError, ValueError)):
        submit_job(session, Job(), specs)
    session.rollback()
    assert count(session, Job) == count(session, Item) == 0
    assert search_items(session, text="doomed").items == []


def test_unknown_and_missing_fields_are_named(session: Session) -> None:
    with pytest.raises(ValueError, match=r"item 1: unknown field\(s\) \['colour'\]; "
                                         r"missing field\(s\) \['seed'\]"):
        bad = spec(colour="red")
        del bad["seed"]
        submit_job(session, Job(), [spec(), bad])
