"""Full-text search on prompts, one behaviour on two engines.

PostgreSQL indexes a generated `tsvector` column (`to_tsvector('simple', prompt)`, GIN);
SQLite an FTS5 external-content table (`unicode61`, diacritics kept, like `simple`) kept in step
by triggers. Both are created by the initial migration and live outside the ORM metadata,
since neither can be declared portably; `is_fulltext_object` tells Alembic to leave them be.

The user's text is never handed to either query language. It is split into terms: "quoted
phrases" and bare words, all of which must match. A term with a letter or digit becomes a
phrase of its tokens (PostgreSQL `phraseto_tsquery`, an FTS5 string); a term without any (an
emoji, `%`, `--`) is dropped by both tokenizers, so it is matched as a plain substring instead.

Both engines see the same words: SQLite's `unicode61` splits at every punctuation character,
and PostgreSQL's column (migration 0004) and queries read the text with ASCII punctuation
turned into spaces, so that its parser's tags, file names, hosts and decimals
(`<lora:add_detail:0.8>`, `x/y.png`, `0.8`) become plain words there too.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Select, column, func, literal_column, table

from .models import Item

PG_TSV_COLUMN = "prompt_tsv"
PG_TSV_INDEX = "ix_items_prompt_tsv"
SQLITE_FTS_TABLE = "items_fts"

_TERM = re.compile(r'"([^"]*)"?|(\S+)')
PUNCTUATION = string.punctuation
"""ASCII punctuation: a word boundary on both engines (PostgreSQL's column, migration 0004,
folds the same characters)."""
_AS_SPACES = str.maketrans(PUNCTUATION, " " * len(PUNCTUATION))
_pg_tsv: ColumnElement[Any] = literal_column(f"items.{PG_TSV_COLUMN}")
_fts = table(SQLITE_FTS_TABLE, column("rowid"))


def is_fulltext_object(name: str | None, type_: str) -> bool:
    """Whether a reflected schema object belongs to the full-text machinery above."""
    if name is None:
        return False
    return (
        (type_ == "column" and name == PG_TSV_COLUMN)
        or (type_ == "index" and name == PG_TSV_INDEX)
        or (type_ == "table" and name.startswith(SQLITE_FTS_TABLE))
    )


@dataclass(frozen=True)
class TextQuery:
    """A parsed search: every phrase and every substring must occur in the prompt."""

    phrases: tuple[str, ...] = ()
    substrings: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.phrases or self.substrings)

    @property
    def has_multiword_phrase(self) -> bool:
        """Whether some phrase has words that must be adjacent (which planners misjudge)."""
        return any(len(words(phrase).split()) > 1 for phrase in self.phrases)


def words(text: str) -> str:
    """`text` with ASCII punctuation as spaces: the words both engines index."""
    return text.translate(_AS_SPACES)


def parse_query(text: str) -> TextQuery:
    """Split user input into phrases (quoted, or single words) and substring terms.

    An unterminated quote runs to the end of the input rather than being an error: search
    boxes should forgive.
    """
    phrases: list[str] = []
    substrings: list[str] = []
    for quoted, word in _TERM.findall(text):
        term = (word or quoted).strip()
        if term:
            (phrases if any(ch.isalnum() for ch in term) else substrings).append(term)
    return TextQuery(tuple(phrases), tuple(substrings))


def match_prompt(
    stmt: Select[Any], dialect: str, query: TextQuery
) -> tuple[Select[Any], ColumnElement[int]]:
    """Restrict `stmt` (a select of items) to prompts matching `query`.

    Returns the statement and the id column to order and page by: on SQLite that is the FTS
    table's rowid, so FTS5 walks its index newest-first and stops at the page size instead of
    collecting every match of a common word first.
    """
    key: ColumnElement[int] = Item.id.expression
    if query.phrases and dialect == "postgresql":
        tsquery: ColumnElement[Any] | None = None
        for phrase in query.phrases:
            part = func.phraseto_tsquery(literal_column("'simple'::regconfig"), words(phrase))
            tsquery = part if tsquery is None else tsquery.op("&&")(part)
        stmt = stmt.where(_pg_tsv.op("@@")(tsquery))
    elif query.phrases:  # SQLite, the only other database sdq opens
        expression = " ".join('"' + p.replace('"', '""') + '"' for p in query.phrases)
        stmt = (
            stmt.select_from(_fts)
            .join(Item, Item.id == _fts.c.rowid)
            .where(literal_column(SQLITE_FTS_TABLE).op("MATCH")(expression))
        )
        key = _fts.c.rowid
    for substring in query.substrings:
        stmt = stmt.where(Item.prompt.contains(substring, autoescape=True))
    return stmt, key
