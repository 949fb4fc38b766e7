"""The embedded database's full-text index works in the SQLite tools people point at it:
`sqlite-utils search` and Datasette's search box (migration 0003), and sdq's own search still
finds the rows indexed before the migration."""
from __future__ import annotations

import asyncio
from pathlib import Path

from click.testing import CliRunner
from datasette.app import Datasette
from sqlalchemy import select, text
from sqlalchemy.orm import Session
from sqlite_utils import Database
from sqlite_utils.cli import cli as sqlite_utils_cli

from sdq.db.fulltext import match_prompt, parse_query
from sdq.db.models import Item
from sdq.db.session import downgrade, upgrade
from tests.services import scratch_database


def sqlite_utils_search(path: Path, word: str) -> list[str]:
    result = CliRunner().invoke(sqlite_utils_cli, ["search", str(path), "items", word, "-c", "prompt",
                                                   "--csv", "--no-headers"])
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


def datasette_search(path: Path, word: str) -> list[str]:
    async def get() -> list[str]:
        response = await Datasette([str(path)]).client.get(
            f"/{path.stem}/items.json?_search={word}&_shape=objects&_col=prompt")
        assert response.status_code == 200, response.text
        return [row["prompt"] for row in response.json()["rows"]]
    return asyncio.run(get())


def sdq_search(session: Session, word: str) -> list[str]:
    """sdq's own prompt match, on the columns every revision has (the ORM's Item has the
    newest revision's)."""
    stmt, key = match_prompt(select(Item.prompt), "sqlite", parse_query(word))
    return list(session.scalars(stmt.order_by(key.desc()).limit(10)))


def add_job(session: Session, prompts: list[str]) -> None:
    """A job and its items, with the columns of revision 0001 only (these tests run the
    older revisions)."""
    job = session.execute(text(
        "INSERT INTO jobs (defaults, priority, tags, status, item_count, created_at) "
        "VALUES ('{}', 0, '[]', 'pending', :n, CURRENT_TIMESTAMP) RETURNING id"),
        {"n": len(prompts)}).scalar_one()
    for row, prompt in enumerate(prompts):
        session.execute(text(
            "INSERT INTO items (job_id, row_index, prompt, negative_prompt, seed, sampler, "
            "steps, cfg, eta, width, height, status, attempts, created_at) VALUES (:job, :row, "
            ":prompt, '', :row, 'euler', 20, 7.5, 0, 512, 512, 'pending', 0, CURRENT_TIMESTAMP)"),
            {"job": job, "row": row, "prompt": prompt})
    session.commit()


def test_sqlite_tools_search_the_index_kept_across_upgrade_and_downgrade(tmp_path: Path) -> None:
    path = tmp_path / "sdq.db"
    with scratch_database("sqlite", tmp_path) as engine:
        upgrade(engine, "0002")
        with Session(engine) as session:
            add_job(session, ["a red fox", "a lighthouse"])
        assert Database(path)["items"].detect_fts() is None  # the bug: 0001's quoting

        upgrade(engine, "0003")
        with Session(engine) as session:
            add_job(session, ["a fox in the snow"])  # indexed by the recreated triggers
            assert sdq_search(session, "fox") == ["a fox in the snow", "a red fox"]
        assert Database(path)["items"].detect_fts() == "items_fts"
        assert sqlite_utils_search(path, "fox") == ["a red fox", "a fox in the snow"]
        assert datasette_search(path, "lighthouse") == ["a lighthouse"]

        downgrade(engine, "0002")
        with Session(engine) as session:
            add_job(session, ["a fox cub"])
            assert sdq_search(session, "fox") == ["a fox cub", "a fox in the snow", "a red fox"]
