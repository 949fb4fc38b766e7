"""`sdq reproduce` against images the embedded batch runner made with the tiny model."""
from __future__ import annotations

import json
from pathlib import Path

from sdq.db.models import Item
from sdq.jobs.reproduce import Comparison, Outcome, Target
from sdq.jobs.submit import identify_model, submit
from sdq.core.settings import Settings
from sdq.worker.factory import runner_from_settings
from tests.worker.conftest import job_items, specs

from .conftest import Home


def run_job(home: Home, checkpoint: Path, count: int, *, size: int = 64) -> list[Item]:
    """`count` different items (prompts, seeds, guidance) made in one batch on the CPU."""
    home.env["SDQ_DEVICE"] = "cpu"
    result = submit(Settings.load(home.env), specs(count, size=size),
                    model=identify_model(checkpoint), batch_size=count, make_runner=runner_from_settings)
    items = job_items(home.engine, result.job_id)
    assert {i.batch_id for i in items} != {None} and len({i.batch_id for i in items}) == 1
    return items


def test_by_default_its_recorded_batch_is_replayed_and_the_pixels_are_identical(
        home: Home, tiny_checkpoint: Path) -> None:
    items = run_job(home, tiny_checkpoint, 3)
    middle = items[1]
    in_batch = home.run("reproduce", str(middle.id), "--json")
    assert in_batch.exit_code == 0, in_batch.output
    record = json.loads(in_batch.output)
    assert record["identical"] and record["passed"] and record["max_difference"] == 0
    assert (record["batch"], record["batch_size"], record["position"]) == (middle.batch_id, 3, 1)

    text = home.run("reproduce", str(middle.id))
    assert text.exit_code == 0, text.output
    assert text.output.startswith(f"item {middle.id}: identical pixels, regenerated in its batch "
                                  f"{middle.batch_id} (position 1 of 3)")


def test_alone_a_difference_within_one_level_is_information(
        home: Home, tiny_checkpoint: Path) -> None:
    items = run_job(home, tiny_checkpoint, 3)
    alone = home.run("reproduce", str(items[1].id), "--alone", "--json")
    assert alone.exit_code == 0, alone.output
    record = json.loads(alone.output)
    assert (record["batch"], record["batch_size"], record["position"]) == (None, 1, 0)
    assert record["recorded_batch_size"] == 3
    assert record["max_difference"] <= 1 and record["passed"]


def outcome(max_difference: int, *, batch_id: str | None) -> Outcome:
    """A reproduction of item 5, made in a batch of 3, that differs by `max_difference`."""
    wanted = Target(5, [], 0, batch_id, 3, "ab" * 32, "/m/tiny", "1/5.png", "cpu")
    return Outcome(wanted, Comparison(max_difference == 0, max_difference,
                                      8 if max_difference else 0, 4096, None), "cpu", "fp32")


def test_alone_one_level_passes_and_says_why_in_a_batch_it_fails() -> None:
    alone = outcome(1, batch_id=None)
    assert alone.passed
    assert alone.summary() == (
        "item 5: within one level of the stored image (largest difference 1 level(s) in 8 of "
        "4096 pixels, regenerated alone on cpu (fp32)); it was made in a batch of 3, and a "
        "batch's matrix products are summed in another order than one image's, which can "
        "move the last bit of a float and so a few pixels by one level; `sdq reproduce 5` "
        "replays that batch for identical pixels")
    assert not outcome(2, batch_id=None).passed
    in_batch = outcome(1, batch_id="j1-ab12cd-0")
    assert not in_batch.passed
    assert in_batch.summary().startswith("item 5: differs, largest difference 1 level(s)")


def test_watermarked_images_compare_like_with_like(home: Home, tiny_checkpoint: Path) -> None:
    items = run_job(home, tiny_checkpoint, 1, size=256)
    assert items[0].watermark == "StableDiffusionV1"
    result = home.run("reproduce", str(items[0].id), "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.output)
    assert record["identical"] and record["watermark"] == "StableDiffusionV1"


def test_a_model_of_another_hash_is_refused(home: Home, tiny_checkpoint: Path,
                                           tmp_path: Path) -> None:
    items = run_job(home, tiny_checkpoint, 1)
    other = tmp_path / "other.safetensors"
    other.write_bytes(tiny_checkpoint.read_bytes()[:-4] + b"    ")
    result = home.run("reproduce", str(items[0].id), "--model", str(other))
    assert result.exit_code == 1
    made_with = identify_model(tiny_checkpoint).short_hash
    assert f"item {items[0].id} was made with {made_with}; pass --model" in result.output


def test_items_without_an_image_or_a_batch_are_one_line_errors(home: Home) -> None:
    job = home.add_job(["made", "waiting"], done=1)
    done, waiting = (item.id for item in job_items(home.engine, job.id))
    no_batch = home.run("reproduce", str(done))
    assert no_batch.exit_code == 1 and no_batch.output == (
        f"Error: item {done} records no batch; --alone regenerates it by itself\n")
    pending = home.run("reproduce", str(waiting))
    assert pending.output == f"Error: item {waiting} has no stored image (status pending)\n"
    assert home.run("reproduce", "999").output == "Error: no item 999\n"
