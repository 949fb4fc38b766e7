"""`sdq export`: webdataset, parquet and imagefolder shards, to a folder or a bucket, resumable."""
from __future__ import annotations

import io
import json
import re
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from packaging.requirements import Requirement
from sqlalchemy import select
from sqlalchemy.orm import Session

from sdq.db.models import Item
from sdq.images.storage import open_storage

from .conftest import MODEL_SHA, Home

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

PROMPTS = ["a red fox", "a lighthouse", "a red castle", "a boat", "a red dragon", "unfinished"]


def done_items(home: Home, job_id: int) -> list[Item]:
    with Session(home.engine) as session:
        return list(session.scalars(select(Item).where(Item.job_id == job_id,
                                                       Item.image_key.is_not(None))
                                    .order_by(Item.id)))


def source(home: Home):  # type: ignore[no-untyped-def]
    return open_storage(str(home.path / "home" / "images"))


def test_webdataset_shards_hold_image_prompt_and_record(home: Home, tmp_path: Path) -> None:
    job = home.add_job(PROMPTS, done=5)
    items = done_items(home, job.id)
    result = home.run("export", str(job.id), "--format", "webdataset", "--shard-size", "2",
                      "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == (
        f"5 image(s) in 3 shard(s) to {tmp_path / 'out'}: 3 written, 0 already there")
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.tar"))
    assert shards == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(tmp_path / "out" / "shard-000001.tar") as tar:
        names = tar.getnames()
        keys = [f"{i.id:010d}" for i in items[2:4]]
        assert names == [f"{k}.{s}" for k in keys for s in ("png", "txt", "json")]
        assert tar.extractfile(f"{keys[0]}.png").read() == source(home).get(items[2].image_key)
        assert tar.extractfile(f"{keys[0]}.txt").read().decode() == "a red castle"
        record = json.loads(tar.extractfile(f"{keys[0]}.json").read())
    assert (record["id"], record["seed"], record["model"], record["status"]) == (
        items[2].id, items[2].seed, "tiny", "done")


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_resumed_export_keeps_the_shards_already_written(
        home: Home, tmp_path: Path, where: str, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    dest = str(tmp_path / "out")
    if where == "s3":
        dest = f"s3://{request.getfixturevalue('bucket')}/exports"
        monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("s3_server").endpoint)
    target = open_storage(dest)
    job = home.add_job(PROMPTS, done=5)
    items = done_items(home, job.id)
    hidden = source(home).get(items[3].image_key)  # in the second shard: it fails
    source(home).delete(items[3].image_key)
    args = ["export", str(job.id), "--format", "webdataset", "--shard-size", "2", "-o", dest]

    failed = home.run(*args)
    assert failed.exit_code == 1
    assert failed.output.splitlines()[-1] == (
        f"Error: item {items[3].id}: image {items[3].image_key} is missing from storage "
        "(`sdq verify` checks a job's images)")
    assert [k for k in target.list() if k.endswith(".tar")] == ["shard-000000.tar"]
    first = _version(target, dest, "shard-000000.tar")

    source(home).put(items[3].image_key, hidden)
    resumed = home.run(*args)
    assert resumed.exit_code == 0, resumed.output
    assert resumed.output.endswith("2 written, 1 already there\n")
    assert _version(target, dest, "shard-000000.tar") == first
    assert [k for k in target.list() if k.endswith(".tar")] == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(fileobj=io.BytesIO(target.get("shard-000001.tar"))) as tar:
        assert tar.extractfile(f"{items[3].id:010d}.png").read() == hidden


def _version(target, dest: str, key: str) -> object:  # type: ignore[no-untyped-def]
    """What changes when a file is rewritten: its mtime, or the object's ETag and time."""
    if dest.startswith("s3://"):
        head = target._client.head_object(Bucket=target.bucket, Key=target._key(key))
        return head["ETag"], head["LastModified"]
    return (Path(dest) / key).stat().st_mtime_ns


def test_imagefolder_by_query(home: Home, tmp_path: Path) -> None:
    job = home.add_job(PROMPTS, done=5)
    red = [i for i in done_items(home, job.id) if "red" in i.prompt]
    result = home.run("export", "--query", "red", "--format", "imagefolder", "-o",
                      str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    lines = pq.read_table(tmp_path / "out" / "metadata.parquet").to_pylist()
    assert [(r["file_name"], r["prompt"]) for r in lines] == [
        (f"images/{i.id:010d}.png", i.prompt) for i in red]
    for item in red:
        assert (tmp_path / "out" / f"images/{item.id:010d}.png").read_bytes() == \
            source(home).get(item.image_key)


def test_parquet_rows_carry_the_image_and_the_provenance(home: Home, tmp_path: Path) -> None:
    job = home.add_job(PROMPTS, done=5)
    items = done_items(home, job.id)
    result = home.run("export", str(job.id), "--format", "parquet", "--shard-size", "3", "-o",
                      str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    table = pq.read_table(tmp_path / "out" / "shard-000001.parquet").to_pylist()
    assert [row["id"] for row in table] == [i.id for i in items[3:]]
    assert table[0]["image"]["bytes"] == source(home).get(items[3].image_key)
    assert (table[0]["prompt"], table[0]["seed"]) == ("a boat", items[3].seed)
    assert json.loads(table[0]["provenance"])["model_sha256"] == MODEL_SHA


def test_the_quick_start_install_exports_parquet() -> None:
    """README's quick start installs sdq with the extras it names (none), and docs/datasets.md
    builds on parquet exports: pyarrow must come with that install."""
    root = Path(__file__).parents[2]
    [install] = re.findall(r"pip install (-e \S+) -c constraints.txt",
                           root.joinpath("README.md").read_text().split("## Quick start")[1]
                           .split("\n## ")[0])
    extras = re.findall(r"\[([\w,]+)\]", install)
    project = tomllib.loads(root.joinpath("pyproject.toml").read_text())["project"]
    installed = [Requirement(r) for r in project["dependencies"]] + [
        Requirement(r) for extra in extras for name in extra.split(",")
        for r in project["optional-dependencies"][name]]
    [pyarrow] = [r for r in installed if r.name == "pyarrow"]
    assert any(spec.operator == ">=" for spec in pyarrow.specifier), pyarrow


def test_parquet_without_pyarrow_is_refused_before_any_work(home: Home, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    job = home.add_job(PROMPTS, done=1)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # an environment that lost it
    result = home.run("export", str(job.id), "--format", "parquet", "-o", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.output == ("Error: the parquet format needs pyarrow, which this environment "
                             "lacks: pip install 'pyarrow>=14'\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "code", "message"), [
    ([], 2, "Error: give a JOB, --query TEXT or --schedule NAME"),
    (["1"], 1, "Error: no finished images to export"),
    (["7"], 3, "Error: no job 7"),
])
def test_export_errors(home: Home, tmp_path: Path, args: list[str], code: int,
                       message: str) -> None:
    home.add_job(["nothing finished"])
    result = home.run("export", *args, "--format", "webdataset", "-o", str(tmp_path / "out"))
    assert result.exit_code == code
    assert result.output.splitlines()[-1] == message


def test_a_grown_selection_rewrites_only_the_shards_that_changed(home: Home,
                                                                 tmp_path: Path) -> None:
    home.add_job(PROMPTS, done=5)  # three red ones
    args = ["export", "--query", "red", "--format", "webdataset", "--shard-size", "2",
            "-o", str(tmp_path / "out")]
    assert home.run(*args).output.endswith("3 image(s) in 2 shard(s) to "
                                           f"{tmp_path / 'out'}: 2 written, 0 already there\n")
    home.add_job(["a red kite", "a red balloon", "a red door"], done=3)
    result = home.run(*args)
    assert result.output.endswith("6 image(s) in 3 shard(s) to "
                                  f"{tmp_path / 'out'}: 2 written, 1 already there\n")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".huggingface.yaml", ".shard-manifest.json", "shard-000000.tar", "shard-000001.tar",
        "shard-000002.tar"]


def test_an_export_of_an_earlier_sdq_resumes_and_hides_its_manifest(home: Home,
                                                                   tmp_path: Path) -> None:
    """Earlier versions left `shard-manifest.json` beside the shards, where folder readers
    (pyarrow, pandas, datasets) choke on it: a rerun reads it, then keeps only the hidden one."""
    job = home.add_job(PROMPTS, done=5)
    out = tmp_path / "out"
    args = ["export", str(job.id), "--format", "parquet", "--shard-size", "2", "-o", str(out)]
    assert home.run(*args).exit_code == 0
    (out / ".shard-manifest.json").rename(out / "shard-manifest.json")
    result = home.run(*args)
    assert result.output.endswith("0 written, 3 already there\n")
    assert sorted(p.name for p in out.iterdir()) == [
        ".shard-manifest.json", "shard-000000.parquet", "shard-000001.parquet",
        "shard-000002.parquet"]
    assert pq.read_table(out).num_rows == 5


def test_an_export_into_the_live_image_store_is_refused(home: Home, tmp_path: Path) -> None:
    job = home.add_job(PROMPTS, done=2)
    store = home.path / "home" / "images"
    before = sorted(source(home).list())
    for dest in (store, store / str(job.id), store / "x" / ".." / "y"):
        result = home.run("export", str(job.id), "--format", "webdataset", "-o", str(dest))
        assert result.exit_code == 2, result.output
        assert result.output.splitlines()[-1] == (
            f"Error: {dest} is inside the image store {store}: shards there would sit among "
            "the live images; export somewhere else")
    # The store's folder or a parent: an imagefolder export writes `images/` there, which
    # is the store itself under the default SDQ_HOME.
    for dest in (store.parent, home.path):
        result = home.run("export", str(job.id), "--format", "imagefolder", "-o", str(dest))
        assert result.exit_code == 2, result.output
        assert result.output.splitlines()[-1] == (
            f"Error: {dest} is a parent of the image store {store}: shards there would sit "
            "among the live images; export somewhere else")
    assert sorted(source(home).list()) == before
    ok = home.run("export", str(job.id), "--format", "webdataset", "-o", str(home.path / "out"))
    assert ok.exit_code == 0, ok.output


def test_an_export_into_the_live_bucket_prefix_is_refused(
        home: Home, bucket: str, request: pytest.FixtureRequest,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", request.getfixturevalue("s3_server").endpoint)
    home.env["SDQ_STORAGE_URL"] = f"s3://{bucket}/live"
    job = home.add_job(PROMPTS, done=2)
    for dest in (f"s3://{bucket}/live", f"s3://{bucket}/live/{job.id}"):
        result = home.run("export", str(job.id), "--format", "webdataset", "-o", dest)
        assert result.exit_code == 2 and "is inside the image store" in result.output, result.output
    result = home.run("export", str(job.id), "--format", "imagefolder", "-o", f"s3://{bucket}")
    assert result.exit_code == 2 and "is a parent of the image store" in result.output, result.output
    assert home.run("export", str(job.id), "--format", "webdataset",
                    "-o", f"s3://{bucket}/livery").exit_code == 0


@pytest.mark.parametrize("prefix", ["..", ".hidden", "a/b", ""])
def test_a_prefix_that_is_no_file_name_is_a_usage_error(home: Home, tmp_path: Path,
                                                        prefix: str) -> None:
    job = home.add_job(PROMPTS, done=1)
    result = home.run("export", str(job.id), "--format", "webdataset", "-o", str(tmp_path / "o"),
                      "--prefix", prefix)
    assert result.exit_code == 2
    assert f"Invalid value for --prefix: {prefix!r}: the start of a file name" in result.output


def test_a_piped_export_prints_progress_lines(home: Home, tmp_path: Path) -> None:
    job = home.add_job(PROMPTS, done=5)
    result = home.run("export", str(job.id), "--format", "webdataset", "-o", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("exporting: ")]
    assert lines[0] == "exporting: 0/5 images (0%), 0s elapsed"
    assert lines[-1].startswith("exporting: 5/5 images (100%), ")


class WatchedStorage:
    """A store that notes, at each call, whether the export's session was inside a
    transaction (on PostgreSQL: a session idle in transaction, its locks held, for as long
    as a slow store takes)."""

    def __init__(self, inner, session: Session) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.session, self.in_transaction = inner, session, []

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        attribute = getattr(self.inner, name)
        if not callable(attribute) or name in ("root", "url"):
            return attribute

        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.in_transaction.append((name, self.session.in_transaction()))
            return attribute(*args, **kwargs)
        return call


@pytest.mark.parametrize("fmt", ["webdataset", "imagefolder"])
def test_no_transaction_is_open_while_the_stores_are_called(any_home: Home, tmp_path: Path,
                                                            fmt: str) -> None:
    from sdq.cli.common import item_record
    from sdq.jobs.export import export_items

    job = any_home.add_job(PROMPTS, done=5)
    with Session(any_home.engine) as session:
        ids = [i.id for i in done_items(any_home, job.id)]
        session.get(Item, ids[0])  # the caller's own read, left open
        store, dest = (WatchedStorage(s, session) for s in (
            open_storage(str(any_home.path / "home" / "images")), open_storage(str(tmp_path / "out"))))
        report = export_items(session, store, dest, ids, fmt=fmt, describe=item_record,
                              shard_size=2, card=True)
    assert report.written == 3
    calls = store.in_transaction + dest.in_transaction
    assert {name for name, _ in store.in_transaction} == {"get"}
    assert calls and not any(open_ for _, open_ in calls), calls
