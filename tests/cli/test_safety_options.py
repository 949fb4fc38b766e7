"""`--safety-checker PATH|off` and `--on-flag` on generate, submit and schedule add, and the
SDQ_SAFETY_CHECKER setting (or the config file's `safety_checker`) they default to."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from sdq.db.models import Item, Job
from sdq.sdmodel.modelfiles import CheckpointError
from sdq.sdmodel.safety import load_safety_checker
from sdq.images.provenance import read_png_metadata, verify_png
from sdq.images.storage import open_storage
from sdq.jobs.submit import job_safety_checker
from sdq.core.settings import Settings

from .conftest import Home

SMALL = ["--width", "64", "--height", "64", "--steps", "1", "--sampler", "euler"]


def test_the_setting_comes_from_the_environment_or_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('safety_checker = "/models/sd15"\n')
    assert Settings.load({"SDQ_CONFIG": str(config)}).safety_checker == "/models/sd15"
    assert Settings.load({"SDQ_CONFIG": str(config), "SDQ_SAFETY_CHECKER": "off"}).safety_checker is None
    assert Settings.load({"SDQ_CONFIG": str(tmp_path / "none.toml")}).safety_checker is None


def test_generate_drops_or_blacks_flagged_images(tmp_path: Path, home: Home, tiny_checkpoint: Path,
                                                 flag_all_checker: Path) -> None:
    out = tmp_path / "x.png"
    args = ["generate", "a cat", "--model", str(tiny_checkpoint), *SMALL, "-n", "2", "-o", str(out),
            "--safety-checker", str(flag_all_checker)]
    dropped = home.run(*args, "--on-flag", "drop", "--json")
    assert dropped.exit_code == 0, dropped.output
    report = json.loads(dropped.stdout)
    assert [(e["path"], e["safety"]["flagged"], e["safety"]["action"]) for e in report["images"]] == [
        (None, True, "dropped")] * 2
    assert not list(tmp_path.glob("x*.png"))

    blacked = home.run(*args, "--on-flag", "black")
    assert blacked.exit_code == 0 and "flagged by the safety checker: blacked" in blacked.output
    for path in (tmp_path / "x-0.png", tmp_path / "x-1.png"):
        assert not np.asarray(Image.open(path)).any()
        assert read_png_metadata(path).provenance.safety.action == "blacked"
        assert verify_png(path.read_bytes()).ok

    unchecked = home.run("generate", "a cat", "--model", str(tiny_checkpoint), *SMALL, "-o", str(out))
    assert unchecked.exit_code == 0 and read_png_metadata(out).provenance.safety is None


def test_submit_records_the_checker_and_on_flag_on_the_job(tmp_path: Path, home: Home,
                                                           tiny_checkpoint: Path,
                                                           flag_all_checker: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    home.env["SDQ_SAFETY_CHECKER"] = str(flag_all_checker)  # the default ...
    result = home.run("submit", str(prompts), "--model", str(tiny_checkpoint), *SMALL,
                      "--on-flag", "black", "--json")
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout)["job_id"]
    off = home.run("submit", str(prompts), "--model", str(tiny_checkpoint), *SMALL,
                   "--safety-checker", "off", "--json")  # ... and how to turn it off
    assert off.exit_code == 0, off.output
    second = json.loads(off.stdout)["job_id"]
    with Session(home.engine) as session:
        jobs = {job.id: (job.safety_checker, job.on_flag) for job in session.scalars(select(Job))}
        items = {item.job_id: item for item in session.scalars(select(Item))}
    assert jobs == {first: (str(flag_all_checker.resolve()), "black"), second: (None, "keep")}
    assert (items[first].safety_flagged, items[first].safety_action) == (True, "blacked")
    assert (items[second].safety_flagged, items[second].safety_action) == (None, None)
    storage = open_storage(str(home.path / "home" / "images"))
    assert not np.asarray(Image.open(io.BytesIO(storage.get(items[first].image_key)))).any()

    missing = home.run("submit", str(prompts), "--model", str(tiny_checkpoint), *SMALL,
                       "--safety-checker", str(tmp_path / "nope"))
    assert missing.exit_code == 2
    assert f"--safety-checker: {tmp_path / 'nope'}: no such safety checker folder" in missing.output


def test_schedule_add_keeps_the_options_and_its_runs_use_them(tmp_path: Path, home: Home,
                                                              tiny_checkpoint: Path,
                                                              flag_all_checker: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    result = home.run("schedule", "add", "nightly", "--cron", "0 2 * * *", str(prompts), "--model",
                      str(tiny_checkpoint), *SMALL, "--safety-checker", str(flag_all_checker),
                      "--on-flag", "drop")
    assert result.exit_code == 0, result.output
    [record] = json.loads(home.run("schedule", "list", "--json").output)
    assert (record["options"]["safety_checker"], record["options"]["on_flag"]) == (
        str(flag_all_checker.resolve()), "drop")
    run = home.run("schedule", "run-now", "nightly", "--json")
    assert run.exit_code == 0, run.output
    with Session(home.engine) as session:
        item = session.scalars(select(Item)).one()
        assert (item.job.safety_checker, item.job.on_flag) == (str(flag_all_checker.resolve()), "drop")
    assert (item.safety_action, item.image_key) == ("dropped", None)
    off = home.run("schedule", "add", "other", "--cron", "0 3 * * *", str(prompts), "--model",
                   str(tiny_checkpoint), *SMALL, "--safety-checker", "off")
    assert off.exit_code == 0, off.output
    assert {r["name"]: r["options"].get("safety_checker") for r in
            json.loads(home.run("schedule", "list", "--json").output)}["other"] == "off"


def test_the_checker_reference_a_job_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A local folder as its absolute path (workers load it from there), a repo id as given,
    `off` as none; anything else is refused before a job is recorded."""
    (tmp_path / "sc").mkdir()
    monkeypatch.chdir(tmp_path)
    assert job_safety_checker("sc", None) == str(tmp_path / "sc")
    assert job_safety_checker(None, "CompVis/stable-diffusion-safety-checker") == \
        "CompVis/stable-diffusion-safety-checker"
    assert job_safety_checker("off", "/elsewhere") is None
    assert job_safety_checker(None, None) is None
    with pytest.raises(ValueError, match="missing/sc: no such safety checker folder"):
        job_safety_checker("./missing/sc", None)


def test_a_repo_id_without_a_network_is_one_clear_error() -> None:
    """Tests never reach the hub (HF_HUB_OFFLINE): a repo id not in the cache fails by name."""
    with pytest.raises(CheckpointError, match="nobody/no-such-checker: no such safety checker folder, "
                                              "and not a Hugging Face repo id in the cache or reachable"):
        load_safety_checker("nobody/no-such-checker")


@pytest.mark.parametrize("command", [["generate", "a cat"], ["submit", "--prompt", "a cat", "--dry-run"]])
@pytest.mark.parametrize("checker", [[], ["--safety-checker", "off"]])
def test_on_flag_without_a_checker_is_refused(home: Home, tiny_checkpoint: Path,
                                              command: list[str], checker: list[str]) -> None:
    """`--on-flag drop` promises what only a checker does: without one it would do nothing."""
    result = home.run(*command, "--model", str(tiny_checkpoint), *SMALL, "--on-flag", "drop",
                      *checker)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1] == (
        "Error: Invalid value for '--on-flag': 'drop' needs a safety checker "
        "(--safety-checker PATH, or SDQ_SAFETY_CHECKER); without one no image is checked")
