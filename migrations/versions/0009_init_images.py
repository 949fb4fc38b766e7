"""Image-to-image in the queue: init images, stored once by content, and each item's start.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

- init_images: one row per distinct init image file, named by the sha256 of its bytes; the file
  is stored under `init_key(sha256)` (content-addressed, so a folder submitted every night is
  stored once), with its pixel size and byte count as read at submit;
- items.init_sha256: the init image an img2img item starts from (null: text-to-image); indexed
  where set, for purge (which keeps an init image while any item points at it) and search. No
  foreign key, as for reused_from: SQLite cannot add one without rebuilding items, which would
  drop its full-text triggers, and one schema serves both databases;
- items.init_source: the name it was given (a file name, an `s3://` URL or `item:ID`);
- items.strength: the denoising strength, in (0, 1]; null for text-to-image.

Columns only on items (each nullable), so no table is rebuilt and SQLite's full-text triggers
stay.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "init_images",
        sa.Column("sha256", sa.String(length=64), primary_key=True),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.add_column("items", sa.Column("init_sha256", sa.String(length=64), nullable=True))
    op.add_column("items", sa.Column("init_source", sa.Text(), nullable=True))
    op.add_column("items", sa.Column("strength", sa.Float(), nullable=True))
    op.create_index("ix_items_init_sha256", "items", ["init_sha256"],
                    postgresql_where=sa.text("init_sha256 IS NOT NULL"),
                    sqlite_where=sa.text("init_sha256 IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("ix_items_init_sha256", "items")
    for column in ("strength", "init_source", "init_sha256"):
        op.drop_column("items", column)
    op.drop_table("init_images")
