"""`sdq submit`, `sdq watch`, `sdq resume` and `--debug`, on the embedded default with the
tiny model (64x64, 1-2 steps)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sdq.cli.main import SdqGroup, cli
from sdq.db.models import Item, Job, Model, Status
from sdq.images.storage import open_storage

from .conftest import Home, as_from_a_terminal

SMALL = ["--width", "64", "--height", "64", "--steps", "2", "--sampler", "euler"]


def _items(home: Home, job_id: int) -> list[Item]:
    with Session(home.engine) as session:
        return list(session.scalars(select(Item).where(Item.job_id == job_id)
                                    .order_by(Item.row_index)))


def _count(home: Home, table: type) -> int:
    with Session(home.engine) as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


def test_submit_runs_a_file_here_and_records_every_image(home: Home, tiny_checkpoint: Path
                                                         ) -> None:
    prompts = home.path / "prompts.csv"
    prompts.write_text("prompt,seed,n\na red fox,7,2\na lighthouse,,\n")
    result = home.run("submit", str(prompts), "--model", str(tiny_checkpoint), *SMALL,
                      "--seed", "100", "--tag", "test", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["items"], record["done"], record["failed"], record["queues"]) == (3, 3, 0, [])
    items = _items(home, record["job_id"])
    assert [(i.prompt, i.seed, i.status) for i in items] == [
        ("a red fox", 7, Status.DONE), ("a red fox", 8, Status.DONE),
        ("a lighthouse", 102, Status.DONE)]
    storage = open_storage(str(home.path / "home" / "images"))
    assert sorted(storage.list()) == sorted(i.image_key for i in items)
    with Session(home.engine) as session:
        job = session.get(Job, record["job_id"])
        assert (job.status, job.tags, job.name, job.defaults["base_seed"]) == (
            Status.DONE, ["test"], "prompts.csv", 100)


def test_a_row_names_its_own_model(home: Home, tiny_checkpoint: Path) -> None:
    added = home.run("models", "add", str(tiny_checkpoint), "--name", "tiny")
    assert added.exit_code == 0, added.output
    prompts = home.path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a boat", "model": "tiny"}\n')
    result = home.run("submit", str(prompts), "--model", str(tiny_checkpoint), *SMALL, "--json")
    assert result.exit_code == 0, result.output
    [item] = _items(home, json.loads(result.stdout)["job_id"])
    with Session(home.engine) as session:
        assert session.get(Model, item.model_id).name == "tiny"


def test_a_bad_file_lists_every_problem_and_records_nothing(home: Home, tiny_checkpoint: Path
                                                           ) -> None:
    prompts = home.path / "bad.csv"
    prompts.write_text("prompt,seed,sampler,width\nok,1,euler,64\n,x,eulr,500\n")
    result = home.run("submit", str(prompts), "--model", str(tiny_checkpoint), *SMALL)
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert f"{prompts}:3: seed: expected a whole number, got 'x'" in lines
    assert f"{prompts}:3: width: must be a multiple of 8, got 500" in lines
    assert f"{prompts}:3: prompt: missing" in lines
    assert any(line.startswith(f"{prompts}:3: sampler: unknown sampler 'eulr'") for line in lines)
    assert "Traceback" not in result.output
    assert (_count(home, Job), _count(home, Item)) == (0, 0)


def test_a_missing_model_is_one_line_and_exit_3(home: Home, tmp_path: Path) -> None:
    prompts = home.path / "p.txt"
    prompts.write_text("a boat\n")
    result = home.run("submit", str(prompts), "--model", str(tmp_path / "nope.safetensors"))
    assert result.exit_code == 3
    assert result.stderr.startswith("Error: --model: ") and result.stderr.count("\n") == 1
    assert _count(home, Job) == 0


def test_dry_run_prints_the_plan_and_records_nothing(home: Home, tiny_checkpoint: Path) -> None:
    prompts = home.path / "p.txt"
    prompts.write_text("a boat\na fox\na cat\n")
    args = ["submit", str(prompts), "--model", str(tiny_checkpoint), *SMALL, "-n", "3",
            "--batch-size", "4", "--dry-run"]
    result = home.run(*args)
    assert result.exit_code == 0, result.output
    assert "3 row(s), 9 image(s), 3 batch(es) of up to 4" in result.stdout
    assert "estimated time: unknown" in result.stdout
    assert (_count(home, Job), _count(home, Item)) == (0, 0)
    # With finished images of the same model, sampler and size, an estimate from them.
    assert home.run("submit", str(prompts), "--model", str(tiny_checkpoint), *SMALL).exit_code == 0
    plan = json.loads(home.run(*args, "--json").stdout)
    assert (plan["items"], plan["batches"], plan["rows"]) == (9, 3, 3)
    assert plan["estimated_s"] > 0


def test_options_refuse_nan_and_prompt_files_name_the_line(home: Home, tiny_checkpoint: Path
                                                           ) -> None:
    prompts = home.path / "p.jsonl"
    prompts.write_text('{"prompt": "a boat"}\n{"prompt": "a fox", "cfg": NaN}\n')
    result = home.run("submit", str(prompts), "--model", str(tiny_checkpoint), "--cfg", "nan")
    assert result.exit_code == 2
    assert "Invalid value for '--cfg' / '--guidance-scale': expected a number, got 'nan'" in result.output
    result = home.run("submit", str(prompts), "--model", str(tiny_checkpoint), *SMALL)
    assert result.exit_code == 2
    assert f"{prompts}:2: cfg: expected a number, got nan" in result.stderr.splitlines()
    assert _count(home, Job) == 0


def test_other_tools_columns_and_sampler_names_are_recorded_as_sdqs(home: Home,
                                                                    tiny_checkpoint: Path) -> None:
    prompts = home.path / "p.csv"
    prompts.write_text("prompt,sampler,guidance_scale,num_inference_steps\na boat,Euler a,5,1\n")
    result = home.run("submit", str(prompts), "--model", str(tiny_checkpoint), "--width", "64",
                      "--height", "64", "--json")
    assert result.exit_code == 0, result.output
    [item] = _items(home, json.loads(result.stdout)["job_id"])
    assert (item.sampler, item.cfg, item.steps) == ("euler_a", 5.0, 1)


def test_the_dry_run_plan_is_how_the_runner_batches(home: Home, tiny_checkpoint: Path) -> None:
    prompts = home.path / "p.csv"
    prompts.write_text("prompt,sampler,steps,eta\na,euler,2,\nb,ddim,2,0.5\nc,euler,2,\n"
                       "d,ddim,2,\ne,ddim,1,\n")
    args = ["submit", str(prompts), "--model", str(tiny_checkpoint), "--width", "64",
            "--height", "64", "--batch-size", "8", "--json"]
    plan = json.loads(home.run(*args, "--dry-run").stdout)
    planned = sorted((g["sampler"], g["steps"], g["eta"], g["images"]) for g in plan["groups"])
    assert planned == [("ddim", 1, 0.0, 1), ("ddim", 2, 0.0, 1), ("ddim", 2, 0.5, 1),
                       ("euler", 2, 0.0, 2)]
    result = home.run(*args)
    assert result.exit_code == 0, result.output
    batches: dict[str, list[Item]] = {}
    for item in _items(home, json.loads(result.stdout)["job_id"]):
        batches.setdefault(item.batch_id, []).append(item)
    ran = sorted((b[0].sampler, b[0].steps, b[0].eta, len(b)) for b in batches.values())
    assert ran == planned and plan["batches"] == len(batches)


def test_watch_follows_a_job_to_its_end(home: Home) -> None:
    done = home.add_job(["a", "b"], done=2)
    result = home.run("watch", str(done.id), "--json")
    assert (result.exit_code, json.loads(result.stdout)) == (0, {"job_id": done.id,
                                                                 "counts": {"done": 2},
                                                                 "reused": 0})
    failed = home.add_job(["a", "b"], done=1, failed={1: "boom"})
    result = home.run("watch", str(failed.id))
    assert result.exit_code == 1
    assert result.stdout.startswith(f"Job {failed.id}: 1/2 done, 1 failed")
    assert home.run("watch", "999").stderr == "Error: no job 999\n"


def test_ctrl_c_stops_watching_with_one_line(home: Home) -> None:
    job = home.add_job(["never runs"])
    sdq = Path(sys.executable).parent / "sdq"
    process = subprocess.Popen([str(sdq), "watch", str(job.id)], env={**os.environ, **home.env},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=as_from_a_terminal)
    try:
        assert process.stderr is not None
        # the first progress line (plain when piped) is out: polling
        assert process.stderr.readline().startswith(f"job {job.id}: 0/1 images (0%)")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 1
    assert err == f"\nStopped watching job {job.id}; it goes on (`sdq watch {job.id}`).\n"


def test_debug_shows_the_traceback_of_unexpected_errors() -> None:
    group = SdqGroup(name="sdq", callback=lambda debug: None)

    @group.command()
    def boom() -> None:
        """Fail."""
        raise RuntimeError("the disk caught fire")

    plain = CliRunner().invoke(group, ["boom"])
    assert plain.exit_code == 1
    assert plain.output == ("Error: the disk caught fire (unexpected RuntimeError; "
                            "`sdq --debug ...` shows the traceback)\n")
    debug = CliRunner().invoke(group, ["--debug", "boom"])
    assert debug.exit_code == 1 and isinstance(debug.exception, RuntimeError)
    assert isinstance(cli, SdqGroup) and "--debug" in CliRunner().invoke(cli, ["--help"]).output


@pytest.mark.parametrize(("signum", "said"), [(signal.SIGINT, "interrupted"),
                                              (signal.SIGTERM, "terminated")])
def test_ctrl_c_or_sigterm_hands_the_unfinished_items_back_for_an_immediate_resume(
        home: Home, tiny_checkpoint: Path, signum: int, said: str) -> None:
    """SIGTERM (systemd, docker, `kill`) takes Ctrl-C's path."""
    prompts = home.path / "p.txt"
    prompts.write_text("".join(f"a green kite number {n}\n" for n in range(12)))
    env = {**os.environ, **home.env, "SDQ_DEVICE": "cpu"}  # the default lease: 120 s
    sdq = Path(sys.executable).parent / "sdq"
    process = subprocess.Popen(
        [str(sdq), "submit", str(prompts), "--model", str(tiny_checkpoint), "--width", "64",
         "--height", "64", "--steps", "4", "--batch-size", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        preexec_fn=as_from_a_terminal)
    try:
        deadline = time.monotonic() + 300
        done = 0
        while not done and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
            with Session(home.engine) as session:
                done = session.scalar(select(func.count()).where(Item.status == Status.DONE))
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 1, stderr
    assert stderr.splitlines()[-1] == (f"Error: {said}; `sdq resume 1` finishes the job without "
                                       "redoing what is done"), stderr
    items = _items(home, 1)
    finished = [i for i in items if i.status == Status.DONE]
    assert 1 <= len(finished) < 12, "the run was not cut short in the middle"
    assert Status.RUNNING not in {i.status for i in items}  # nothing left under a lease
    status = home.run("status", "1")
    assert status.output.startswith("Job 1 (p.txt): pending, ")  # not `running` for ever
    assert "`sdq resume 1` goes on" in status.output
    result = home.run("resume", "1", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["counts"], record["resumed"], record["leased"]) == ({"done": 12}, 12 - len(finished), 0)
    assert {i.attempts for i in _items(home, 1)} == {1}


def test_resume_finishes_a_killed_embedded_run_without_redoing_anything(
        home: Home, tiny_checkpoint: Path) -> None:
    prompts = home.path / "p.txt"
    prompts.write_text("".join(f"a red boat number {n}\n" for n in range(12)))
    # A short lease, so that the killed run's items are free soon after it dies.
    env = {**os.environ, **home.env, "SDQ_VISIBILITY_TIMEOUT": "2", "SDQ_DEVICE": "cpu"}
    sdq = Path(sys.executable).parent / "sdq"
    process = subprocess.Popen(
        [str(sdq), "submit", str(prompts), "--model", str(tiny_checkpoint), "--width", "64",
         "--height", "64", "--steps", "4", "--batch-size", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        engine = home.engine
        deadline = time.monotonic() + 300
        done = 0
        while not done and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.05)
            with Session(engine) as session:
                done = session.scalar(select(func.count()).where(Item.status == Status.DONE))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert process.returncode == -signal.SIGKILL
    before = {i.id: (i.image_sha256, i.finished_at, i.attempts)
              for i in _items(home, 1) if i.status == Status.DONE}
    assert 1 <= len(before) < 12, "the run was not cut short in the middle"
    time.sleep(2.5)  # the killed run's leases run out
    result = home.run("resume", "1", "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert (record["counts"], record["resumed"], record["leased"]) == (
        {"done": 12}, 12 - len(before), 0)
    items = _items(home, 1)
    assert all(i.status == Status.DONE for i in items)
    assert {i.id: (i.image_sha256, i.finished_at, i.attempts)
            for i in items if i.id in before} == before
    storage = open_storage(str(home.path / "home" / "images"))
    keys = storage.list()
    assert sorted(keys) == sorted(i.image_key for i in items)
    with Session(home.engine) as session:
        assert session.get(Job, 1).status == Status.DONE
    again = home.run("resume", "1")
    assert (again.exit_code, again.stdout) == (0, "nothing to resume. Job 1: 12/12 done\n")


def test_a_relative_model_path_is_recorded_absolute(home: Home, tiny_checkpoint: Path,
                                                    monkeypatch) -> None:
    prompts = home.path / "p.txt"
    prompts.write_text("a boat\n")
    monkeypatch.chdir(tiny_checkpoint.parent)
    result = home.run("submit", str(prompts), "--model", tiny_checkpoint.name, *SMALL, "--json")
    assert result.exit_code == 0, result.output
    with Session(home.engine) as session:
        job = session.get(Job, json.loads(result.stdout)["job_id"])
        assert job.defaults["model"] == str(tiny_checkpoint)
        assert session.scalar(select(Model.source_uri)) == str(tiny_checkpoint)


def test_more_images_than_the_setting_need_yes(home: Home, tiny_checkpoint: Path) -> None:
    prompts = home.path / "p.txt"
    prompts.write_text("a boat\na fox\n")
    home.env["SDQ_CONFIRM_ITEMS"] = "3"
    args = ["submit", str(prompts), "--model", str(tiny_checkpoint), *SMALL, "--steps", "1"]
    refused = home.run(*args, "-n", "2")
    assert refused.exit_code == 2
    assert refused.stderr == ("Error: 4 images is more than 3 (SDQ_CONFIRM_ITEMS); "
                              "check it with --dry-run, then pass --yes to submit them all\n")
    assert _count(home, Job) == 0
    assert home.run(*args, "-n", "2", "--dry-run").exit_code == 0
    assert home.run(*args).exit_code == 0  # 2 images: no question
    assert home.run(*args, "-n", "2", "-y").exit_code == 0
    assert _count(home, Item) == 6


def test_a_file_name_that_is_not_utf8_is_recorded_with_its_bytes_escaped(
        any_home: Home, tiny_checkpoint: Path) -> None:
    """A name made on another system (Latin-1 bytes) holds lone surrogates in Python, which
    no database stores as text: the job records `\\xNN` in their place."""
    prompts = any_home.path / os.fsdecode(b"caf\xe9.txt")
    prompts.write_text("a boat\n")
    result = any_home.run("submit", str(prompts), "--model", str(tiny_checkpoint), *SMALL,
                          "--steps", "1")
    assert result.exit_code == 0, result.output
    with Session(any_home.engine) as session:
        job = session.get(Job, 1)
        assert (job.name, job.source_name) == ("caf\\xe9.txt", f"{any_home.path}/caf\\xe9.txt")
    bad = any_home.path / os.fsdecode(b"bad-\xff.txt")
    bad.write_text("a {boat\n")
    refused = any_home.run("submit", str(bad), "--model", str(tiny_checkpoint))
    assert refused.exit_code == 2
    assert f"{any_home.path}/bad-\\xff.txt:1: prompt: column 3" in refused.stderr
