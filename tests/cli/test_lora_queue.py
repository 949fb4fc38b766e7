"""LoRAs and embeddings from the user to the model and back, through the queue: `sdq submit`
finds and hashes every file an item names before anything is recorded, the runner merges each
LoRA set once per group, refuses a changed file, and the rows, the cache key and the PNG's
provenance carry what made each image."""
from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from sdq.core.settings import Settings
from sdq.db.models import Item, Job, Status
from sdq.images.provenance import parse_parameters, read_png_metadata
from sdq.images.storage import Storage, open_storage
from sdq.jobs.submit import identify_model
from sdq.jobs.submit import submit as submit_items
from sdq.worker.factory import runner_from_settings
from tests.adapters import sha256, write_embedding, write_loras

from .conftest import Home

SMALL = ["--width", "64", "--height", "64", "--steps", "2", "--sampler", "euler"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_checkpoint) -> Path:
    """loras/{detail,style}.safetensors and embeddings/badneg.safetensors."""
    root = tmp_path_factory.mktemp("adapters")
    write_loras(root / "loras", tiny_checkpoint, {"detail": 1, "style": 2})
    write_embedding(root / "embeddings", "badneg")
    return root


def items_of(home: Home, job_id: int) -> list[Item]:
    with Session(home.engine) as session:
        return list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.row_index)))


def pixels(storage: Storage, item: Item) -> bytes:
    return Image.open(io.BytesIO(storage.get(item.image_key))).convert("RGB").tobytes()


def submit(home: Home, checkpoint: Path, adapters: Path, prompts: Path, *extra: str):
    return home.run("submit", str(prompts), "--model", str(checkpoint), *SMALL, "--seed", "5",
                    "--lora-dir", str(adapters / "loras"),
                    "--embeddings-dir", str(adapters / "embeddings"), "--json", *extra)


def test_submit_records_each_items_loras_and_embeddings_and_the_png_says_so(
        home: Home, tiny_checkpoint: Path, adapters: Path) -> None:
    prompts = home.path / "prompts.csv"
    prompts.write_text("prompt,negative_prompt\n"
                       '"a fox <lora:detail:0.8>",badneg\n'
                       "a plain fox,lowres\n")
    result = submit(home, tiny_checkpoint, adapters, prompts, "--lora", "style:0.5")
    assert result.exit_code == 0, result.output
    job_id = json.loads(result.stdout)["job_id"]
    first, second = items_of(home, job_id)
    detail = sha256(adapters / "loras" / "detail.safetensors")
    style = sha256(adapters / "loras" / "style.safetensors")
    assert [(r["name"], r["weight"], r["sha256"]) for r in first.loras] == [
        ("detail", 0.8, detail), ("style", 0.5, style)]
    assert [(r["name"], r["weight"], r["sha256"]) for r in second.loras] == [("style", 0.5, style)]
    assert first.embeddings == [{"name": "badneg",
                                 "sha256": sha256(adapters / "embeddings" / "badneg.safetensors")}]
    assert second.embeddings is None
    assert (first.status, second.status) == (Status.DONE, Status.DONE)
    storage = open_storage(str(home.path / "home" / "images"))
    meta = read_png_metadata(storage.get(first.image_key))
    assert meta.provenance.loras == tuple(first.loras)
    assert meta.provenance.embeddings == tuple(first.embeddings)
    text = meta.parameters_text
    assert text.startswith("a fox <lora:detail:0.8>\nNegative prompt: badneg\n")
    fields = parse_parameters(text).settings
    assert fields["Lora hashes"] == f"detail: {first.loras[0]['a1111']}, style: {first.loras[1]['a1111']}"
    assert fields["TI hashes"] == f"badneg: {first.embeddings[0]['sha256'][:12]}"
    with Session(home.engine) as session:
        job = session.get(Job, job_id)
        assert job.defaults["loras"] == ["style:0.5"]
        assert job.defaults["lora_dirs"] == [str((adapters / "loras").resolve())]
    # search by LoRA name, at any weight
    found = json.loads(home.run("search", "--lora", "detail", "--json").stdout)
    assert [r["id"] for r in found] == [first.id]
    assert found[0]["loras"][0]["sha256"] == detail and found[0]["embeddings"][0]["name"] == "badneg"
    assert [r["id"] for r in json.loads(home.run("search", "--lora", "style", "--json").stdout)] == [
        second.id, first.id]
    assert json.loads(home.run("search", "--lora", "sty", "--json").stdout) == []
    shown = home.run("show", str(first.id)).stdout
    assert f"detail:0.8 (sha256 {detail[:12]}), style:0.5 (sha256 {style[:12]})" in shown
    assert f"badneg (sha256 {first.embeddings[0]['sha256'][:12]})" in shown
    # the same file again: every image is the one stored (same LoRA files, same key)
    again = submit(home, tiny_checkpoint, adapters, prompts, "--lora", "style:0.5")
    assert json.loads(again.stdout)["reused"] == 2
    # another weight is another image
    other = submit(home, tiny_checkpoint, adapters, prompts, "--lora", "style:0.6")
    assert json.loads(other.stdout)["reused"] == 0


def test_exports_carry_typed_lora_and_embedding_columns(home: Home, tiny_checkpoint: Path,
                                                        adapters: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    prompts = home.path / "prompts.csv"
    prompts.write_text('prompt,negative_prompt\n"a fox <lora:detail:0.8>",badneg\na plain fox,\n')
    job_id = json.loads(submit(home, tiny_checkpoint, adapters, prompts).stdout)["job_id"]
    first, _ = items_of(home, job_id)
    for fmt in ("parquet", "webdataset", "imagefolder"):
        result = home.run("export", str(job_id), "--format", fmt, "-o", str(tmp_path / fmt))
        assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "parquet")
    assert table.schema.field("loras").type == pa.list_(pa.struct(
        [("name", pa.string()), ("weight", pa.float64()), ("sha256", pa.string()),
         ("a1111", pa.string())]))
    assert table.schema.field("embeddings").type == pa.list_(pa.struct(
        [("name", pa.string()), ("sha256", pa.string())]))
    rows = sorted(table.select(["id", "loras", "embeddings"]).to_pylist(), key=lambda r: r["id"])
    assert rows[0]["loras"] == [{"name": "detail", "weight": 0.8, "sha256": first.loras[0]["sha256"],
                                 "a1111": first.loras[0]["a1111"]}]
    assert rows[0]["embeddings"] == first.embeddings
    assert (rows[1]["loras"], rows[1]["embeddings"]) == ([], [])  # empty lists, not nulls
    metadata = pq.read_table(tmp_path / "imagefolder" / "metadata.parquet").to_pylist()
    assert [(m["loras"], m["embeddings"]) for m in metadata] == [
        (rows[0]["loras"], rows[0]["embeddings"]), ([], [])]


def test_an_unknown_lora_is_a_problem_of_its_line_and_nothing_is_recorded(
        home: Home, tiny_checkpoint: Path, adapters: Path) -> None:
    prompts = home.path / "prompts.csv"
    prompts.write_text("prompt\na fox\n\"a cat <lora:nosuch:0.5>\"\n")
    result = submit(home, tiny_checkpoint, adapters, prompts)
    assert result.exit_code == 2, result.output
    assert (f"prompts.csv:3: lora: no nosuch.safetensors in {(adapters / 'loras').resolve()}"
            in result.stderr)
    with Session(home.engine) as session:
        assert session.scalar(select(Job.id)) is None


def test_a_changed_lora_file_fails_its_items_and_never_makes_them_with_another(
        home: Home, tiny_checkpoint: Path, adapters: Path) -> None:
    """The worker's copy has another sha256 than the one recorded at submit: those items
    fail with that reason, their batch-mates without the LoRA are made."""
    settings = replace(Settings.load(home.env), lora_dir=(adapters / "loras",))
    recorded = {"name": "detail", "weight": 1.0, "sha256": "0" * 64}
    specs = [{"prompt": "a fox", "seed": 1, "sampler": "euler", "steps": 2, "cfg": 7.5,
              "width": 64, "height": 64, "loras": [recorded]},
             {"prompt": "a plain fox", "seed": 2, "sampler": "euler", "steps": 2, "cfg": 7.5,
              "width": 64, "height": 64}]
    done = submit_items(settings, specs, model=identify_model(str(tiny_checkpoint)),
                        make_runner=runner_from_settings)
    changed, plain = items_of(home, done.job_id)
    assert (changed.status, plain.status) == (Status.FAILED, Status.DONE)
    found = sha256(adapters / "loras" / "detail.safetensors")
    assert changed.last_error == (f"lora detail: {adapters / 'loras' / 'detail.safetensors'} has "
                                  f"sha256 {found[:12]}, not the {'0' * 12} the job recorded; "
                                  "restore that file or resubmit")


def test_reproduce_needs_the_files_with_the_recorded_hashes(home: Home, tiny_checkpoint: Path,
                                                            adapters: Path, tmp_path: Path) -> None:
    prompts = home.path / "prompts.csv"
    prompts.write_text('prompt,negative_prompt\n"a fox <lora:detail:0.8>",badneg\n')
    job_id = json.loads(submit(home, tiny_checkpoint, adapters, prompts).stdout)["job_id"]
    (item,) = items_of(home, job_id)
    made = home.run("reproduce", str(item.id), "--lora-dir", str(adapters / "loras"),
                    "--embeddings-dir", str(adapters / "embeddings"), "--json")
    assert made.exit_code == 0, made.output
    assert json.loads(made.stdout)["identical"] is True
    missing = home.run("reproduce", str(item.id))
    assert missing.exit_code == 3, missing.output
    assert (f"item {item.id} was made with LoRA detail (sha256 {item.loras[0]['sha256'][:12]}), "
            "which is not here: lora: no detail.safetensors in no LoRA folder") in missing.output
    write_loras(tmp_path / "other", tiny_checkpoint, {"detail": 9})
    changed = home.run("reproduce", str(item.id), "--lora-dir", str(tmp_path / "other"))
    assert changed.exit_code == 3, changed.output
    assert f"LoRA detail sha256 {item.loras[0]['sha256'][:12]}; detail here has" in changed.output
    no_embedding = home.run("reproduce", str(item.id), "--lora-dir", str(adapters / "loras"))
    assert no_embedding.exit_code == 3, no_embedding.output
    assert "embedding badneg (sha256" in no_embedding.output


def test_a_worker_makes_an_item_only_with_the_embeddings_it_recorded(
        home: Home, tiny_checkpoint: Path, adapters: Path) -> None:
    """A worker whose embeddings folder differs from the submitter's (none, or another file)
    fails the items whose prompts would read other vectors than their record says."""
    folder = adapters / "embeddings"
    recorded = {"name": "badneg", "sha256": sha256(folder / "badneg.safetensors")}
    spec = {"prompt": "a fox", "negative_prompt": "badneg", "sampler": "euler", "steps": 2,
            "cfg": 7.5, "width": 64, "height": 64}
    cases = [({"seed": 1, "embeddings": [recorded]}, None, Status.FAILED),  # worker has no folder
             ({"seed": 2}, folder, Status.FAILED),  # submitted without the folder the worker has
             ({"seed": 3, "embeddings": [{**recorded, "sha256": "1" * 64}]}, folder, Status.FAILED),
             ({"seed": 4, "embeddings": [recorded]}, folder, Status.DONE)]
    reasons = []
    for extra, worker_folder, expected in cases:
        settings = replace(Settings.load(home.env), embeddings_dir=worker_folder)
        done = submit_items(settings, [{**spec, **extra}], model=identify_model(str(tiny_checkpoint)),
                            make_runner=runner_from_settings)
        (item,) = items_of(home, done.job_id)
        assert item.status == expected, item.last_error
        reasons.append(item.last_error)
    assert reasons[:3] == [
        "embeddings: its prompts name none with no embeddings folder here, the job recorded "
        "badneg; give workers the submitter's embeddings folder (SDQ_EMBEDDINGS_DIR)",
        f"embeddings: its prompts name badneg in {folder}, the job recorded none; give workers "
        "the submitter's embeddings folder (SDQ_EMBEDDINGS_DIR)",
        f"embedding badneg: {folder / 'badneg.safetensors'} has sha256 {recorded['sha256'][:12]}, "
        f"not the {'1' * 12} the job recorded; restore that file or resubmit"]


def test_generate_applies_and_records_them_too(home: Home, tiny_checkpoint: Path, adapters: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "fox.png"
    made = home.run("generate", "a fox <lora:detail:0.8>", "--negative-prompt", "badneg",
                    "--model", str(tiny_checkpoint), *SMALL, "--seed", "3", "--clip-skip", "2",
                    "--lora-dir", str(adapters / "loras"), "--embeddings-dir",
                    str(adapters / "embeddings"), "-o", str(out))
    assert made.exit_code == 0, made.output
    plain = home.run("generate", "a fox", "--negative-prompt", "badneg", "--model",
                     str(tiny_checkpoint), *SMALL, "--seed", "3", "--clip-skip", "2",
                     "-o", str(tmp_path / "plain.png"))
    assert plain.exit_code == 0, plain.output
    settings = parse_parameters(read_png_metadata(out.read_bytes()).parameters_text).settings
    assert (settings["Clip skip"], settings["Lora hashes"].split(":")[0],
            settings["TI hashes"].split(":")[0]) == ("2", "detail", "badneg")
    with Image.open(out) as ours, Image.open(tmp_path / "plain.png") as theirs:
        assert ours.tobytes() != theirs.tobytes()  # the LoRA and embedding changed the pixels
    missing = home.run("generate", "a <lora:nosuch>", "--model", str(tiny_checkpoint), *SMALL)
    assert missing.exit_code == 2 and "no nosuch.safetensors in no LoRA folder" in missing.output


def test_a_job_alternating_loras_is_planned_one_set_per_batch(home: Home, tiny_checkpoint: Path,
                                                               adapters: Path) -> None:
    """Rows alternating two LoRAs (and none), in batches of 3: each set's items fill batches of
    their own, in order of first use, so a worker switches sets once per batch, not once per
    set in every batch; the images are those of the same items made in row order (per-image
    generators: planning never changes pixels)."""
    prompts = home.path / "alternating.csv"
    prompts.write_text("prompt\n" + "".join(
        f"a fox {['<lora:detail:1>', '<lora:style:1>', ''][n % 3]}\n" for n in range(9)))
    result = submit(home, tiny_checkpoint, adapters, prompts, "--batch-size", "3")
    assert result.exit_code == 0, result.output
    made = items_of(home, json.loads(result.stdout)["job_id"])
    batches: dict[str, list[int]] = {}
    for item in made:
        assert item.status == Status.DONE, item.last_error
        batches.setdefault(item.batch_id, []).append(item.row_index)
    assert sorted(batches.values()) == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert {len({tuple(r["name"] for r in made[row].loras or ()) for row in rows})
            for rows in batches.values()} == {1}
    storage = open_storage(str(home.path / "home" / "images"))
    again = submit(home, tiny_checkpoint, adapters, prompts, "--batch-size", "9", "--no-reuse")
    for first, second in zip(made, items_of(home, json.loads(again.stdout)["job_id"])):
        assert pixels(storage, first) == pixels(storage, second)
