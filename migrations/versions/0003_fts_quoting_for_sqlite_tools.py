"""SQLite: declare the full-text table as `content="items"` so sqlite-utils and Datasette find it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

sqlite-utils (`sqlite-utils search`, `Table.search`) and Datasette's search box look for an
FTS table by matching its CREATE statement against `content="items"` or `content=[items]`;
0001 wrote `content='items'`, which SQLite reads the same but neither tool recognises ("Table
'items' is not configured for full-text search"). FTS5 options cannot be altered, so the table
is dropped and created again with the same columns, tokenizer and triggers, and its index is
rebuilt from items.prompt (external content: the text itself was never stored twice, so
nothing is lost). The rebuild reads every prompt once. PostgreSQL has no such table: no-op.
"""
from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TRIGGERS = ("items_fts_insert", "items_fts_delete", "items_fts_update")


def _fts(quote: str) -> list[str]:
    """The FTS5 table and triggers of 0001, the table's options quoted with `quote`."""
    def q(word: str) -> str:
        return f"{quote}{word}{quote}"

    return [
        "CREATE VIRTUAL TABLE items_fts USING fts5(prompt, "
        f"content={q('items')}, content_rowid={q('id')}, "
        f"tokenize={q('unicode61 remove_diacritics 0')})",
        "CREATE TRIGGER items_fts_insert AFTER INSERT ON items BEGIN"
        " INSERT INTO items_fts(rowid, prompt) VALUES (new.id, new.prompt); END",
        "CREATE TRIGGER items_fts_delete AFTER DELETE ON items BEGIN"
        " INSERT INTO items_fts(items_fts, rowid, prompt) VALUES ('delete', old.id, old.prompt); END",
        "CREATE TRIGGER items_fts_update AFTER UPDATE OF prompt ON items BEGIN"
        " INSERT INTO items_fts(items_fts, rowid, prompt) VALUES ('delete', old.id, old.prompt);"
        " INSERT INTO items_fts(rowid, prompt) VALUES (new.id, new.prompt); END",
        "INSERT INTO items_fts(items_fts) VALUES ('rebuild')",
    ]


def _recreate(quote: str) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for trigger in TRIGGERS:
        op.execute(f"DROP TRIGGER {trigger}")
    op.execute("DROP TABLE items_fts")
    for statement in _fts(quote):
        op.execute(statement)


def upgrade() -> None:
    _recreate('"')


def downgrade() -> None:
    _recreate("'")
