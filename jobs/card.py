"""The dataset card of an export: a README.md as Hugging Face hub datasets have, YAML front
matter the hub reads (task, tags, size) and a body a person reads: how many images, from which
jobs, made with which settings, and how to load them."""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from sdq.db.models import Item, Model
from sdq.images.provenance import format_number

_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
          (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"))
_TABLES = {"parquet": "data", "imagefolder": "data/metadata.parquet"}
"""What pyarrow and pandas read of an export with a card, by format: the whole table of a
parquet one, the records (without the images) of an imagefolder."""
Setting = tuple[str, str, str, int, float, str]
"""(model name, model sha256 prefix, sampler, steps, cfg, WxH)."""


Span = tuple[Any, Any] | None


def _widen(span: Span, value: Any) -> Span:
    if value is None:
        return span
    return (value, value) if span is None else (min(span[0], value), max(span[1], value))


@dataclass
class Summary:
    """What the card says about the exported items."""

    images: int = 0
    jobs: set[int] = field(default_factory=set)
    settings: Counter[Setting] = field(default_factory=Counter)
    seeds: Span = None
    finished: Span = None

    def add(self, row: Sequence[Any]) -> None:
        job, sampler, steps, cfg, width, height, seed, finished, name, sha = row
        self.images += 1
        self.jobs.add(job)
        self.settings[(name or "?", (sha or "")[:10], sampler, steps, cfg, f"{width}x{height}")] += 1
        self.seeds = _widen(self.seeds, seed)
        self.finished = _widen(self.finished, finished)


def summarize(session: Session, shards: Sequence[Sequence[int]]) -> Summary:
    """Counts and settings of the exported items, read a shard at a time."""
    summary = Summary()
    for shard in shards:
        rows = session.execute(
            select(Item.job_id, Item.sampler, Item.steps, Item.cfg, Item.width, Item.height,
                   Item.seed, Item.finished_at, Model.name, Model.sha256)
            .outerjoin(Model, Model.id == Item.model_id).where(Item.id.in_(shard)))
        for row in rows:
            summary.add(row)
    return summary


def size_category(n: int) -> str:
    """The hub's `size_categories` bucket for n examples."""
    return next((name for limit, name in _SIZES if n < limit), "n>10M")


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def declared_features(features: list[dict[str, Any]]) -> dict[str, Any]:
    """The YAML keys that declare a dataset's features (the hub's `dataset_info.features`),
    in a card's front matter or a `.huggingface.yaml`: `dataset_info` for the hub's viewer,
    and the `default` config's `features`, which is what `datasets` loads with."""
    return {"dataset_info": {"features": features},
            "configs": [{"config_name": "default", "features": features}]}


def dataset_card(session: Session, shards: Sequence[Sequence[int]], fmt: str,
                 features: list[dict[str, Any]] | None = None, origin: Sequence[str] = ()) -> str:
    """The README.md of an export whose files are under `data/`, in format `fmt`. `features`
    (the hub's `dataset_info.features`), when given, go in the front matter, as JSON, which
    is YAML too;
    `origin`, markdown lines saying how the images were made (a schedule's runs), becomes its
    own section."""
    s = summarize(session, shards)
    jobs = ", ".join(str(job) for job in sorted(s.jobs))
    title = f"sdq images of job{'s' if len(s.jobs) > 1 else ''} {jobs}"
    front = "\n".join([
        "---", f"pretty_name: {json.dumps(title)}", "task_categories:", "- text-to-image",
        "tags:", "- sdq", "- stable-diffusion", "- synthetic",
        "size_categories:", f"- {size_category(s.images)}",
        *(f"{key}: {json.dumps(value)}"
          for key, value in (declared_features(features) if features else {}).items()), "---",
    ])
    table = [
        "| model | model sha256 | sampler | steps | cfg | size | images |",
        "|---|---|---|---|---|---|---|",
        *(f"| {_cell(name)} | {sha} | {sampler} | {steps} | {format_number(cfg)} | {size} | {count} |"
          for (name, sha, sampler, steps, cfg, size), count in sorted(s.settings.items())),
    ]
    when = (f"finished between {s.finished[0]:%Y-%m-%d %H:%M} and {s.finished[1]:%Y-%m-%d %H:%M} UTC"
            if s.finished else "finishing times not recorded")
    seeds = f"seeds {s.seeds[0]} to {s.seeds[1]}" if s.seeds else "no seeds"
    loading = ["```python", "from datasets import load_dataset",
               'images = load_dataset("THIS_FOLDER", split="train")  # every field typed']
    if fmt in _TABLES:
        loading += ["", "import pyarrow.parquet as pq",
                    f'table = pq.read_table("THIS_FOLDER/{_TABLES[fmt]}")  # or pandas.read_parquet']
    return "\n".join([
        front, "", f"# {title}", "",
        f"{s.images} images generated by sdq with Stable Diffusion ({seeds}, {when}), with "
        f"their prompts and full provenance, as {fmt} files under `data/`.", "",
        *(["## How it was made", "", *origin, ""] if origin else []),
        "## Generation settings", "", *table, "",
        "## Loading", "", *loading, "```", "",
        "Every image also carries its parameters in its PNG (`parameters`, the AUTOMATIC1111 "
        "text, and `sdq`, the full record as JSON).", "",
    ])
