"""The declarative base and the column types every table shares.

Constraint names come from one naming convention so that migrations can refer to them (drop,
alter) by a stable name on every database instead of a name the server happened to invent.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, MetaData
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# 64-bit ids on servers; on SQLite only INTEGER PRIMARY KEY aliases the rowid (and so
# autoincrements and keys the FTS index), and SQLite integers are 64-bit anyway.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp, stored as UTC.

    SQLite has no timestamp type and drops the offset, so values are normalised to UTC on the
    way in and given back as UTC-aware datetimes on both databases; that keeps comparisons and
    time-range filters identical everywhere. Naive datetimes are refused: their meaning depends
    on the machine that made them.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware value")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def utcnow() -> datetime:
    """The current time as an aware UTC datetime (the default of every timestamp column)."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    """Base class of the sdq tables."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
