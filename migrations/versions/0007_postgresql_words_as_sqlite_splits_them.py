"""PostgreSQL: split prompts into words at ASCII punctuation, as SQLite's tokenizer does.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

PostgreSQL's text parser recognises tags, file paths, e-mail addresses, host names and
decimals, and indexes them whole or not at all: A1111's `<lora:add_detail:0.8>` was dropped as
an XML tag, `x/y.png` kept as one file token, so the same search found different items than on
SQLite, whose `unicode61` tokenizer splits at every punctuation character. The generated
column now reads the prompt with ASCII punctuation turned into spaces (`translate`, immutable
and locale-free), which makes both engines see the same words; the query side does the same
(`db.fulltext`). The column and its GIN index are rebuilt, which rewrites the items table once.
SQLite: no-op.
"""
from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PUNCTUATION = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


def _words(column: str) -> str:
    literal = PUNCTUATION.replace("'", "''")
    return f"translate({column}, '{literal}', '{' ' * len(PUNCTUATION)}')"


def _rebuild(expression: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX ix_items_prompt_tsv")
    op.execute("ALTER TABLE items DROP COLUMN prompt_tsv")
    op.execute("ALTER TABLE items ADD COLUMN prompt_tsv tsvector"
               f" GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, {expression})) STORED")
    op.execute("CREATE INDEX ix_items_prompt_tsv ON items USING gin (prompt_tsv)")


def upgrade() -> None:
    _rebuild(_words("prompt"))


def downgrade() -> None:
    _rebuild("prompt")
