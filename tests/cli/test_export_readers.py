"""Every export format loads with one call in the readers people use: pyarrow, pandas,
Hugging Face `datasets` (`data_dir=`) and `webdataset`, images decoded, fields typed."""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from datasets import Image as ImageFeature
from datasets import concatenate_datasets, load_dataset
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from sdq.cli.common import item_record
from sdq.db.models import Item
from sdq.jobs.export import parquet_schema

from .conftest import Home


@pytest.fixture
def two_jobs(home: Home) -> tuple[int, int]:
    """Two jobs unlike each other where per-shard type inference would differ: the first has
    no tags and no recorded error, the second has both."""
    plain = home.add_job(["a red fox", "a lighthouse", "a boat"], done=3)
    tagged = home.add_job(["a red castle", "a dragon"], done=2,
                          item_tags=[["castle", "red"], ["dragon"]])
    with Session(home.engine) as session:
        retried = session.scalars(select(Item).where(Item.job_id == tagged.id)).first()
        retried.last_error, retried.attempts = "CUDA out of memory", 2
        session.commit()
    home.judge(tagged.id, {0: False, 1: True})
    return plain.id, tagged.id


def export(home: Home, out: Path, *args: str) -> None:
    result = home.run("export", *args, "-o", str(out))
    assert result.exit_code == 0, result.output


def items(home: Home, job_id: int) -> list[Item]:
    with Session(home.engine) as session:
        return list(session.scalars(select(Item).where(Item.job_id == job_id).order_by(Item.id)))


def files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def hf(builder: str, folder: Path, cache: Path):  # type: ignore[no-untyped-def]
    return load_dataset(builder, data_dir=str(folder), split="train", cache_dir=str(cache))


def test_parquet_of_two_jobs_is_one_typed_table_everywhere(home: Home, tmp_path: Path,
                                                           two_jobs: tuple[int, int]) -> None:
    out = tmp_path / "out"
    export(home, out, str(two_jobs[0]), "--format", "parquet", "--prefix", "plain")
    export(home, out, str(two_jobs[1]), "--format", "parquet", "--prefix", "tagged")

    table = pq.read_table(out)
    assert table.num_rows == 5
    assert table.schema.remove_metadata() == parquet_schema().remove_metadata()
    for shard in out.glob("*.parquet"):
        assert pq.read_schema(shard) == parquet_schema()  # the same declared schema, metadata too
    rows = {row["prompt"]: row for row in table.to_pylist()}
    assert rows["a red castle"]["tags"] == ["castle", "red"] and rows["a red fox"]["tags"] == []
    assert rows["a red castle"]["error"] == "CUDA out of memory" and rows["a boat"]["error"] is None
    assert table.schema.field("finished").type == pa.timestamp("us", tz="UTC")
    assert (rows["a dragon"]["safety_flagged"], rows["a red castle"]["safety_flagged"],
            rows["a boat"]["safety_flagged"]) == (True, False, None)
    assert rows["a dragon"]["safety_concept_scores"][0] == 0.012
    assert rows["a boat"]["safety_special_scores"] is None
    assert table.schema.field("safety_concept_scores").type == pa.list_(pa.float64())

    frame = pd.read_parquet(out)
    assert len(frame) == 5 and str(frame["finished"].dtype).endswith("UTC]")

    with Session(home.engine) as session:
        record = item_record(session.get(Item, rows["a boat"]["id"]))
    assert set(parquet_schema().names) == {"key", "image", "provenance", *record}

    dataset = hf("parquet", out, tmp_path / "hf")
    assert isinstance(dataset.features["image"], ImageFeature)
    first = dataset[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size == (64, 64)
    assert sorted(map(tuple, dataset["tags"])) == [(), (), (), ("castle", "red"), ("dragon",)]
    assert sorted(dataset["safety_flagged"], key=str) == [False, None, None, None, True]


def test_webdataset_loads_in_webdataset_and_datasets(home: Home, tmp_path: Path,
                                                     two_jobs: tuple[int, int]) -> None:
    out = tmp_path / "out"
    export(home, out, "--query", "a", "--format", "webdataset", "--shard-size", "2")
    urls = sorted(str(path) for path in out.glob("*.tar"))
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["txt"] for s in samples] == ["a red fox", "a lighthouse", "a boat", "a red castle",
                                           "a dragon"]
    assert isinstance(samples[3]["png"], Image.Image)
    assert samples[3]["json"]["tags"] == ["castle", "red"]

    # The first samples have no tags and no error: the declared types (.huggingface.yaml) hold.
    dataset = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert dataset.num_rows == 5 and dataset[3]["txt"] == "a red castle"
    assert isinstance(dataset[3]["png"], Image.Image)
    assert (dataset[3]["json"]["tags"], dataset[3]["json"]["error"]) == (
        ["castle", "red"], "CUDA out of memory")


def test_a_webdataset_with_a_card_loads_typed_whatever_its_first_samples_hold(
        home: Home, tmp_path: Path) -> None:
    """datasets infers a webdataset's types from its first five samples: here six with no tags
    and no error come first, then one with both. The card's declared features carry the day."""
    home.add_job([f"a plain boat {n}" for n in range(6)], done=6)
    tagged = home.add_job(["a red castle"], done=1, item_tags=[["castle", "red"]])
    with Session(home.engine) as session:
        retried = session.scalars(select(Item).where(Item.job_id == tagged.id)).one()
        retried.last_error = "CUDA out of memory"
        session.commit()
    out = tmp_path / "out"
    export(home, out, "--query", "a", "--format", "webdataset", "--card")
    dataset = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert dataset.num_rows == 7 and isinstance(dataset.features["png"], ImageFeature)
    record = dataset.features["json"]
    assert (str(record["tags"].feature.dtype), record["error"].dtype, record["finished"].dtype) == (
        "string", "string", "timestamp[us, tz=UTC]")
    last = dataset[6]
    assert last["txt"] == "a red castle" and isinstance(last["png"], Image.Image)
    assert (last["json"]["tags"], last["json"]["error"]) == (["castle", "red"], "CUDA out of memory")
    assert dataset[0]["json"]["tags"] == [] and dataset[0]["json"]["error"] is None


def test_imagefolder_loads_in_datasets(home: Home, tmp_path: Path,
                                       two_jobs: tuple[int, int]) -> None:
    out = tmp_path / "out"
    export(home, out, str(two_jobs[1]), "--format", "imagefolder")
    dataset = hf("imagefolder", out, tmp_path / "hf")
    assert [row["prompt"] for row in dataset] == ["a red castle", "a dragon"]
    assert isinstance(dataset[0]["image"], Image.Image) and dataset[0]["tags"] == ["castle", "red"]


def test_an_imagefolder_of_an_earlier_sdq_loses_its_metadata_jsonl(
        home: Home, tmp_path: Path, two_jobs: tuple[int, int]) -> None:
    """Earlier versions wrote `metadata.jsonl`; `datasets` refuses a folder with two metadata
    formats, so a rerun replaces it with `metadata.parquet` (and keeps the images)."""
    out = tmp_path / "out"
    export(home, out, str(two_jobs[1]), "--format", "imagefolder")
    (out / "metadata.parquet").unlink()
    (out / "metadata.jsonl").write_text("".join(
        f'{{"file_name": "images/{item.id:010d}.png", "prompt": "{item.prompt}"}}\n'
        for item in items(home, two_jobs[1])))
    result = home.run("export", str(two_jobs[1]), "--format", "imagefolder", "-o", str(out))
    assert result.output.endswith("0 written, 1 already there\n"), result.output
    assert "metadata.jsonl" not in files(out)
    dataset = hf("imagefolder", out, tmp_path / "hf")
    assert dataset[0]["tags"] == ["castle", "red"] and isinstance(dataset[0]["image"], Image.Image)


@pytest.mark.parametrize("fmt", ["parquet", "webdataset", "imagefolder"])
def test_a_dataset_card_beside_the_data_keeps_every_reader_working(
        home: Home, tmp_path: Path, two_jobs: tuple[int, int], fmt: str) -> None:
    out = tmp_path / "out"
    export(home, out, str(two_jobs[1]), "--format", fmt)  # first without a card
    export(home, out, str(two_jobs[1]), "--format", fmt, "--card")
    data = {"parquet": ["shard-000000.parquet"], "webdataset": ["shard-000000.tar"],
            "imagefolder": [*(f"images/{i.id:010d}.png" for i in items(home, two_jobs[1])),
                            "metadata.parquet"]}[fmt]
    typed = [".huggingface.yaml"] if fmt == "webdataset" else []  # at the top in both layouts
    assert files(out) == [*typed, ".shard-manifest.json", "README.md", *(f"data/{f}" for f in data)]

    card = (out / "README.md").read_text()
    _, front, body = card.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["size_categories"] == ["n<1K"] and meta["task_categories"] == ["text-to-image"]
    assert f"# sdq images of job {two_jobs[1]}" in body
    assert "| tiny | ababababab | euler | 20 | 7.5 | 64x64 | 2 |" in body

    code = body.split("```python\n", 1)[1].split("```", 1)[0]  # the card's "Loading" code
    shown: dict[str, Any] = {"load_dataset": functools.partial(
        load_dataset, cache_dir=str(tmp_path / "card")), "pq": pq}
    exec("\n".join(line for line in code.replace("THIS_FOLDER", str(out)).splitlines()  # noqa: S102
                   if not line.startswith(("from ", "import "))), shown)
    assert [len(shown[name]) for name in ("images", "table") if name in shown] == (
        [2, 2] if fmt != "webdataset" else [2])

    dataset = hf(fmt, out, tmp_path / "hf")
    assert dataset.num_rows == 2
    if fmt == "parquet":
        assert pq.read_table(out / "data").num_rows == 2
        assert len(pd.read_parquet(out / "data")) == 2
        hub = load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hub"))
        assert isinstance(hub[0]["image"], Image.Image)

    export(home, out, str(two_jobs[1]), "--format", fmt)  # and back: the card goes
    assert files(out) == [*typed, ".shard-manifest.json", *data]


def help_calls(home: Home) -> dict[tuple[str, bool], list[str]]:
    """The loading calls `export --help` lists, by format and --card."""
    calls: dict[tuple[str, bool], list[str]] = {}
    layout: tuple[str, bool] | None = None
    for line in home.run("export", "--help").output.splitlines():
        found = re.fullmatch(r"\s+(parquet|webdataset|imagefolder)( --card)?\s+(.*)", line)
        if found:
            layout = (found[1], bool(found[2]))
        elif layout is None or not re.fullmatch(r"\s{10,}\S.*", line):
            layout = None
            continue
        calls.setdefault(layout, []).extend(re.findall(r"\w+(?:\.\w+)?\([^)]*\)",
                                                       found[3] if found else line))
    return calls


def test_each_call_export_help_names_loads_the_whole_export(
        home: Home, tmp_path: Path, two_jobs: tuple[int, int]) -> None:
    calls = help_calls(home)
    assert set(calls) == {(fmt, card) for fmt in ("parquet", "webdataset", "imagefolder")
                          for card in (False, True)}
    for (fmt, card), layout_calls in calls.items():
        out = tmp_path / f"{fmt}-{card}"
        export(home, out, "--query", "a", "--format", fmt, *(["--card"] if card else []))
        names = {"pq": pq, "pd": pd, "load_dataset": functools.partial(
            load_dataset, split="train", cache_dir=str(tmp_path / "hf" / out.name))}
        for call in layout_calls:
            loaded = eval(call.replace("DEST", str(out)), names)  # noqa: S307 - the help's text
            assert len(loaded) == 5, (fmt, card, call)


def fill_every_field(home: Home, job_id: int) -> None:
    """Give each item of the job a value in every field that is empty or null by default."""
    with Session(home.engine) as session:
        for item in session.scalars(select(Item).where(Item.job_id == job_id)):
            item.tags, item.last_error, item.attempts = ["castle", "red"], "CUDA out of memory", 2
            item.loras = [{"name": "ink", "weight": 0.8, "sha256": "ef" * 32,
                           "a1111": "<lora:ink:0.8>"}]
            item.embeddings = [{"name": "bad-hands", "sha256": "12" * 32}]
            item.template, item.template_values = "a {color} castle", {"color": "red"}
            item.watermark, item.worker_host, item.duration_s = "StableDiffusionV1", "gpu-1", 1.5
            item.batch_id, item.batch_position = "b-1", item.row_index
            item.cache_key, item.reused_from = "34" * 32, 1
            item.init_sha256, item.init_source, item.strength = "56" * 32, "castle.png", 0.6
        session.commit()
    home.judge(job_id, {0: True, 1: False})


@pytest.mark.parametrize("card", [False, True])
@pytest.mark.parametrize("fmt", ["webdataset", "imagefolder"])
def test_an_export_of_empty_and_null_fields_loads_with_the_types_of_a_full_one(
        home: Home, tmp_path: Path, fmt: str, card: bool) -> None:
    """No tags, LoRAs, embeddings, template, error, watermark or safety verdict anywhere in
    one export; all of them in another: `export --help`'s calls load both with the parquet
    export's types (each field typed, none `null`), with or without a card, so the two
    concatenate."""
    bare = home.add_job(["a red fox", "a boat"], done=2)
    full = home.add_job(["a red castle", "a dragon"], done=2)
    fill_every_field(home, full.id)
    with Session(home.engine) as session:
        record = item_record(session.scalars(select(Item).where(Item.job_id == full.id)).first())
    assert all(value not in (None, [], {}) for value in record.values()), record
    export(home, tmp_path / "typed", str(full.id), "--format", "parquet")
    typed = {name: feature for name, feature in hf("parquet", tmp_path / "typed", tmp_path / "hf")
             .features.items() if name not in ("key", "image", "provenance")}

    calls = [call for call in help_calls(home)[(fmt, card)] if call.startswith("load_dataset")]
    assert calls
    loaded = []
    for job in (bare, full):
        out = tmp_path / f"{fmt}-{job.id}"
        export(home, out, str(job.id), "--format", fmt, *(["--card"] if card else []))
        for call in calls:
            dataset = eval(call.replace("DEST", str(out)), {"load_dataset": functools.partial(  # noqa: S307
                load_dataset, split="train", cache_dir=str(tmp_path / "hf" / out.name))})
            features = dataset.features["json"] if fmt == "webdataset" else {
                name: feature for name, feature in dataset.features.items() if name != "image"}
            assert features == typed, (job.id, call)
        loaded.append(dataset)
    both = concatenate_datasets(loaded)
    rows = [row["json"] if fmt == "webdataset" else row for row in both]
    assert [(row["prompt"], row["tags"], row["template_values"]) for row in rows] == [
        ("a red fox", [], None), ("a boat", [], None),
        ("a red castle", ["castle", "red"], '{"color": "red"}'),
        ("a dragon", ["castle", "red"], '{"color": "red"}')]
