"""The safety checker: what a job asks for, and each image's verdict.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Columns only, all added in place (no table is rebuilt, on SQLite either):
- jobs.safety_checker: the checker the job runs (a folder or a hub id), null for none;
- jobs.on_flag: what becomes of a flagged image: keep, black or drop (existing jobs: keep);
- items.safety_flagged: true or false once checked, null when no check ran;
- items.safety_scores: the concept and special-care scores (JSON), null when unchecked;
- items.safety_checker_sha256: the checker that judged the image;
- items.safety_action: kept, blacked or dropped, null when unchecked.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None



def _columns() -> list[tuple[str, sa.Column]]:
    """(table, column) to add, made afresh per call: a Column belongs to one table."""
    return [
        ("jobs", sa.Column("safety_checker", sa.Text(), nullable=True)),
        ("jobs", sa.Column("on_flag", sa.String(length=8), server_default="keep", nullable=False)),
        ("items", sa.Column("safety_flagged", sa.Boolean(), nullable=True)),
        ("items", sa.Column("safety_scores", sa.JSON(), nullable=True)),
        ("items", sa.Column("safety_checker_sha256", sa.String(length=64), nullable=True)),
        ("items", sa.Column("safety_action", sa.String(length=8), nullable=True)),
    ]


def upgrade() -> None:
    for table, column in _columns():
        op.add_column(table, column)


def downgrade() -> None:
    # SQLite (3.35+) drops a column in place when no index or constraint names it.
    for table, column in reversed(_columns()):
        op.drop_column(table, column.name)
