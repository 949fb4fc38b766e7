"""The result cache pass on a real index and image folder, without a model: which items reuse
a stored image, and what their rows say afterwards."""
from __future__ import annotations

import hashlib
import random
from datetime import timedelta
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from sdq.core.params import GenerationParams
from sdq.db.base import utcnow
from sdq.db.models import Item, Job, Status
from sdq.db.session import read_only
from sdq.images.storage import LocalStorage
from sdq.worker.cache import UNCHECKED, Check, Identity, ResultCache, identify
from tests.fakes import FakePipeline

from .conftest import job_items, queued_job, specs

MODEL = Identity("c" * 64, "cpu", "fp32", "fp32")


def result_cache(engine: Engine, storage: LocalStorage, watermark: str | None = "mark") -> ResultCache:
    return ResultCache(sessionmaker(read_only(engine)), sessionmaker(engine), storage,
                       watermark=watermark, worker_name="w1")


def made(engine: Engine, storage: LocalStorage, cache: ResultCache, count: int, *,
         model: Identity = MODEL, job: Job | None = None, key: Check | None = None,
         items: list[dict] | None = None) -> list[Item]:
    """A job of `count` items (or `items`) done as a runner leaves them: cache key, image key
    and sha256, the verdict of the job's checker (every image flagged), and the object stored.
    `key`: the check its keys name, when not the job's (a key made before checks entered it)."""
    job = job or Job()
    pair = (job.safety_checker, job.on_flag or "keep")
    check = cache.checks([pair])[pair]
    assert check is not None
    verdict = {} if check.checker_sha256 is None else {
        "safety_flagged": True, "safety_scores": {"concept": [0.1] * 17, "special": [0.0] * 3},
        "safety_checker_sha256": check.checker_sha256,
        "safety_action": {"keep": "kept", "black": "blacked", "drop": "dropped"}[job.on_flag or "keep"]}
    job_id, _ = queued_job(engine, model.sha256, items or specs(count), 8, job=job, prefix="made")
    with Session(engine) as session, session.begin():
        for item in session.query(Item).filter(Item.job_id == job_id):
            data = f"png of {item.id}".encode()
            storage.put(f"{job_id}/{item.id}.png", data)
            session.execute(update(Item).where(Item.id == item.id).values(
                status=Status.DONE, cache_key=cache.key(GenerationParams.of(item), model, key or check),
                image_key=f"{job_id}/{item.id}.png", image_sha256=hashlib.sha256(data).hexdigest(),
                watermark="mark", finished_at=utcnow(), **verdict))
    return job_items(engine, job_id)


def checker(folder: Path) -> str:
    """A folder the cache takes for a safety checker (it hashes, never loads, checkers)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(folder.name.encode())
    return str(folder)


def test_items_whose_image_is_stored_finish_as_reusing_it(engine: Engine, storage: LocalStorage) -> None:
    cache = result_cache(engine, storage)
    before = made(engine, storage, cache, 3)
    storage.delete(before[2].image_key)  # the third one's object is gone: it must be made again
    job_id, batches = queued_job(engine, MODEL.sha256, specs(3), 8, prefix="again")
    reused = cache.reuse(batches, MODEL)
    after = job_items(engine, job_id)
    assert reused == {after[0].id, after[1].id}
    assert [(r.status, r.reused_from, r.image_key, r.image_sha256, r.watermark, r.cache_key)
            for r in after[:2]] == [
        (Status.DONE, b.id, b.image_key, b.image_sha256, "mark", b.cache_key) for b in before[:2]]
    assert {(r.worker_host, r.device, r.duration_s) for r in after[:2]} == {("w1", "cpu", 0.0)}
    assert (after[2].status, after[2].reused_from) == (Status.PENDING, None)
    with Session(engine) as session:  # one item still to make: the job is not over
        assert session.get(Job, job_id).status == Status.PENDING


def test_nothing_is_reused_across_what_changes_the_pixels_or_from_a_job_that_refuses(
        engine: Engine, storage: LocalStorage) -> None:
    cache = result_cache(engine, storage)
    made(engine, storage, cache, 1)
    _, batches = queued_job(engine, MODEL.sha256, specs(1), 8, prefix="other")
    assert cache.reuse(batches, Identity(MODEL.sha256, "cpu", "fp16", "fp16")) == set()
    assert result_cache(engine, storage, watermark=None).reuse(batches, MODEL) == set()
    _, refusing = queued_job(engine, MODEL.sha256, specs(1), 8, job=Job(reuse=False), prefix="no")
    assert cache.reuse(refusing, MODEL) == set()


def test_an_item_another_worker_runs_is_left_to_it(engine: Engine, storage: LocalStorage) -> None:
    cache = result_cache(engine, storage)
    made(engine, storage, cache, 1)
    job_id, batches = queued_job(engine, MODEL.sha256, specs(1), 8, prefix="leased")
    with Session(engine) as session, session.begin():
        session.execute(update(Item).where(Item.job_id == job_id).values(
            status=Status.RUNNING, worker_host="w2", attempts=1,
            lease_expires_at=utcnow() + timedelta(seconds=60)))
    assert cache.reuse(batches, MODEL) == set()
    assert [(r.status, r.worker_host) for r in job_items(engine, job_id)] == [(Status.RUNNING, "w2")]


def test_the_model_is_identified_without_loading_it(tmp_path: Path, tiny_checkpoint: Path) -> None:
    """The cache runs before the model loads: a model that cannot be found skips it (loading
    then fails the items with the reason)."""
    pipe = FakePipeline("d" * 64)
    assert identify(pipe, "unused", device=None, dtype=None, hash_cache=None) == Identity(
        "d" * 64, "cpu", "fp32", "fp32")
    assert identify(None, str(tmp_path / "missing.safetensors"), device="cpu", dtype=None,
                    hash_cache=None) is None
    found = identify(None, str(tiny_checkpoint), device="cpu", dtype=None,
                     hash_cache=tmp_path / "hashes.json")
    assert found is not None and (found.device, found.dtype) == ("cpu", "fp32")
    assert len(found.sha256) == 64


SAFETY = ("safety_flagged", "safety_scores", "safety_checker_sha256", "safety_action")


def test_a_reused_item_carries_the_verdict_of_its_own_jobs_checker(
        engine: Engine, storage: LocalStorage, tmp_path: Path) -> None:
    cache = result_cache(engine, storage)
    folder = checker(tmp_path / "checker")
    before = made(engine, storage, cache, 2, job=Job(safety_checker=folder, on_flag="black"))
    job_id, batches = queued_job(engine, MODEL.sha256, specs(2), 8,
                                 job=Job(safety_checker=folder, on_flag="black"), prefix="twin")
    assert len(cache.reuse(batches, MODEL)) == 2
    after = job_items(engine, job_id)
    assert [[getattr(i, c) for c in SAFETY] for i in after] == \
        [[getattr(i, c) for c in SAFETY] for i in before]
    assert {i.safety_action for i in after} == {"blacked"}


def test_no_image_is_reused_across_a_different_check(
        engine: Engine, storage: LocalStorage, tmp_path: Path) -> None:
    """Issue 25.1: an unchecked twin's images never finish a checked job (nor one that drops
    or blacks out what is flagged), and a checked job's never finish an unchecked one, even
    from keys made before the check entered them."""
    cache = result_cache(engine, storage)
    one, other = checker(tmp_path / "one"), checker(tmp_path / "other")
    made(engine, storage, cache, 1)  # unchecked
    made(engine, storage, cache, 1, job=Job(safety_checker=one, on_flag="keep"))
    for job in (Job(safety_checker=one, on_flag="drop"), Job(safety_checker=one, on_flag="black"),
                Job(safety_checker=other, on_flag="keep"), Job(safety_checker=str(tmp_path / "gone"))):
        _, batches = queued_job(engine, MODEL.sha256, specs(1), 8, job=job, prefix="checked")
        assert cache.reuse(batches, MODEL) == set(), (job.safety_checker, job.on_flag)
    # A black substitute recorded under a key of before (no check in it) is not an unchecked image.
    second = made(engine, storage, cache, 1, job=Job(safety_checker=one, on_flag="black"),
                  items=specs(1, seed=7), key=UNCHECKED)
    assert second[0].safety_action == "blacked"
    _, batches = queued_job(engine, MODEL.sha256, specs(1, seed=7), 8, prefix="unchecked")
    assert cache.reuse(batches, MODEL) == set()


def test_reuse_happens_iff_everything_that_shapes_the_image_and_record_is_equal(
        engine: Engine, storage: LocalStorage, tmp_path: Path) -> None:
    """Random pairs (seeded) of jobs of one item: the second reuses the first's image exactly
    when the two make the same stored image and record."""
    cache = result_cache(engine, storage)
    folders = (None, checker(tmp_path / "a"), checker(tmp_path / "b"))
    choices: dict[str, tuple] = {
        "prompt": ("a fox", "a cat"), "seed": (1, 2), "cfg": (7.5, 5.0), "steps": (2, 3),
        "sampler": ("euler", "ddim"), "width": (64, 32), "clip_skip": (1, 2),
        "prompt_syntax": ("a1111", "plain"), "negative_prompt": ("", "blur"),
        "sha256": ("c" * 64, "e" * 64), "device": ("cpu", "cuda:0", "cuda:1"),
        "dtype": ("fp32", "fp16"), "vae_dtype": ("fp32", "fp16"),
        "checker": folders, "on_flag": ("keep", "black", "drop"),
    }
    model_fields = ("sha256", "device", "dtype", "vae_dtype")
    job_fields = ("checker", "on_flag")

    def meaning(request: dict) -> dict:
        return {**request, "device": request["device"].split(":")[0],
                "on_flag": request["on_flag"] if request["checker"] else None}

    def parts(request: dict) -> tuple[dict, Identity, Job]:
        item = {k: v for k, v in request.items() if k not in model_fields + job_fields}
        return ({**item, "height": 64}, Identity(*(request[k] for k in model_fields)),
                Job(safety_checker=request["checker"], on_flag=request["on_flag"]))

    rng = random.Random(25)
    outcomes = {True: 0, False: 0}
    for n in range(40):
        first = {name: rng.choice(values) for name, values in choices.items()}
        second = dict(first)
        for name in rng.sample(sorted(choices), rng.choice((0, 0, 1, 1, 2))):
            second[name] = rng.choice(choices[name])
        item, model, job = parts(first)
        made(engine, storage, cache, 1, model=model, job=job,
             items=[{**item, "prompt": f"{n} {item['prompt']}"}])
        item, model, job = parts(second)
        _, batches = queued_job(engine, model.sha256, [{**item, "prompt": f"{n} {item['prompt']}"}],
                                8, job=job, prefix=f"pair{n}")
        same = meaning(first) == meaning(second)
        assert bool(cache.reuse(batches, model)) == same, (first, second)
        outcomes[same] += 1
    assert min(outcomes.values()) >= 10
