"""Image-to-image items on a real runner with the tiny model: the init image read from storage
(never from the submitting machine), diffusers' pixels as the pipeline and `sdq generate` make
them, batch invariance across strengths and init images, text-to-image items beside them, the
result cache told apart by init and strength, a missing or altered init failing only its
items, the init recorded in the PNG, and `sdq reproduce` / `sdq verify` on such items.

Items are written as the submit side records them (the init columns, and the file under
`init_key`), through the library: this tests the worker's half on its own."""
from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sd_parsers import ParserManager
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from sdq.cli.main import cli
from sdq.core.batch import Batch
from sdq.core.init_image import InitImage
from sdq.core.params import GenerationParams
from sdq.core.settings import Settings
from sdq.db.models import InitImageFile, Item, Status
from sdq.db.session import open_database
from sdq.images.provenance import read_png_metadata
from sdq.images.storage import LocalStorage, Storage, StorageError, init_key, open_storage
from sdq.images.stored_init import InitImages, UnusableInit, read_stored_init
from sdq.sdmodel.diffusers_reference import reference_pipeline, reference_scheduler
from sdq.sdmodel.img2img import Init
from sdq.sdmodel.pipeline import Pipeline, load_pipeline
from sdq.sdmodel.produce import produce
from sdq.worker.cache import Identity, ResultCache
from sdq.worker.runner import Runner
from tests.s3server import S3Server

from ..sdmodel.test_img2img import init_image
from .cluster import WorkerProcess
from .conftest import job_items, queued_job, specs
from .test_distributed import wait_until_done

STEPS = 5
"""int(5 * 0.6) = 3 steps run, int(5 * 0.3) = 1, int(5 * 1.0) = 5."""


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_checkpoint: Path) -> Pipeline:
    return load_pipeline(tiny_checkpoint, device="cpu")


def png_bytes(image: Image.Image, **options: Any) -> bytes:
    out = io.BytesIO()
    image.save(out, format=options.pop("format", "PNG"), **options)
    return out.getvalue()


def store_init(engine: Engine, storage: Storage, data: bytes) -> str:
    """An init file as submit stores it: its bytes under `init_key(sha256)` and its row; the
    sha256."""
    sha256 = hashlib.sha256(data).hexdigest()
    storage.put(init_key(sha256), data)
    with Session(engine) as session:
        if session.get(InitImageFile, sha256) is None:
            image = Image.open(io.BytesIO(data))
            session.add(InitImageFile(sha256=sha256,
                                      width=image.width, height=image.height, size_bytes=len(data)))
            session.commit()
    return sha256


def img2img_job(engine: Engine, model_sha256: str, items: list[dict[str, Any]],
                inits: list[InitImage | None], batch_size: int) -> tuple[int, list[Batch]]:
    """`queued_job`, each item given the init columns of `inits[row]` (None: text-to-image)."""
    job_id, batches = queued_job(engine, model_sha256, items, batch_size)
    with Session(engine) as session:
        for row, init in enumerate(inits):
            if init is not None:
                session.execute(update(Item).where(Item.job_id == job_id, Item.row_index == row)
                                .values(init_sha256=init.sha256, init_source=init.source,
                                        strength=init.strength))
        session.commit()
    return job_id, batches


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def stored_pixels(storage: Storage, item: Item) -> np.ndarray:
    return pixels(Image.open(io.BytesIO(storage.get(item.image_key))))


def alone(pipe: Pipeline, params: GenerationParams, start: Init | None) -> Image.Image:
    """The image the pipeline makes of one request by itself."""
    [produced] = produce(pipe, [params], inits=None if start is None else [start])
    return produced.images[0]


@pytest.fixture
def two_inits(engine: Engine, storage: LocalStorage) -> dict[str, tuple[str, Image.Image]]:
    """Two init files in storage: a PNG, and a JPEG of another size (resized to the item's)."""
    harbour = init_image(64, 64, seed=21)
    field = init_image(80, 72, seed=22)
    field_jpeg = png_bytes(field, format="JPEG", quality=90)
    return {"harbour.png": (store_init(engine, storage, png_bytes(harbour)), harbour),
            "field.jpg": (store_init(engine, storage, field_jpeg),
                          Image.open(io.BytesIO(field_jpeg)).convert("RGB"))}


def test_a_mixed_batch_makes_each_image_as_the_pipeline_makes_it_alone(
        engine: Engine, storage: LocalStorage, tiny_pipeline: Pipeline,
        two_inits: dict[str, tuple[str, Image.Image]]) -> None:
    """One planned batch of five: two strengths of one init, another init, and two
    text-to-image items. Each stored image is within one level of the item made alone (seed
    per image: the batch's make-up never changes it), and the init is in its PNG."""
    (harbour, harbour_image), (field, field_image) = two_inits["harbour.png"], two_inits["field.jpg"]
    inits = [InitImage(harbour, "harbour.png", 0.6), None, InitImage(field, "field.jpg", 0.6),
             InitImage(harbour, "harbour.png", 0.3), None]
    images = {harbour: harbour_image, field: field_image}
    items = specs(5, steps=STEPS)
    job_id, batches = img2img_job(engine, tiny_pipeline.sha256, items, inits, batch_size=8)
    assert len(batches) == 1
    report = Runner(engine=engine, storage=storage, model_ref="", pipeline=tiny_pipeline).run(batches)
    assert (report.done, report.failed) == (5, 0)
    done = job_items(engine, job_id)
    assert {i.status for i in done} == {Status.DONE}
    # Denoised together: the two at 0.6 (one shape, one strength), then 0.3, then the rest.
    assert len({i.batch_id for i in done}) == 3
    for item, init in zip(done, inits):
        start = None if init is None else Init(images[init.sha256], init.strength)
        expected = pixels(alone(tiny_pipeline, item.params, start))
        assert np.abs(stored_pixels(storage, item) - expected).max() <= 1, item.row_index
        meta = read_png_metadata(storage.get(item.image_key))
        assert meta.provenance.init == init
        assert meta.parameters.settings.get("Denoising strength") == (
            None if init is None else repr(init.strength))
    # Strength decides: the same init and seed at 0.3 and 0.6 are other images.
    assert not np.array_equal(stored_pixels(storage, done[0]), stored_pixels(storage, done[3]))
    info = ParserManager().parse(Image.open(io.BytesIO(storage.get(done[0].image_key))))
    assert info is not None and info.metadata["Denoising strength"] == "0.6"


def test_a_worker_image_matches_sdq_generate_with_the_same_init_file(
        engine: Engine, storage: LocalStorage, tiny_pipeline: Pipeline, tiny_checkpoint: Path,
        tmp_path: Path) -> None:
    """The queue's image of an init file and `sdq generate --init-image` of that file, same
    seed, size and strength: within one 8-bit level (the same pixels, batched otherwise)."""
    source = tmp_path / "harbour.png"
    init_image(70, 61, seed=21).save(source)
    sha256 = store_init(engine, storage, source.read_bytes())
    spec = {**specs(1, steps=STEPS, sampler="dpmpp_2m")[0], "width": 64, "height": 56,
            "negative_prompt": "blurry"}
    job_id, batches = img2img_job(engine, tiny_pipeline.sha256, [spec],
                                  [InitImage(sha256, "harbour.png", 0.6)], batch_size=1)
    Runner(engine=engine, storage=storage, model_ref="", pipeline=tiny_pipeline).run(batches)
    [item] = job_items(engine, job_id)
    out = tmp_path / "generated.png"
    result = CliRunner().invoke(cli, [
        "generate", spec["prompt"], "--model", str(tiny_checkpoint), "--negative-prompt", "blurry",
        "--seed", str(spec["seed"]), "--steps", str(STEPS), "--sampler", "dpmpp_2m",
        "--cfg", str(spec["cfg"]), "--init-image", str(source), "--strength", "0.6",
        "--device", "cpu", "-o", str(out)],
        env={"SDQ_HOME": str(tmp_path / "gen"), "SDQ_CONFIG": str(tmp_path / "none.toml")})
    assert result.exit_code == 0, result.output
    assert np.abs(stored_pixels(storage, item) - pixels(Image.open(out))).max() <= 1
    ours, theirs = (read_png_metadata(data).provenance for data in
                    (storage.get(item.image_key), out.read_bytes()))
    assert ours.init == theirs.init == InitImage(sha256, "harbour.png", 0.6)


class CountingStorage(LocalStorage):
    """Counts reads of init objects; fails the first `outage` of them as a storage outage."""

    def __init__(self, root: Path, outage: int = 0) -> None:
        super().__init__(root)
        self.init_reads, self.outage = 0, outage

    def get(self, key: str) -> bytes:
        if key.startswith("init/"):
            self.init_reads += 1
            if self.init_reads <= self.outage:
                raise StorageError("S3 endpoint unreachable (test)")
        return super().get(key)


def test_an_init_is_read_once_for_many_items_and_an_outage_is_waited_out(
        engine: Engine, embedded: Settings, tiny_pipeline: Pipeline) -> None:
    """A nightly job's shape: one init image, six seeds over three messages. The runner reads
    it once; a storage outage while reading it is waited out, not charged to the items."""
    storage = CountingStorage(Path(embedded.storage_url), outage=2)
    sha256 = store_init(engine, storage, png_bytes(init_image(64, 64, seed=3)))
    init = InitImage(sha256, "one.png", 1.0)
    job_id, batches = img2img_job(engine, tiny_pipeline.sha256, specs(6, steps=1), [init] * 6,
                                  batch_size=2)
    runner = Runner(engine=engine, storage=storage, model_ref="", pipeline=tiny_pipeline,
                    outage_s=60)
    for batch in batches:
        assert runner.run([batch]).done == 2
    assert storage.init_reads == 3  # two refused by the outage, then one read for all six
    assert {(i.status, i.attempts) for i in job_items(engine, job_id)} == {(Status.DONE, 1)}


def test_a_missing_or_altered_init_fails_only_its_items(
        engine: Engine, storage: LocalStorage, tiny_pipeline: Pipeline) -> None:
    good = store_init(engine, storage, png_bytes(init_image(64, 64, seed=4)))
    missing = hashlib.sha256(b"never uploaded").hexdigest()
    altered = store_init(engine, storage, png_bytes(init_image(64, 64, seed=5)))
    storage.put(init_key(altered), png_bytes(init_image(64, 64, seed=6)))  # overwritten
    not_image_sha = hashlib.sha256(b"plain text").hexdigest()
    storage.put(init_key(not_image_sha), b"plain text")
    inits = [InitImage(good, "good.png", 0.6), InitImage(missing, "gone.png", 0.6), None,
             InitImage(altered, "altered.png", 0.6), InitImage(not_image_sha, "notes.png", 0.6)]
    job_id, batches = img2img_job(engine, tiny_pipeline.sha256, specs(5, steps=STEPS), inits, 8)
    report = Runner(engine=engine, storage=storage, model_ref="", pipeline=tiny_pipeline).run(batches)
    assert (report.done, report.failed) == (2, 3)
    items = job_items(engine, job_id)
    assert [i.status for i in items] == [Status.DONE, Status.FAILED, Status.DONE, Status.FAILED,
                                         Status.FAILED]
    assert items[1].last_error == (f"init image {missing[:10]}: not in storage (no object "
                                   f"init/{missing}); was it purged, or submitted to another "
                                   "store?")
    assert items[3].last_error.startswith(f"init image {altered[:10]}: the stored object "
                                          f"init/{altered} has sha256 ")
    assert items[4].last_error == (f"init image {not_image_sha[:10]}: not an image file (no "
                                   "format PIL reads)")


def test_the_result_cache_tells_inits_and_strengths_apart(
        engine: Engine, storage: LocalStorage, tiny_pipeline: Pipeline) -> None:
    """A second job of the same seeds reuses an image only where init file, source name and
    strength are the same: never a text-to-image one for an img2img item, nor one of another
    strength or init."""
    one = store_init(engine, storage, png_bytes(init_image(64, 64, seed=8)))
    other = store_init(engine, storage, png_bytes(init_image(64, 64, seed=9)))
    same = [dict(specs(1, steps=STEPS)[0]) for _ in range(5)]
    made = [InitImage(one, "one.png", 0.6), None]
    first_id, first = img2img_job(engine, tiny_pipeline.sha256, same[:2], made, 8)
    Runner(engine=engine, storage=storage, model_ref="", pipeline=tiny_pipeline).run(first)
    first_items = job_items(engine, first_id)
    assert first_items[0].cache_key != first_items[1].cache_key

    again = [InitImage(one, "one.png", 0.6), None, InitImage(one, "one.png", 0.3),
             InitImage(other, "one.png", 0.6), InitImage(one, "one.png", 0.6)]
    second_id, second = img2img_job(engine, tiny_pipeline.sha256, same, again, 8)
    report = Runner(engine=engine, storage=storage, model_ref="", pipeline=tiny_pipeline).run(second)
    assert (report.done, report.reused) == (5, 3)
    items = job_items(engine, second_id)
    assert [i.reused_from for i in items] == [first_items[0].id, first_items[1].id, None, None,
                                              first_items[0].id]
    assert items[2].cache_key not in {i.cache_key for i in first_items}
    assert items[3].cache_key not in {i.cache_key for i in first_items}
    # What was generated carries its own init in its file.
    assert read_png_metadata(storage.get(items[3].image_key)).provenance.init == again[3]


def test_every_init_file_source_and_strength_has_its_own_key(tmp_path: Path) -> None:
    """Over every combination: text-to-image, two files, two source names, three strengths,
    with and without a LoRA. Equal inputs give equal keys, and no two combinations share one."""
    cache = ResultCache(None, None, LocalStorage(tmp_path), watermark="sdq",  # type: ignore[arg-type]
                        worker_name="w")
    model = Identity("ab" * 32, "cpu", "fp32", "fp32")
    params = GenerationParams(prompt="a harbour", seed=3, steps=STEPS)
    starts = [None] + [InitImage(sha, source, strength) for sha in ("1" * 64, "2" * 64)
                       for source in ("a.png", "b.png") for strength in (0.3, 0.6, 1.0)]
    lora = {"name": "detail", "weight": 0.8, "sha256": "c" * 64}
    keys = [cache.key(params, model, loras=loras, init=init) for init in starts
            for loras in ((), (lora,))]
    assert len(set(keys)) == len(keys) == 26
    assert keys == [cache.key(params, model, loras=loras, init=InitImage.of(
        None if init is None else {"init_sha256": init.sha256, "init_source": init.source,
                                   "strength": init.strength}))
        for init in starts for loras in ((), (lora,))]


def test_reproduce_and_verify_replay_img2img_items(
        engine: Engine, storage: LocalStorage, embedded_env: dict[str, str],
        tiny_pipeline: Pipeline, tiny_checkpoint: Path) -> None:
    """`sdq reproduce` reads the init from storage and replays the recorded batch (each member
    with its init): identical pixels; `--alone` within one level. `sdq verify` checks the
    record's init and that the init file is still stored; removed, both say so."""
    sha256 = store_init(engine, storage, png_bytes(init_image(72, 64, seed=10)))
    inits = [InitImage(sha256, "a.png", 0.6)] * 2 + [None]
    job_id, batches = img2img_job(engine, tiny_pipeline.sha256, specs(3, steps=STEPS), inits, 8)
    Runner(engine=engine, storage=storage, model_ref="", pipeline=tiny_pipeline).run(batches)
    items = job_items(engine, job_id)

    def sdq(*args: str) -> Any:
        return CliRunner().invoke(cli, list(args), env=embedded_env)

    replayed = sdq("reproduce", str(items[1].id), "--model", str(tiny_checkpoint), "--json")
    assert replayed.exit_code == 0, replayed.output
    record = json.loads(replayed.output)
    assert record["identical"] and (record["batch_size"], record["position"]) == (2, 1)
    assert record["init"] == {"sha256": sha256, "source": "a.png", "strength": 0.6}
    by_itself = sdq("reproduce", str(items[0].id), "--alone", "--model", str(tiny_checkpoint), "--json")
    assert by_itself.exit_code == 0 and json.loads(by_itself.output)["passed"], by_itself.output

    verified = sdq("verify", str(items[0].id), "--json")
    assert verified.exit_code == 0, verified.output
    checks = {c["name"]: c for c in json.loads(verified.output)["checks"]}
    assert checks["database parameters"]["status"] == "ok"
    assert checks["init image"]["status"] == "ok"
    assert "init image" not in {c["name"] for c in json.loads(sdq(
        "verify", str(items[2].id), "--json").output)["checks"]}

    storage.delete(init_key(sha256))
    gone = sdq("verify", str(items[0].id))
    assert gone.exit_code == 1 and "not in storage" in gone.output, gone.output
    refused = sdq("reproduce", str(items[0].id), "--model", str(tiny_checkpoint))
    assert refused.exit_code != 0
    assert f"init image {sha256[:10]}: not in storage" in refused.output, refused.output


def test_stored_inits_are_checked_and_kept_within_their_budget(tmp_path: Path) -> None:
    """The reader under the worker and `reproduce`: a file's EXIF orientation and mode are
    applied as `sdq generate` applies them; the cache keeps what fits, most recent first."""
    storage = LocalStorage(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6
    camera = png_bytes(init_image(32, 16, seed=1).convert("RGBA"), exif=exif)
    sha = hashlib.sha256(camera).hexdigest()
    storage.put(init_key(sha), camera)
    image = read_stored_init(storage, sha)
    assert (image.mode, image.size) == ("RGB", (16, 32))

    shas = []
    for seed in range(3):
        data = png_bytes(init_image(16, 16, seed=seed))
        shas.append(hashlib.sha256(data).hexdigest())
        storage.put(init_key(shas[-1]), data)
    cache = InitImages(storage, budget=2 * 16 * 16 * 3)
    for sha in [shas[0], shas[1], shas[0], shas[2], shas[0], shas[1]]:
        cache.get(sha)
    assert (cache.reads, len(cache)) == (4, 2)  # shas[1] dropped for shas[2], read again
    with pytest.raises(UnusableInit, match=r"^init image 0{10}: not in storage"):
        cache.get("0" * 64)


def test_a_worker_reads_inits_from_s3(embedded: Settings, tiny_pipeline: Pipeline,
                                      s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an S3 store (moto), as a worker on another machine reads it."""
    bucket = f"sdq-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    for name, value in {"AWS_ENDPOINT_URL": s3_server.endpoint,
                        "AWS_ACCESS_KEY_ID": s3_server.access_key,
                        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
                        "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(name, value)
    storage = open_storage(f"s3://{bucket}/images")
    engine = open_database(embedded.database_url)
    picture = init_image(64, 64, seed=11)
    sha256 = store_init(engine, storage, png_bytes(picture))
    init = InitImage(sha256, "s3.png", 0.6)
    job_id, batches = img2img_job(engine, tiny_pipeline.sha256, specs(2, steps=STEPS),
                                  [init, None], 8)
    assert Runner(engine=engine, storage=storage, model_ref="", pipeline=tiny_pipeline
                  ).run(batches).done == 2
    item = job_items(engine, job_id)[0]
    expected = pixels(alone(tiny_pipeline, item.params, Init(picture, 0.6)))
    assert np.abs(stored_pixels(storage, item) - expected).max() <= 1


def test_an_init_dir_job_runs_on_a_worker_that_never_saw_the_folder(
        distributed: Settings, distributed_env: dict[str, str], tiny_checkpoint: Path,
        start_worker: Callable[[str], WorkerProcess], tmp_path: Path) -> None:
    """The issue's whole path, distributed: `sdq submit --init-dir` (PostgreSQL, Redis, S3 on
    moto) stores the folder's images; the folder is deleted before an `sdq worker` process
    starts; its images are diffusers' StableDiffusionImg2ImgPipeline's within one level (a
    70x61 PNG used at 64x56, a 64x64 JPEG), and each PNG records its init."""
    folder = tmp_path / "photos"
    folder.mkdir()
    init_image(70, 61, seed=21).save(folder / "harbour.png")
    init_image(64, 64, seed=22).save(folder / "field.jpg", quality=95)
    pictures = {name: Image.open(folder / name).convert("RGB") for name in ("harbour.png", "field.jpg")}
    hashes = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in pictures}
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,negative_prompt\nan oil painting,blurry\na watercolour,\n")
    sdq = Path(sys.executable).parent / "sdq"
    submitted = subprocess.run(
        [str(sdq), "submit", str(prompts), "--init-dir", str(folder), "--strength", "0.6",
         "--model", str(tiny_checkpoint), "--steps", "10", "--sampler", "dpmpp_2m", "--seed", "5",
         "--json"], env=distributed_env, capture_output=True, text=True, timeout=300)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads(submitted.stdout)["job_id"]
    shutil.rmtree(folder)
    start_worker("i2i").wait_ready()
    wait_until_done(distributed, job_id)

    storage = open_storage(distributed.storage_url)
    reference = reference_pipeline(tiny_checkpoint, img2img=True)
    reference.scheduler = reference_scheduler("dpmpp_2m")
    items = job_items(open_database(distributed.database_url), job_id)
    assert sorted((i.prompt, i.init_source) for i in items) == sorted(
        (p, n) for p in ("an oil painting", "a watercolour") for n in pictures)
    for item in items:
        assert item.status == Status.DONE, item.last_error
        [expected] = reference(
            prompt=item.prompt, negative_prompt=item.negative_prompt,
            image=pictures[item.init_source], strength=0.6, num_inference_steps=10,
            generator=torch.Generator("cpu").manual_seed(item.seed), output_type="np").images
        ours = stored_pixels(storage, item)
        assert ours.shape == expected.shape
        assert np.abs(ours - (expected * 255).round()).max() <= 1, (item.prompt, item.init_source)
        assert read_png_metadata(storage.get(item.image_key)).provenance.init == InitImage(
            hashes[item.init_source], item.init_source, 0.6)
