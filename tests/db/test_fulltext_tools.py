"""The embedded database's full-text index works in the SQLite tools people point at it:
`sqlite-utils search` and Datasette's search box (migration 0003), and sdq's own search still
finds the rows indexed before the migration."""
from __future__ import annotations

import asyncio
from pathlib import Path

from click.testing import CliRunner
from datasette.app import Datasette
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlite_utils import Database
from sqlite_utils.cli import cli as sqlite_utils_cli

from sdq.db.fulltext import match_prompt, parse_query
from sdq.db.models import Item
from sdq.db.session import downgrade, upgrade
from tests.services import scratch_database

from .helpers import add_job_as_of_0001


def sqlite_utils_search(path: Path, word: str) -> list[str]:
    result = CliRunner().invoke(sqlite_utils_cli, ["search", str(path), "items", word, "-c", "prompt",
                                                   "--csv", "--no-headers"])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def datasette_search(path: Path, word: str) -> list[str]:
    async def get() -> list[str]:
        # No SQL threads: Datasette has no way to stop its thread pool and write thread.
        response = await Datasette([str(path)], settings={"num_sql_threads": 0}).client.get(
            f"/{path.stem}/items.json?_search={word}&_shape=objects&_col=prompt")
        assert response.status_code == 200, response.text
        return [row["prompt"] for row in response.json()["rows"]]
    return asyncio.run(get())


def sdq_search(session: Session, word: str) -> list[str]:
    """sdq's own prompt match, on the columns every revision has (the ORM's Item has the
    newest revision's)."""
    stmt, key = match_prompt(select(Item.prompt), "sqlite", parse_query(word))
    return list(session.scalars(stmt.order_by(key.desc()).limit(10)))


def test_sqlite_tools_search_the_index_kept_across_upgrade_and_downgrade(tmp_path: Path) -> None:
    path = tmp_path / "sdq.db"
    with scratch_database("sqlite", tmp_path) as engine:
        upgrade(engine, "0002")
        with Session(engine) as session:
            add_job_as_of_0001(session, ["a red fox", "a lighthouse"])
        assert Database(path)["items"].detect_fts() is None  # the bug: 0001's quoting

        upgrade(engine, "0003")
        with Session(engine) as session:
            add_job_as_of_0001(session, ["a fox in the snow"])  # indexed by the recreated triggers
            assert sdq_search(session, "fox") == ["a fox in the snow", "a red fox"]
        assert Database(path)["items"].detect_fts() == "items_fts"
        assert sqlite_utils_search(path, "fox") == ["a red fox", "a fox in the snow"]
        assert datasette_search(path, "lighthouse") == ["a lighthouse"]

        downgrade(engine, "0002")
        with Session(engine) as session:
            add_job_as_of_0001(session, ["a fox cub"])
            assert sdq_search(session, "fox") == ["a fox cub", "a fox in the snow", "a red fox"]
