"""`sdq submit` of image-to-image jobs, enqueued on a real broker (nothing runs here): init
images from a folder, a prompt file's paths, the configured S3 bucket and stored items, each
stored once by content; bad ones refused before anything is recorded; purge, search, show and
export of what was recorded."""
from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from sdq.db.models import InitImageFile, Item, Job, Status
from sdq.images.storage import Storage, image_key, init_key, open_storage
from sdq.sdmodel.tiny import stand_in_checkpoint
from tests.services import claimed_redis_db

from .conftest import Home


@pytest.fixture
def queued(any_home: Home) -> Iterator[Home]:
    """A home on either database with a real broker: submits record and enqueue only."""
    with claimed_redis_db() as broker_url:
        any_home.env["SDQ_BROKER_URL"] = broker_url
        yield any_home


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return stand_in_checkpoint(tmp_path / "sd15.safetensors")


def photos(folder: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, (name, size) in enumerate(sizes.items()):
        Image.new("RGB", size, (40 * n, 90, 30)).save(folder / name)
    return folder


def storage_of(home: Home) -> Storage:
    return open_storage(home.env.get("SDQ_STORAGE_URL") or str(home.path / "home" / "images"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def submit(home: Home, model: Path, *args: str) -> int:
    result = home.run("submit", *args, "--model", str(model), "--steps", "10", "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["job_id"]


def items(home: Home, job_id: int) -> list[Item]:
    with Session(home.engine) as session:
        return list(session.scalars(select(Item).where(Item.job_id == job_id)
                                    .order_by(Item.row_index)))


def init_rows(home: Home) -> list[tuple[str, int, int]]:
    with Session(home.engine) as session:
        return [(r.sha256, r.width, r.height) for r in
                session.scalars(select(InitImageFile).order_by(InitImageFile.sha256))]


def count(home: Home, table: type) -> int:
    with Session(home.engine) as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


def test_an_init_dir_submitted_twice_is_stored_once(queued: Home, model: Path) -> None:
    home = queued
    folder = photos(home.path / "photos", {"b.png": (100, 70), "a.png": (64, 64)})
    (folder / "README.txt").write_text("where these came from")
    prompts = home.path / "prompts.csv"
    prompts.write_text("prompt,seed\nan oil painting,1\na pencil sketch,2\n")
    plain = home.run("submit", str(prompts), "--init-dir", str(folder), "--model", str(model),
                     "--grid", "strength=0.3,0.6")
    assert plain.exit_code == 0, plain.output
    assert f"{folder}: 2 image(s); 1 other file(s) skipped" in plain.stderr
    first = json.loads(home.run("jobs", "--json").stdout)[0]["id"]
    again = submit(home, model, str(prompts), "--init-dir", str(folder), "--strength", "0.5")
    made = items(home, first)
    assert [(i.prompt, i.init_source, i.strength, i.seed, i.width, i.height) for i in made] == [
        ("an oil painting", "a.png", 0.3, 1, 64, 64), ("an oil painting", "a.png", 0.6, 1, 64, 64),
        ("an oil painting", "b.png", 0.3, 1, 96, 64), ("an oil painting", "b.png", 0.6, 1, 96, 64),
        ("a pencil sketch", "a.png", 0.3, 2, 64, 64), ("a pencil sketch", "a.png", 0.6, 2, 64, 64),
        ("a pencil sketch", "b.png", 0.3, 2, 96, 64), ("a pencil sketch", "b.png", 0.6, 2, 96, 64)]
    assert {i.init_sha256 for i in made} == {sha(folder / "a.png"), sha(folder / "b.png")}
    assert [i.strength for i in items(home, again)] == [0.5] * 4
    assert init_rows(home) == sorted([(sha(folder / "a.png"), 64, 64),
                                      (sha(folder / "b.png"), 100, 70)])
    storage = storage_of(home)
    assert sorted(storage.list("init/")) == sorted(init_key(sha(folder / n)) for n in ("a.png", "b.png"))
    assert storage.get(init_key(sha(folder / "b.png"))) == (folder / "b.png").read_bytes()


def test_a_dry_run_reads_the_images_but_stores_and_records_nothing(home: Home, model: Path) -> None:
    folder = photos(home.path / "photos", {"a.png": (64, 64)})
    result = home.run("submit", "-p", "a watercolour", "--init-dir", str(folder), "--model",
                      str(model), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "a watercolour  init=a.png" in result.stdout
    planned = json.loads(home.run("submit", "-p", "a watercolour", "--init-dir", str(folder),
                                  "--model", str(model), "--dry-run", "--json").stdout)
    assert planned["init_images"] == [{"sha256": sha(folder / "a.png"), "source": "a.png",
                                       "width": 64, "height": 64}]
    assert planned["sample"] == ["a watercolour  init=a.png"]
    assert (count(home, Job), count(home, InitImageFile)) == (0, 0)
    assert list(storage_of(home).list("init/")) == []


def test_bad_init_images_are_listed_and_nothing_is_recorded_or_stored(queued: Home,
                                                                       model: Path) -> None:
    home = queued
    photos(home.path / "in", {"ok.png": (64, 64)})
    (home.path / "in" / "broken.png").write_bytes((home.path / "in" / "ok.png").read_bytes()[:70])
    prompts = home.path / "prompts.csv"
    prompts.write_text("prompt,init_image,strength\nfine,in/ok.png,\nlost,in/gone.png,\n"
                       "too far,in/ok.png,2\n")
    result = home.run("submit", str(prompts), "--model", str(model))
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"{prompts}:3: init_image: in/gone.png: no such file",
        f"{prompts}:4: strength: must be above 0 and at most 1, got 2",
        f"{prompts}: 2 problem(s); nothing was submitted"]
    folder = home.run("submit", "-p", "x", "--init-dir", str(home.path / "in"), "--model", str(model))
    assert folder.exit_code == 2
    assert folder.stderr.splitlines()[0].startswith(
        f"{home.path / 'in'}/broken.png: init_image: truncated or damaged image")
    assert (count(home, Job), count(home, Item), count(home, InitImageFile)) == (0, 0, 0)
    assert list(storage_of(home).list("init/")) == []


def test_purge_keeps_an_init_image_another_job_starts_from(queued: Home, model: Path) -> None:
    home = queued
    folder = photos(home.path / "photos", {"a.png": (64, 64), "b.png": (64, 72)})
    first = submit(home, model, "-p", "a fox", "--init-dir", str(folder))
    prompts = home.path / "one.csv"
    prompts.write_text("prompt,init_image\na boat,photos/a.png\n")
    second = submit(home, model, str(prompts))
    purged = home.run("purge", str(first), "--yes")
    assert purged.output == f"Job {first} purged: 2 item(s) and 0 image(s) deleted; 1 init image(s) deleted\n"
    assert init_rows(home) == [(sha(folder / "a.png"), 64, 64)]
    assert list(storage_of(home).list("init/")) == [init_key(sha(folder / "a.png"))]
    assert json.loads(home.run("purge", str(second), "--yes", "--json").stdout)["inits"] == 1
    assert init_rows(home) == [] and list(storage_of(home).list("init/")) == []


def finish(home: Home, job_id: int, like_item: int) -> None:
    """Mark the job's items done, each with a stored copy of `like_item`'s image (for what
    reads done items only)."""
    storage = storage_of(home)
    with Session(home.engine) as session, session.begin():
        source = session.get(Item, like_item)
        png = storage.get(source.image_key)
        for item in session.scalars(select(Item).where(Item.job_id == job_id)):
            storage.put(image_key(job_id, item.id), png)
            item.status, item.image_key = Status.DONE, image_key(job_id, item.id)
            item.image_sha256, item.finished_at = source.image_sha256, source.finished_at


def test_a_stored_item_as_init_image_is_found_shown_and_exported(queued: Home, model: Path,
                                                                 tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    home = queued
    maker = home.add_job(["a red fox"], done=1)
    [source] = items(home, maker.id)
    prompts = home.path / "prompts.jsonl"
    prompts.write_text(f'{{"prompt": "the fox in winter", "init_image": "item:{source.id}", '
                       '"strength": 0.4}\n{"prompt": "a txt2img boat"}\n')
    job = submit(home, model, str(prompts))
    made, plain = items(home, job)
    assert (made.init_sha256, made.init_source, made.strength, made.width) == (
        source.image_sha256, f"item:{source.id}", 0.4, 64)
    assert (plain.init_sha256, plain.init_source, plain.strength) == (None, None, None)
    for query in (f"item:{source.id}", source.image_sha256[:8].upper()):
        found = json.loads(home.run("search", "--init", query, "--json").stdout)
        assert [(r["id"], r["init_source"], r["strength"]) for r in found] == [
            (made.id, f"item:{source.id}", 0.4)]
    assert home.run("search", "--init", "xyz").exit_code == 2
    shown = home.run("show", str(made.id)).stdout
    assert f"init " in shown and f"item:{source.id} (sha256 {source.image_sha256[:12]}), strength 0.4" in shown
    header = next(csv.reader(io.StringIO(home.run("search", "nothing-matches", "--csv").stdout)))
    assert header[-3:] == ["init_sha256", "init_source", "strength"]
    finish(home, job, source.id)
    for fmt in ("parquet", "imagefolder"):
        result = home.run("export", str(job), "--format", fmt, "-o", str(tmp_path / fmt))
        assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "parquet")
    assert [table.schema.field(n).type for n in ("init_sha256", "init_source", "strength")] == [
        pa.string(), pa.string(), pa.float64()]
    rows = sorted(table.select(["id", "init_sha256", "init_source", "strength"]).to_pylist(),
                  key=lambda r: r["id"])
    assert rows == [{"id": made.id, "init_sha256": source.image_sha256,
                     "init_source": f"item:{source.id}", "strength": 0.4},
                    {"id": plain.id, "init_sha256": None, "init_source": None, "strength": None}]
    metadata = pq.read_table(tmp_path / "imagefolder" / "metadata.parquet")
    assert sorted(metadata.select(["id", "strength"]).to_pylist(), key=lambda r: r["id"]) == [
        {"id": made.id, "strength": 0.4}, {"id": plain.id, "strength": None}]


def test_init_images_from_the_configured_bucket(queued: Home, model: Path, bucket: str,
                                                s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    home = queued
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    home.env["SDQ_STORAGE_URL"] = f"s3://{bucket}/images"
    png = photos(home.path / "p", {"a.png": (64, 64)}) / "a.png"
    storage = storage_of(home)
    storage.put("uploads/a.png", png.read_bytes())
    maker = home.add_job(["a red fox"], done=1)  # its image in the bucket
    [source] = items(home, maker.id)
    prompts = home.path / "prompts.csv"
    prompts.write_text(f"prompt,init_image\nfrom the bucket,s3://{bucket}/images/uploads/a.png\n"
                       f"from an item,item:{source.id}\n")
    job = submit(home, model, str(prompts))
    made, from_item = items(home, job)
    assert (made.init_sha256, made.init_source) == (sha(png), f"s3://{bucket}/images/uploads/a.png")
    assert (from_item.init_sha256, from_item.init_source) == (source.image_sha256, f"item:{source.id}")
    assert storage.get(init_key(sha(png))) == png.read_bytes()
    assert storage.get(init_key(source.image_sha256)) == storage.get(source.image_key)
    s3_server.client().create_bucket(Bucket=f"{bucket}-other")
    prompts.write_text(f"prompt,init_image\nx,s3://{bucket}-other/a.png\n"
                       f"y,s3://{bucket}/elsewhere/a.png\nz,s3://{bucket}/images/uploads/none.png\n")
    refused = home.run("submit", str(prompts), "--model", str(model))
    assert refused.exit_code == 2
    lines = refused.stderr.splitlines()
    assert lines[:2] == [
        f"{prompts}:2: init_image: s3://{bucket}-other/a.png: not in the configured storage "
        f"(s3://{bucket}/images); sdq reads init images from that bucket and prefix only",
        f"{prompts}:3: init_image: s3://{bucket}/elsewhere/a.png: not in the configured storage "
        f"(s3://{bucket}/images); sdq reads init images from that bucket and prefix only"]
    assert lines[2].startswith(f"{prompts}:4: init_image: ") and "none.png" in lines[2]
    assert count(home, Job) == 2


def test_a_schedule_reads_its_files_init_images_on_each_run(queued: Home, model: Path,
                                                             tmp_path: Path) -> None:
    home = queued
    folder = tmp_path / "nightly"
    photo = photos(folder / "photos", {"a.png": (64, 48)}) / "a.png"
    prompts = folder / "variations.csv"
    prompts.write_text("prompt,init_image\na watercolour,photos/a.png\n")
    added = home.run("schedule", "add", "variations", "--cron", "0 2 * * *", str(prompts),
                     "--model", str(model), "--strength", "0.4", "--steps", "10", "--json")
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["options"]["init_base"] == str(folder.resolve())
    run = home.run("schedule", "run-now", "variations", "--json")
    assert run.exit_code == 0, run.output
    [made] = items(home, json.loads(run.stdout)["job"])
    assert (made.init_sha256, made.init_source, made.strength, made.width, made.height) == (
        sha(photo), "photos/a.png", 0.4, 64, 48)
    assert storage_of(home).get(init_key(sha(photo))) == photo.read_bytes()
    plain = home.path / "p.csv"
    plain.write_text("prompt\nx\n")
    refused = home.run("schedule", "add", "plain", "--cron", "0 2 * * *", str(plain),
                       "--strength", "0.4")
    assert refused.exit_code == 2
    assert refused.stderr.splitlines()[0] == (f"{plain}: strength: the job's strength "
                                             "applies to image-to-image only, and no row has an "
                                             "init_image")
