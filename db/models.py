"""The tables: models, jobs (one submission each), items (one image each), the init images
img2img items start from, and schedules.

Items are self-contained: each row carries every parameter needed to reproduce its image, so
a job's defaults are a record of what the user asked for, never read back to fill gaps.
"""
from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Date,
    Enum,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    UniqueConstraint,
    text,
    true,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from sdq.core.params import LEGACY_PROMPT_SYNTAX, SEED_LIMIT, GenerationParams, short_hash
from sdq.core.states import Status

from .base import Base, BigId, UTCDateTime, utcnow


def _partial(condition: str) -> dict[str, Any]:
    """Index options that index only rows meeting `condition`, on both databases."""
    return {"postgresql_where": text(condition), "sqlite_where": text(condition)}


def _status_column() -> Mapped[Status]:
    # A VARCHAR with a CHECK rather than a native PostgreSQL enum: adding a status later is
    # then a constraint change instead of an ALTER TYPE, and both databases store the same text.
    return mapped_column(
        Enum(
            Status,
            name="status",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=lambda members: [m.value for m in members],
        ),
        default=Status.PENDING,
    )


class Model(Base):
    """A model checkpoint, identified by the sha256 of its weights file(s)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    source_uri: Mapped[str | None] = mapped_column(Text)
    architecture: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    @property
    def short_hash(self) -> str:
        """The form users see and type (derived, so never stale)."""
        return short_hash(self.sha256)


class Schedule(Base):
    """A nightly (cron) submission of a prompt file whose content is kept here, so a run does
    not depend on the file still being where it was."""

    __tablename__ = "schedules"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    cron: Mapped[str] = mapped_column(String(100))
    prompt_file_name: Mapped[str] = mapped_column(String(500))
    prompt_text: Mapped[str] = mapped_column(Text)
    prompt_sha256: Mapped[str] = mapped_column(String(64))
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    enabled: Mapped[bool] = mapped_column(default=True)
    last_run_day: Mapped[date | None] = mapped_column(Date)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class InitImageFile(Base):
    """An init image, stored once under `storage.init_key(sha256)` however many items and jobs
    start from it; a purge removes it with the last item that points at it."""

    __tablename__ = "init_images"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    width: Mapped[int]
    height: Mapped[int]
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Job(Base):
    """One submission: a prompt file (or a schedule's run) and the items it expanded into.

    Per-status progress is counted from the items (`queries.status_counts`) instead of being
    kept in counters here: workers would otherwise all update this one row on every image.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        # At most one job per schedule and day: a scheduler that fires twice is refused.
        UniqueConstraint("schedule_id", "run_day"),
        CheckConstraint("(schedule_id IS NULL) = (run_day IS NULL)", name="schedule_run"),
        # Ids land in provenance: SQLite must never give a purged job's id out again (0005).
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200))
    source_name: Mapped[str | None] = mapped_column(String(500))
    source_sha256: Mapped[str | None] = mapped_column(String(64))
    defaults: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    priority: Mapped[int] = mapped_column(default=0)
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    status: Mapped[Status] = _status_column()
    item_count: Mapped[int] = mapped_column(default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Removing a schedule unlinks its runs first (schedule and run day null); disabling keeps them.
    schedule_id: Mapped[int | None] = mapped_column(ForeignKey("schedules.id"))
    run_day: Mapped[date | None] = mapped_column(Date)
    # The safety checker each image is scored with (a folder or a hub id; null: none), and
    # what becomes of a flagged image: one of ON_FLAG (docs/db.md).
    safety_checker: Mapped[str | None] = mapped_column(Text)
    on_flag: Mapped[str] = mapped_column(String(8), default="keep", server_default="keep")
    # False: submitted with --no-reuse, every item is generated even when its image exists.
    reuse: Mapped[bool] = mapped_column(default=True, server_default=true())


class Item(Base):
    """One image: what to generate, where it stands in the queue, and what came out.

    (job, row index) and the image key are unique, so a completion delivered twice cannot
    produce a second row or a second object.
    """

    __tablename__ = "items"
    # Indexes on what a worker fills in later (batch, model, image key, lease) are partial:
    # a submit of 100 000 pending items does not pay for them, and they stay small.
    __table_args__ = (
        UniqueConstraint("job_id", "row_index"),
        CheckConstraint(f"seed >= 0 AND seed < {SEED_LIMIT}", name="seed_range"),
        Index(None, "job_id", "status"),
        # One generating row per object; rows reusing an image point at the same object.
        Index(None, "image_key", unique=True,
              **_partial("image_key IS NOT NULL AND reused_from IS NULL")),
        Index(None, "cache_key", **_partial("cache_key IS NOT NULL")),
        Index(None, "reused_from", **_partial("reused_from IS NOT NULL")),
        Index(None, "batch_id", **_partial("batch_id IS NOT NULL")),
        Index(None, "model_id", **_partial("model_id IS NOT NULL")),
        Index(None, "init_sha256", **_partial("init_sha256 IS NOT NULL")),
        # The uncommon statuses, across jobs: "all failed items", and for the queue, "running
        # items whose lease expired". Pending and done, the bulk, are left to scans.
        Index(None, "status", "lease_expires_at",
              **_partial("status NOT IN ('pending', 'done')")),
        # Creation time follows insertion order, which is what BRIN needs: a tiny index that
        # costs a submit nothing. (SQLite has no BRIN and builds a b-tree.)
        Index(None, "created_at", postgresql_using="brin"),
        {"sqlite_autoincrement": True},  # as jobs: ids in provenance are never reused (0005)
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    row_index: Mapped[int]
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    seed: Mapped[int] = mapped_column(BigInteger, index=True)
    sampler: Mapped[str] = mapped_column(String(32))
    steps: Mapped[int]
    cfg: Mapped[float] = mapped_column(Float)
    eta: Mapped[float] = mapped_column(Float, default=0.0)
    width: Mapped[int]
    height: Mapped[int]
    # How the prompts are read (`params.PROMPT_SYNTAXES`) and A1111's clip skip. Rows made
    # before these existed read `plain` and 1 (migration 0008): what made their images.
    prompt_syntax: Mapped[str] = mapped_column(String(8), server_default=LEGACY_PROMPT_SYNTAX)
    clip_skip: Mapped[int] = mapped_column(server_default="1")
    # The LoRAs applied, [{name, weight, sha256}], and the textual-inversion embeddings the
    # prompts used, [{name, sha256}] (`params.adapter_record`); null for none.
    loras: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    embeddings: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    # Image-to-image: the init image the item starts from (an `InitImageFile`; no foreign key,
    # see migration 0009), the name it was given (a file name, `s3://...` or `item:ID`) and
    # the denoising strength, in (0, 1]. All null for text-to-image.
    init_sha256: Mapped[str | None] = mapped_column(String(64))
    init_source: Mapped[str | None] = mapped_column(Text)
    strength: Mapped[float | None] = mapped_column(Float)
    # The model that made (or will make) the image; null until a worker has resolved it.
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id"))
    tags: Mapped[list[str] | None] = mapped_column(JSON)
    # The prompt template the item was expanded from, and the values chosen (by label,
    # grid parameters included); null for a plain prompt.
    template: Mapped[str | None] = mapped_column(Text)
    template_values: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # sha256 of everything that decides the pixels (`params.cache_key`), set when a worker
    # takes the item; and the item whose stored image this one reuses (null: made here).
    cache_key: Mapped[str | None] = mapped_column(String(64))
    reused_from: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[Status] = _status_column()
    attempts: Mapped[int] = mapped_column(default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    batch_id: Mapped[str | None] = mapped_column(String(64))
    batch_position: Mapped[int | None]
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    image_key: Mapped[str | None] = mapped_column(String(255))
    image_sha256: Mapped[str | None] = mapped_column(String(64))
    # The watermark text embedded in the image; null when none was (e.g. under 256x256).
    watermark: Mapped[str | None] = mapped_column(String(64))
    worker_host: Mapped[str | None] = mapped_column(String(255))
    device: Mapped[str | None] = mapped_column(String(64))
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    duration_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The safety checker's verdict: null throughout when no check ran ("not checked", which
    # is not "not flagged"). Scores are {"concept": [...], "special": [...]}; the action is
    # one of SAFETY_ACTIONS, and a dropped image leaves the item done without an image.
    safety_flagged: Mapped[bool | None]
    safety_scores: Mapped[dict[str, list[float]] | None] = mapped_column(JSON)
    safety_checker_sha256: Mapped[str | None] = mapped_column(String(64))
    safety_action: Mapped[str | None] = mapped_column(String(8))

    job: Mapped[Job] = relationship()
    model: Mapped[Model | None] = relationship()

    @property
    def params(self) -> GenerationParams:
        """The row's generation parameters, checked (ParamError for a row no check passed)."""
        return GenerationParams.of(self)
