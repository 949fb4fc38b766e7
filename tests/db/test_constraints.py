"""What the schema refuses: the guarantees completion idempotency and reproducibility rest on."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, func, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, StatementError
from sqlalchemy.orm import Session

from sdq.db.models import SEED_LIMIT, Item, Job, Model
from sdq.db.queries import search_items, submit_job

from .helpers import add_job, add_schedule, spec


def test_an_item_row_is_completed_once(session: Session) -> None:
    job = add_job(session, ["a fox"])
    session.add(Item(job_id=job.id, row_index=0, **spec("a fox again")))
    with pytest.raises(IntegrityError):
        session.commit()


def test_duplicate_rows_in_one_submit_are_refused(session: Session) -> None:
    with pytest.raises(IntegrityError):
        submit_job(session, Job(), [spec(row_index=3), spec(row_index=3)])


def test_an_image_key_belongs_to_one_item(session: Session) -> None:
    job = add_job(session, ["a fox", "a hare"])
    session.execute(update(Item).where(Item.row_index == 0).values(image_key=f"{job.id}/0.png"))
    with pytest.raises(IntegrityError):
        session.execute(update(Item).where(Item.row_index == 1).values(image_key=f"{job.id}/0.png"))


@pytest.mark.parametrize("seed", [-1, SEED_LIMIT])
def test_seeds_outside_32_bits_are_refused(session: Session, seed: int) -> None:
    with pytest.raises(IntegrityError):
        submit_job(session, Job(), [spec(seed=seed)])


def test_seed_range_ends_are_kept(session: Session) -> None:
    job = submit_job(session, Job(), [spec(seed=0), spec(seed=SEED_LIMIT - 1)])
    session.commit()
    seeds = session.scalars(select(Item.seed).where(Item.job_id == job.id).order_by(Item.seed))
    assert list(seeds) == [0, SEED_LIMIT - 1]


def test_a_schedule_runs_once_a_day(session: Session) -> None:
    schedule = add_schedule(session)
    session.add(Job(schedule_id=schedule.id, run_day=date(2026, 1, 1)))
    session.add(Job(schedule_id=schedule.id, run_day=date(2026, 1, 2)))
    session.commit()
    session.add(Job(schedule_id=schedule.id, run_day=date(2026, 1, 1)))
    with pytest.raises(IntegrityError):
        session.commit()


def test_a_schedule_that_has_run_is_kept(session: Session) -> None:
    schedule = add_schedule(session)
    session.add(Job(schedule_id=schedule.id, run_day=date(2026, 1, 1)))
    session.commit()
    session.delete(schedule)
    with pytest.raises(IntegrityError):
        session.commit()


def test_a_run_day_needs_a_schedule(session: Session) -> None:
    session.add(Job(run_day=date(2026, 1, 1)))
    with pytest.raises(IntegrityError):
        session.commit()


def test_items_need_an_existing_job(session: Session) -> None:
    session.add(Item(job_id=999_999, row_index=0, **spec()))
    with pytest.raises(IntegrityError):
        session.commit()


def test_unknown_statuses_are_refused(session: Session) -> None:
    add_job(session, ["a fox"])
    with pytest.raises(IntegrityError):
        session.execute(text("UPDATE items SET status = 'lost'"))


def test_deleting_a_job_deletes_its_items_and_their_index(session: Session) -> None:
    job = add_job(session, ["a lonely fox"])
    session.delete(job)
    session.commit()
    assert session.scalars(select(Item)).all() == []
    assert search_items(session, text="lonely").items == []


def test_timestamps_come_back_as_utc(session: Session) -> None:
    paris = timezone(timedelta(hours=2))
    job = add_job(session, ["a fox"], created_at=datetime(2026, 6, 1, 12, 0, 0, 123456, paris))
    session.expire_all()
    created = session.get(Job, job.id).created_at
    assert created == datetime(2026, 6, 1, 10, 0, 0, 123456, timezone.utc)
    assert created.tzinfo == timezone.utc


def test_naive_timestamps_are_refused(session: Session) -> None:
    session.add(Job(created_at=datetime(2026, 6, 1, 12, 0)))
    with pytest.raises(StatementError, match="naive datetime"):
        session.flush()


def _add_model(session: Session) -> Model:
    model = Model(sha256="ab" * 32, name="fixture", architecture="sd1")
    session.add(model)
    session.flush()
    return model


def test_items_need_an_existing_model(session: Session) -> None:
    with pytest.raises(IntegrityError, match="fk_items_model_id_models|FOREIGN KEY"):
        submit_job(session, Job(), [spec(model_id=999_999)])


def test_a_bulk_submit_keeps_its_references(session: Session) -> None:
    model = _add_model(session)
    job = submit_job(session, Job(), [spec(seed=n, model_id=model.id) for n in range(500)])
    session.commit()
    assert session.scalar(select(func.count()).where(Item.job_id == job.id, Item.model_id == model.id)) == 500


def test_a_model_that_items_name_cannot_be_deleted(session: Session) -> None:
    model = _add_model(session)
    submit_job(session, Job(), [spec(model_id=model.id)])
    session.commit()
    with pytest.raises(IntegrityError):
        session.execute(delete(Model).where(Model.id == model.id))


@pytest.mark.parametrize("change", [{"model_id": 999_999}, {"job_id": 999_999}])
def test_an_item_cannot_point_at_a_missing_job_or_model(session: Session, change: dict[str, int]) -> None:
    add_job(session, ["a fox"])
    with pytest.raises(IntegrityError):
        session.execute(update(Item).values(**change))


@pytest.mark.parametrize("table", [Job, Model])
def test_referenced_ids_do_not_change(session: Session, table: type[Job] | type[Model]) -> None:
    model = _add_model(session)
    submit_job(session, Job(), [spec(model_id=model.id)])
    session.commit()
    with pytest.raises(IntegrityError):
        session.execute(update(table).values(id=table.id + 1000))


# SQLite has one writer at a time: there is no concurrent delete to race there.
@pytest.mark.parametrize("migrated_engine", ["postgresql"], indirect=True)
def test_a_job_is_not_deleted_under_a_submit_still_adding_to_it(migrated_engine: Engine) -> None:
    """The submitting transaction holds the job as a foreign key would: a delete waits for it,
    then takes the new items with the job."""
    with Session(migrated_engine) as setup:
        job_id = add_job(setup, ["a fox"]).id
    try:
        with Session(migrated_engine) as adding, Session(migrated_engine) as deleting:
            adding.add(Item(job_id=job_id, row_index=1, **spec("a hare")))
            adding.flush()
            deleting.execute(text("SET lock_timeout = '200ms'"))
            with pytest.raises(OperationalError, match="lock timeout"):
                deleting.execute(delete(Job).where(Job.id == job_id))
            deleting.rollback()
            adding.commit()
            deleting.execute(delete(Job).where(Job.id == job_id))
            deleting.commit()
            assert deleting.scalar(select(func.count()).select_from(Item)) == 0
    finally:
        with migrated_engine.begin() as connection:
            connection.execute(delete(Job))
