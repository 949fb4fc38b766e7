"""`sdq models`, `sdq config` and `sdq doctor`: the registry, the settings, what is reachable."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from sdq.core.settings import mask_url
from tests.conftest import stand_in_checkpoint

from .conftest import Home


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """A stand-in checkpoint: the registry only checks the header and hashes the file, it
    never loads it."""
    return stand_in_checkpoint(tmp_path / "v1-5.safetensors")


def test_add_list_and_remove_a_model(any_home: Home, weights: Path) -> None:
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    added = any_home.run("models", "add", str(weights), "--name", "sd15")
    assert added.exit_code == 0, added.output
    assert added.output == f"sd15: {sha[:10]} ({weights})\n"
    assert json.loads(any_home.run("models", "add", str(weights), "--name", "sd15b", "--json")
                      .output)["sha256"] == sha
    listed = json.loads(any_home.run("models", "list", "--json").output)
    assert [(m["name"], m["sha256"], m["items"]) for m in listed] == [("sd15b", sha, 0)]
    table = any_home.run("models", "list").output.splitlines()
    assert table[0].split() == ["name", "hash", "items", "source", "added"]
    assert table[1].split()[:3] == ["sd15b", sha[:10], "0"]
    removed = any_home.run("models", "remove", sha[:8])
    assert removed.exit_code == 0 and removed.output == f"removed sd15b ({sha[:10]})\n"
    any_home.run("models", "add", str(weights), "--name", "sd15c")
    assert json.loads(any_home.run("models", "remove", "sd15c", "--json").output) == {
        "removed": "sd15c", "sha256": sha}
    assert any_home.run("models", "list").stderr.startswith("no models yet")


def test_model_registry_refusals(home: Home, weights: Path, tmp_path: Path) -> None:
    home.add_job(["a"])  # registers "tiny", used by one item
    other = tmp_path / "other.safetensors"
    stand_in_checkpoint(other, 1.0)
    home.run("models", "add", str(weights), "--name", "sd15")
    taken = home.run("models", "add", str(other), "--name", "sd15")
    assert taken.exit_code == 1 and "the name 'sd15' is taken by model" in taken.output
    used = home.run("models", "remove", "tiny")
    assert used.exit_code == 1
    assert used.output.startswith("Error: model 'tiny' (abababab") and "1 item(s)" in used.output
    missing = home.run("models", "remove", "nope")
    assert missing.exit_code == 3 and missing.output == "Error: no model named 'nope'\n"
    absent = home.run("models", "add", str(tmp_path / "gone.safetensors"), "--name", "x")
    assert absent.exit_code == 3 and "no such checkpoint file" in absent.output
    assert home.run("models", "add", str(weights)).exit_code == 2


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("sqlite:////tmp/sdq.db", "sqlite:////tmp/sdq.db"),
        ("postgresql://sdq:hunter2@db/sdq", "postgresql://sdq:***@db/sdq"),
        ("redis://:hunter2@queue:6379/0", "redis://:***@queue:6379/0"),
        ("postgresql://sdq@db/sdq?sslmode=require&password=hunter2",
         "postgresql://sdq@db/sdq?sslmode=require&password=***"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("postgresql://postgres:Leak@Leak@db:5432/sdq", "postgresql://postgres:***@db:5432/sdq"),
        ("host=db user=sdq password=hunter2 dbname=sdq", "host=db user=sdq password=*** dbname=sdq"),
        ("host=db password='a b\\' c' dbname=sdq", "host=db password=*** dbname=sdq"),
        ("/data/images", "/data/images"),
    ],
)
def test_mask_url(url: str, masked: str) -> None:
    assert mask_url(url) == masked


def test_a_password_with_an_unencoded_at_never_leaks(home: Home) -> None:
    """A password with `@` used to be cut at its first `@`, the rest taken for the host and
    shown in every connection error; a libpq DSN was shown as written."""
    home.env["SDQ_DATABASE_URL"] = "postgresql://postgres:Leak@Leak@127.0.0.1:1/sdq"
    for args in (["doctor"], ["jobs"], ["db", "current"], ["config"], ["status", "1"]):
        result = home.run(*args)
        assert "Leak" not in result.output, (args, result.output)
        assert "postgresql://postgres:***@127.0.0.1:1/sdq" in result.output, (args, result.output)
    home.env["SDQ_DATABASE_URL"] = "host=db user=sdq password=hunter2 dbname=sdq"
    shown = home.run("config")
    assert "hunter2" not in shown.output and "password=***" in shown.output


def test_config_shows_the_mode_and_masks_secrets(home: Home) -> None:
    plain = home.run("config")
    assert plain.exit_code == 0
    assert "mode                embedded" in plain.output
    assert f"sqlite:///{home.path / 'home' / 'sdq.db'}" in plain.output
    home.env.update({"SDQ_BROKER_URL": "redis://:hunter2@queue:6379/0",
                     "SDQ_DATABASE_URL": "postgresql://sdq:hunter2@db/sdq",
                     "SDQ_STORAGE_URL": "s3://bucket/images", "AWS_ACCESS_KEY_ID": "AKIA"})
    record = json.loads(home.run("config", "--json").output)
    assert record["mode"] == "distributed" and record["broker_url"] == "redis://:***@queue:6379/0"
    assert record["database_url"] == "postgresql://sdq:***@db/sdq"
    assert record["aws_credentials"] == "from the environment"
    assert "hunter2" not in home.run("config").output


def test_config_reports_a_bad_setting_in_one_line(home: Home) -> None:
    home.env["SDQ_BATCH_SIZE"] = "many"
    result = home.run("config")
    assert result.exit_code == 2
    assert result.output == "Error: SDQ_BATCH_SIZE: expected a whole number, got 'many'\n"


def test_doctor_passes_on_a_working_embedded_setup(home: Home, weights: Path) -> None:
    home.env["SDQ_MODEL"] = str(weights)
    result = home.run("doctor")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [line.split()[:2] for line in lines] == [["ok", "database"], ["ok", "broker"],
                                                    ["ok", "storage"], ["ok", "model"]]
    assert "created on first use" in lines[0]
    assert not (home.path / "home" / "sdq.db").exists()  # looking creates nothing
    home.add_job(["a"])
    assert "at schema" in home.run("doctor").output.splitlines()[0]


def test_doctor_says_what_to_fix(home: Home, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    home.env.update({"SDQ_BROKER_URL": "redis://:hunter2@127.0.0.1:1/0",
                     "SDQ_DATABASE_URL": "postgresql://sdq:hunter2@127.0.0.1:1/sdq",
                     "SDQ_STORAGE_URL": str(blocker / "images"),
                     "SDQ_MODEL": str(tmp_path / "missing.safetensors")})
    result = home.run("doctor", "--json")
    assert result.exit_code == 1
    findings = {f["name"]: f for f in json.loads(result.output)}
    assert not any(f["ok"] for f in findings.values())
    assert "sdq db upgrade" not in findings["database"]["fix"]
    assert "SDQ_DATABASE_URL" in findings["database"]["fix"]
    assert "start the broker" in findings["broker"]["fix"]
    assert "SDQ_STORAGE_URL" in findings["storage"]["fix"]
    assert "SDQ_MODEL" in findings["model"]["fix"]
    assert "hunter2" not in result.output
    text = home.run("doctor").output
    assert text.count("FAIL") == 4 and text.count("fix: ") == 4


def test_doctor_on_a_server_database_that_needs_upgrading(home: Home, tmp_path: Path) -> None:
    from tests.services import scratch_database

    with scratch_database("postgresql", tmp_path) as engine:
        home.env["SDQ_DATABASE_URL"] = engine.url.render_as_string(hide_password=False)
        finding = json.loads(home.run("doctor", "--json").output)[0]
    assert not finding["ok"] and finding["fix"] == "run `sdq db upgrade`"
