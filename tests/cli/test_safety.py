"""What users do with the safety checker's verdicts: find flagged images, export without them,
count them per job, see them in the gallery; on SQLite and PostgreSQL."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from sqlalchemy import update
from sqlalchemy.orm import Session

from sdq.db.models import Item

from .conftest import Home


def test_search_flagged_and_not_flagged(any_home: Home) -> None:
    job = any_home.add_job(["a", "b", "c", "d"], done=4)
    any_home.judge(job.id, {0: True, 1: False, 2: True})  # row 3: never checked
    ids = {r["row"]: r["id"] for r in json.loads(any_home.run("search", "--json").output)}

    def rows(*args: str) -> list[int]:
        result = any_home.run("search", "--job", str(job.id), *args, "--json")
        assert result.exit_code == 0, result.output
        return sorted(r["row"] for r in json.loads(result.output))

    assert rows("--flagged") == [0, 2]
    assert rows("--not-flagged") == [1]
    assert rows() == [0, 1, 2, 3]
    record = json.loads(any_home.run("search", "--flagged", "--json").output)[0]
    assert record["safety_flagged"] is True and record["safety_action"] == "kept"
    assert record["safety_concept_scores"][0] == 0.012 and len(record["safety_special_scores"]) == 3
    table = any_home.run("search", "--job", str(job.id)).output.splitlines()
    assert "safety" in table[0].split()
    assert [line for line in table if f"{ids[3]} " in line][0].count("not checked") == 1


def test_export_exclude_flagged(any_home: Home, tmp_path: Path) -> None:
    job = any_home.add_job(["a red fox", "a red cat", "a red cow"], done=3)
    any_home.judge(job.id, {0: True, 1: False})
    out = tmp_path / "out"
    result = any_home.run("export", str(job.id), "--format", "parquet", "--exclude-flagged",
                          "-o", str(out))
    assert result.exit_code == 0, result.output
    rows = pq.read_table(out).to_pylist()
    assert sorted((r["row"], r["safety_flagged"]) for r in rows) == [(1, False), (2, None)]
    by_query = tmp_path / "query"
    result = any_home.run("export", "--query", "red", "--format", "imagefolder",
                          "--exclude-flagged", "-o", str(by_query))
    assert result.exit_code == 0, result.output
    metadata = pq.read_table(by_query / "metadata.parquet").to_pylist()
    assert sorted((m["row"], m["safety_flagged"]) for m in metadata) == [(1, False), (2, None)]


def test_status_and_jobs_count_flagged_images(any_home: Home, tmp_path: Path) -> None:
    checked = any_home.add_job(["a", "b", "c"], done=3, safety_checker=str(tmp_path / "sc"),
                               on_flag="black")
    any_home.judge(checked.id, {0: True, 1: True, 2: False}, action="blacked")
    unchecked = any_home.add_job(["d"], done=1)
    report = json.loads(any_home.run("status", str(checked.id), "--json").output)
    assert (report["flagged"], report["on_flag"]) == (2, "black")
    text = any_home.run("status", str(checked.id)).output
    assert "safety checker: 2 flagged (on flag: black)" in text
    assert "safety checker: none (images not checked)" in any_home.run("status", str(unchecked.id)).output
    listed = {r["id"]: r["flagged"] for r in json.loads(any_home.run("jobs", "--json").output)}
    assert listed == {checked.id: 2, unchecked.id: 0}
    # An image without a verdict in a checked job (reused before checks entered the cache
    # key) is counted as not checked, never as checked and clean (issue 25.1).
    with Session(any_home.engine) as session:
        session.execute(update(Item).where(Item.job_id == checked.id, Item.row_index == 2).values(
            safety_flagged=None, safety_scores=None, safety_checker_sha256=None, safety_action=None))
        session.commit()
    text = any_home.run("status", str(checked.id)).output
    assert "safety checker: 2 flagged (on flag: black), 1 not checked (reused before checks " \
           "entered the cache key)" in text
    assert json.loads(any_home.run("status", str(checked.id), "--json").output)["not_checked"] == 1


def test_gallery_and_sheet_show_the_flag_and_skip_dropped_images(home: Home, tmp_path: Path) -> None:
    job = home.add_job(["a cat", "a dog", "a cow"], done=3)
    home.judge(job.id, {0: True, 1: False})
    result = home.run("gallery", str(job.id), "-o", str(tmp_path / "g"))
    assert result.exit_code == 0, result.output
    page = (tmp_path / "g" / "index.html").read_text()
    assert page.count("flagged (kept)") == 1 and page.count("passed") == 1
    assert page.count("not checked") == 1
    with home.engine.begin() as connection:  # row 0 dropped: done, no image
        connection.execute(update(Item).where(Item.job_id == job.id, Item.row_index == 0)
                           .values(image_key=None, image_sha256=None, safety_action="dropped"))
    result = home.run("sheet", str(job.id), "-o", str(tmp_path / "s.png"))
    assert result.exit_code == 0 and "2 image(s)" in result.output
    got = home.run("get", "--job", str(job.id), "-o", str(tmp_path / "got"))
    assert got.exit_code == 0 and "dropped by the safety checker" in got.stderr


def test_reproduce_says_why_a_blacked_or_dropped_image_cannot_be_compared(home: Home) -> None:
    job = home.add_job(["a", "b"], done=2)
    home.judge(job.id, {0: True}, action="blacked")
    home.judge(job.id, {1: True}, action="dropped")
    with home.engine.begin() as connection:
        connection.execute(update(Item).where(Item.job_id == job.id, Item.row_index == 1)
                           .values(image_key=None, image_sha256=None))
    ids = {r["row"]: r["id"] for r in json.loads(home.run("search", "--json").output)}
    blacked = home.run("reproduce", str(ids[0]))
    assert blacked.exit_code == 1 and "blacked out by the safety checker" in blacked.output
    dropped = home.run("reproduce", str(ids[1]))
    assert dropped.output == f"Error: item {ids[1]} has no stored image (status done, dropped by the safety checker)\n"
    verified = home.run("verify", str(ids[1]))
    assert verified.exit_code == 1 and "image dropped by the safety checker" in verified.output
