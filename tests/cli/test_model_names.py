"""A model registered with `sdq models add` is named by its name wherever a model is named:
`generate`, `submit`, `schedule add`, and a prompt file's `model` column, which then needs no
default model at all."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from sdq.db.models import Item, Model
from sdq.images.provenance import read_png_metadata

from .conftest import Home

SMALL = ["--width", "64", "--height", "64", "--steps", "1", "--sampler", "euler"]


@pytest.fixture
def named(home: Home, tiny_checkpoint: Path) -> Home:
    """A home with the tiny model registered as `tinyd`, and a default model that does not
    resolve (no such file, no network)."""
    added = home.run("models", "add", "tinyd", str(tiny_checkpoint))
    assert (added.exit_code, added.output.split(":")[0]) == (0, "tinyd"), added.output
    home.env["SDQ_MODEL"] = str(home.path / "gone.safetensors")
    return home


def model_names(home: Home, job_id: int) -> list[str]:
    with Session(home.engine) as session:
        return [session.get(Model, item.model_id).name
                for item in session.query(Item).filter(Item.job_id == job_id)]


def test_models_add_takes_the_name_first_or_as_an_option(home: Home, tiny_checkpoint: Path
                                                         ) -> None:
    first = home.run("models", "add", "tinyd", str(tiny_checkpoint), "--json")
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["name"] == "tinyd"
    option = home.run("models", "add", str(tiny_checkpoint), "--name", "tiny2")
    assert option.exit_code == 0 and option.output.startswith("tiny2: ")
    lone = home.run("models", "add", str(tiny_checkpoint))
    assert lone.exit_code == 2
    assert "sdq models add NAME REF" in lone.output and "--name NAME" in lone.output


def test_generate_takes_a_registered_name(named: Home, tiny_checkpoint: Path) -> None:
    out = named.path / "boat.png"
    result = named.run("generate", "a boat", "--model", "tinyd", *SMALL, "--seed", "3",
                       "-o", str(out))
    assert result.exit_code == 0, result.output
    assert read_png_metadata(out).provenance.model_sha256 == hashlib.sha256(
        tiny_checkpoint.read_bytes()).hexdigest()


def test_submit_takes_a_registered_name(named: Home) -> None:
    prompts = named.path / "p.txt"
    prompts.write_text("a boat\n")
    plan = named.run("submit", str(prompts), "--model", "tinyd", *SMALL, "--dry-run")
    assert plan.exit_code == 0, plan.output
    assert "tinyd" in plan.stdout
    result = named.run("submit", str(prompts), "--model", "tinyd", *SMALL, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["done"], model_names(named, record["job_id"])) == (1, ["tinyd"])
    unknown = named.run("submit", str(prompts), "--model", "tinyx", *SMALL, "--dry-run")
    assert unknown.exit_code == 3
    assert unknown.stderr == ("Error: --model: tinyx: no such checkpoint file or model folder, "
                              "nor a model name: `sdq models list` shows them, `sdq models add "
                              "NAME PATH` adds one\n")


def test_a_file_whose_rows_name_their_models_needs_no_default(named: Home) -> None:
    prompts = named.path / "p.csv"
    prompts.write_text("prompt,model\na boat,tinyd\na fox,tinyd\n")
    plan = named.run("submit", str(prompts), *SMALL, "--dry-run")
    assert plan.exit_code == 0, plan.output
    result = named.run("submit", str(prompts), *SMALL, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["done"], model_names(named, record["job_id"])) == (2, ["tinyd", "tinyd"])
    prompts.write_text("prompt,model\na boat,tinyd\na fox,\n")
    missing = named.run("submit", str(prompts), *SMALL)
    assert missing.exit_code == 3 and "gone.safetensors" in missing.stderr


def test_schedule_add_takes_a_registered_name(named: Home) -> None:
    prompts = named.path / "p.txt"
    prompts.write_text("a boat\n")
    added = named.run("schedule", "add", "nightly", "--cron", "0 2 * * *", str(prompts),
                      "--model", "tinyd", *SMALL)
    assert added.exit_code == 0, added.output
    ran = named.run("schedule", "run-now", "nightly", "--json")
    assert ran.exit_code == 0, ran.output
    assert model_names(named, json.loads(ran.stdout)["job"]) == ["tinyd"]
