"""Five-field cron expressions, read without loading Celery: the grammar and meaning of
Celery's `crontab` (which the scheduler process uses; a test checks they agree), so listing
or adding a schedule stays a light command.

Each field is a comma-separated list of `*`, `N`, `A-B` (wrapping past the end, as in
`fri-mon`) or either with a `/STEP`; numbers may be written as month or weekday names
(`jan`, `mon`, ... first three letters count). Weekdays run 0-6 from Sunday.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

_NAMES = {name: n for n, name in enumerate(
    ("sun", "mon", "tue", "wed", "thu", "fri", "sat"))} | {name: n + 1 for n, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"))}
_PART = re.compile(r"(?:(?P<star>\*)|(?P<first>\w+?)(?:-(?P<last>\w+))?)(?:/(?P<step>\w+))?")


@dataclass(frozen=True)
class Cron:
    """The values each field allows."""

    minute: frozenset[int]
    hour: frozenset[int]
    day_of_month: frozenset[int]
    month_of_year: frozenset[int]
    day_of_week: frozenset[int]


FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day_of_month", 1, 31),
          ("month_of_year", 1, 12), ("day_of_week", 0, 6))
"""Each field's name and its smallest and largest value, in the order they are written."""


def parse_cron(expression: str) -> Cron:
    """A five-field cron expression, or ValueError saying which field is wrong and why."""
    fields = expression.split()
    if len(fields) != len(FIELDS):
        raise ValueError(f"cron {expression!r}: expected 5 fields (minute hour day-of-month "
                         f"month day-of-week), got {len(fields)}")
    try:
        values = [_field(text, low, high) for text, (_, low, high) in zip(fields, FIELDS)]
    except ValueError as exc:
        raise ValueError(f"cron {expression!r}: {exc}") from None
    return Cron(*values)


_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
"""The most days each month has (February's leap day included)."""


def parse_firing_cron(expression: str) -> Cron:
    """`parse_cron` for a schedule about to be stored: also a ValueError if the expression
    names no date that exists (`0 2 31 2 *`, `0 0 30 feb *`), which would be accepted and
    never run. Every existing month and day falls on every weekday in some year (the
    Gregorian calendar repeats every 400 years), so weekdays never make a schedule
    impossible, however rare they make it."""
    cron = parse_cron(expression)
    if not any(day <= _DAYS_IN_MONTH[month - 1]
               for month in cron.month_of_year for day in cron.day_of_month):
        raise ValueError(f"cron {expression!r}: never fires: no month it names has the days "
                         "of the month it names")
    return cron


def _field(text: str, low: int, high: int) -> frozenset[int]:
    allowed: set[int] = set()
    for part in text.split(","):
        match = _PART.fullmatch(part)
        if match is None:
            raise ValueError(f"cannot read {part!r}")
        if match["star"]:
            values = list(range(low, high + 1))
        else:
            first = _number(match["first"], low, high)
            last = first if match["last"] is None else _number(match["last"], low, high)
            values = list(range(first, last + 1)) if first <= last else \
                list(range(first, high + 1)) + list(range(low, last + 1))
        if match["step"] is not None:
            if not match["step"].isdigit() or int(match["step"]) < 1:
                raise ValueError(f"step {match['step']!r} is not a whole number from 1")
            values = values[::int(match["step"])]
        allowed.update(values)
    return frozenset(allowed)


def _number(text: str, low: int, high: int) -> int:
    if text.isdigit():
        number = int(text)
    elif text[:3].lower() in _NAMES:
        number = _NAMES[text[:3].lower()]
    else:
        raise ValueError(f"{text!r} is neither a number nor a month or weekday name")
    if not low <= number <= high:
        raise ValueError(f"{number} {'>' if number > high else '<'} {high if number > high else low}")
    return number
