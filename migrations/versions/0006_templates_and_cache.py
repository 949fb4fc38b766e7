"""Templates and the result cache: what an item was expanded from, and the image it reused.

Revision ID: 0006
Revises: 0003
Create Date: 2026-12-02

Columns only (every one nullable or with a server default, so no table is rebuilt, on SQLite
either) and indexes:
- items.template, items.template_values: the prompt template a row was expanded from and the
  values chosen for the item (JSON, by label);
- items.cache_key: sha256 of everything that decides the pixels (`params.cache_key`), set by
  the runner when it takes the item; indexed where set, for the cache lookup;
- items.reused_from: the item whose image this one reuses (null: generated here); no foreign
  key, so that purging the item that made an image leaves the rows reusing it intact;
- jobs.reuse: false when submitted with `--no-reuse`;
- the unique image key index now covers the items that made their image only: items reusing
  it point at the same object.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def partial(condition: str) -> dict[str, sa.TextClause]:
    return {"postgresql_where": sa.text(condition), "sqlite_where": sa.text(condition)}


def upgrade() -> None:
    op.add_column("items", sa.Column("template", sa.Text(), nullable=True))
    op.add_column("items", sa.Column("template_values", sa.JSON(), nullable=True))
    op.add_column("items", sa.Column("cache_key", sa.String(length=64), nullable=True))
    op.add_column("items", sa.Column("reused_from", sa.BigInteger(), nullable=True))
    op.add_column("jobs", sa.Column("reuse", sa.Boolean(), server_default=sa.true(),
                                    nullable=False))
    op.create_index("ix_items_cache_key", "items", ["cache_key"],
                    **partial("cache_key IS NOT NULL"))
    op.create_index("ix_items_reused_from", "items", ["reused_from"],
                    **partial("reused_from IS NOT NULL"))
    op.drop_index("ix_items_image_key", "items")
    op.create_index("ix_items_image_key", "items", ["image_key"], unique=True,
                    **partial("image_key IS NOT NULL AND reused_from IS NULL"))


def downgrade() -> None:
    # Rows that reuse an image would break the old unique index: they lose their image.
    op.execute("UPDATE items SET image_key = NULL WHERE reused_from IS NOT NULL")
    op.drop_index("ix_items_image_key", "items")
    op.create_index("ix_items_image_key", "items", ["image_key"], unique=True,
                    **partial("image_key IS NOT NULL"))
    op.drop_index("ix_items_reused_from", "items")
    op.drop_index("ix_items_cache_key", "items")
    # ALTER TABLE ... DROP COLUMN, on SQLite too (3.35+): batch mode would rebuild items and
    # drop the full-text triggers with it.
    op.drop_column("jobs", "reuse")
    for column in ("reused_from", "cache_key", "template_values", "template"):
        op.drop_column("items", column)
