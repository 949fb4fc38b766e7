"""sdq reads cron expressions without Celery; it must read them exactly as Celery's crontab
does, since `sdq scheduler` runs on Celery beat and stored schedules were checked by it."""
from __future__ import annotations

import re

import pytest
from celery.schedules import ParseException, crontab

from sdq.jobs.cron import parse_cron, parse_firing_cron

ACCEPTED = [
    "0 2 * * *", "*/15 * * * *", "15,45 4,9 * * mon-fri", "0 0 29 2 *", "5 4 * * sun",
    "0 22 * * fri-mon", "0-30/10 1-23/2 1-31/7 */3 *", "0 0 1 jan,jul *", "0 12 * * Sunday",
    "59 23 31 12 6", "0 0 * * 0", "1,2,3 */100 * * sat",
]


@pytest.mark.parametrize("expression", ACCEPTED)
def test_the_values_are_celerys(expression: str) -> None:
    minute, hour, day_of_month, month, day_of_week = expression.split()
    reference = crontab(minute=minute, hour=hour, day_of_month=day_of_month,
                        month_of_year=month, day_of_week=day_of_week)
    cron = parse_cron(expression)
    assert (cron.minute, cron.hour, cron.day_of_month, cron.month_of_year, cron.day_of_week) == (
        reference.minute, reference.hour, reference.day_of_month, reference.month_of_year,
        reference.day_of_week)


@pytest.mark.parametrize(("expression", "reason"), [
    ("61 2 * * *", "61 > 59"),
    ("0 25 * * *", "25 > 23"),
    ("0 0 0 * *", "0 < 1"),
    ("0 0 * 13 *", "13 > 12"),
    ("0 0 * * 7", "7 > 6"),
    ("0 2 * * funday", "'funday' is neither a number"),
    ("*/0 * * * *", "step '0'"),
    ("1,,2 * * * *", "cannot read ''"),
])
def test_what_celery_refuses_is_refused_with_the_reason(expression: str, reason: str) -> None:
    minute, hour, day_of_month, month, day_of_week = expression.split()
    with pytest.raises((ValueError, ParseException)):
        crontab(minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month,
                day_of_week=day_of_week)
    with pytest.raises(ValueError, match=f"^cron {re.escape(repr(expression))}: .*{re.escape(reason)}"):
        parse_cron(expression)


def test_five_fields_are_needed() -> None:
    with pytest.raises(ValueError, match="expected 5 fields .*, got 4"):
        parse_cron("0 2 * *")


@pytest.mark.parametrize("expression", ["0 2 31 2 *", "0 0 30 feb *", "0 0 31 apr,jun,sep,nov *",
                                        "0 0 30,31 2 mon"])
def test_a_cron_that_names_no_date_never_fires_and_is_refused(expression: str) -> None:
    parse_cron(expression)  # Celery accepts it, and would wait for ever
    with pytest.raises(ValueError, match=f"^cron {re.escape(repr(expression))}: never fires"):
        parse_firing_cron(expression)


@pytest.mark.parametrize("expression", ["0 0 29 2 *", "0 0 29 2 mon", "0 0 30,31 2,4 *",
                                        "0 0 31 * *"])
def test_a_rare_cron_still_fires(expression: str) -> None:
    """29 February falls on a Monday in 2044: every day that exists meets every weekday."""
    assert parse_firing_cron(expression) == parse_cron(expression)
