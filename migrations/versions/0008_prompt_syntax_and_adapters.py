"""Prompt syntax, clip skip and the adapters (LoRAs, embeddings) of each item.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

Columns only, each nullable or with a server default, so no table is rebuilt (SQLite's full-text
triggers stay):
- items.prompt_syntax: how the prompt is read (`a1111` or `plain`); rows already there were made
  reading their prompts literally, so the server default makes them `plain`, and `reproduce` and
  `verify` still make their images byte for byte. New rows are written with their request's
  value;
- items.clip_skip: A1111's numbering, 1 (CLIP's last layer) for rows already there;
- items.loras: the LoRAs applied, [{name, weight, sha256}], null for none;
- items.embeddings: the textual-inversion embeddings the prompts used, [{name, sha256}], null
  for none.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("items", sa.Column("prompt_syntax", sa.String(length=8),
                                     server_default="plain", nullable=False))
    op.add_column("items", sa.Column("clip_skip", sa.Integer(), server_default="1",
                                     nullable=False))
    op.add_column("items", sa.Column("loras", sa.JSON(), nullable=True))
    op.add_column("items", sa.Column("embeddings", sa.JSON(), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN, on SQLite too (3.35+): batch mode would rebuild items and
    # drop the full-text triggers with it.
    for column in ("embeddings", "loras", "clip_skip", "prompt_syntax"):
        op.drop_column("items", column)
