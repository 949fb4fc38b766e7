"""Nightly runs that grow a dataset: seed policies over two simulated days, and the export of
every run of a schedule as one dataset."""
from __future__ import annotations

from datetime import date
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from sqlalchemy.orm import Session

from sdq.cli.main import cli
from sdq.core.jobspec import JobSpec
from sdq.db.models import Job
from sdq.db.session import open_database
from sdq.jobs.schedule import add_schedule, run_schedule
from sdq.jobs.templates import Expansion, parse_grid
from sdq.core.settings import Settings
from sdq.worker.factory import runner_from_settings

from .conftest import job_items

DAYS = (date(2026, 12, 1), date(2026, 12, 2))
FILE = b'{"prompt": "a {red|blue} boat"}\n'


def two_nights(settings: Settings, model: Path, policy: str) -> list[list]:
    """Schedule FILE with `policy`, run it on two days (no clock, no sleeping); each day's items."""
    engine = open_database(settings.database_url)
    spec = JobSpec(model=str(model), seed_policy=policy,
                   defaults={"steps": 1, "width": 64, "height": 64, "sampler": "euler"},
                   expansion=Expansion(grid=parse_grid(["cfg=5,7"])).to_json())
    with Session(engine) as session:
        add_schedule(session, name="boats", cron="0 2 * * *", source="boats.jsonl", data=FILE,
                     spec=spec)
        session.commit()
    runs = [run_schedule(settings, "boats", day, make_runner=runner_from_settings) for day in DAYS]
    assert [run.items for run in runs] == [4, 4]
    return [job_items(engine, run.job_id) for run in runs]


def seeds(items: list) -> list[tuple[str, float, int]]:
    return [(i.prompt, i.cfg, i.seed) for i in items]


def test_same_seeds_each_night_reuses_the_first_nights_images(
        embedded: Settings, tiny_checkpoint: Path, embedded_env: dict[str, str],
        tmp_path: Path) -> None:
    first, second = two_nights(embedded, tiny_checkpoint, "same")
    assert seeds(first) == seeds(second)
    assert [i.reused_from for i in second] == [i.id for i in first]
    assert first[0].seed == first[1].seed != first[2].seed  # grid cells share a seed
    assert first[2].template_values == {"v1": "blue", "cfg": 5.0}

    out = tmp_path / "dataset"
    args = ["export", "--schedule", "boats", "--format", "parquet", "--card", "-o", str(out)]
    result = CliRunner().invoke(cli, args, env=embedded_env)
    assert result.exit_code == 0, result.output
    assert "4 image(s) in 1 shard(s)" in result.output  # each image once, not once per night
    table = pq.read_table(out / "data").to_pylist()
    assert [row["id"] for row in table] == [i.id for i in first]
    assert table[3]["template"] == "a {red|blue} boat"
    assert table[3]["template_values"] == '{"v1": "blue", "cfg": 7.0}'
    card = (out / "README.md").read_text()
    assert "sdq schedule `boats`" in card and "2 run(s), 2026-12-01 to 2026-12-02" in card
    assert "Seed policy `same`" in card and "grid: cfg = 5.0, 7.0" in card
    assert "a {red|blue} boat" in card and "(4) are left out" in card
    again = CliRunner().invoke(cli, args, env=embedded_env)  # resumable: nothing rewritten
    assert "1 already there" in again.output, again.output


@pytest.mark.parametrize("policy", ["fresh", "add"])
def test_fresh_and_add_make_new_images_each_night(
        embedded: Settings, tiny_checkpoint: Path, policy: str) -> None:
    first, second = two_nights(embedded, tiny_checkpoint, policy)
    assert {i.reused_from for i in first + second} == {None}
    assert [(p, c) for p, c, _ in seeds(first)] == [(p, c) for p, c, _ in seeds(second)]
    with Session(open_database(embedded.database_url)) as session:
        bases = [session.get(Job, items[0].job_id).defaults["base_seed"]
                 for items in (first, second)]
    if policy == "add":  # the second night moves every seed on by the night's two images
        assert [s + 2 for _, _, s in seeds(first)] == [s for _, _, s in seeds(second)]
        assert bases[0] == bases[1]
    else:
        assert bases[0] != bases[1]
        assert [s - bases[1] for _, _, s in seeds(second)] == [s - bases[0] for _, _, s in seeds(first)]
