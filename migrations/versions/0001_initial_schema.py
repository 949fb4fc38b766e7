"""Initial schema: models, schedules, jobs, items, and full-text search on prompts.

Revision ID: 0001
Revises:
Create Date: 2026-11-29

The full-text objects are written out here rather than imported from sdq.db, so this revision
keeps meaning what it meant when it shipped:
- PostgreSQL: a stored generated tsvector column with a GIN index. Stored rather than an
  expression index so that phrase matches (which GIN must recheck) read the vector instead of
  re-parsing every candidate prompt.
- SQLite: an FTS5 table over items.prompt (external content: the text is not stored twice),
  `unicode61 remove_diacritics 0` to fold case but keep accents like PostgreSQL's `simple`,
  and triggers that keep it in step with items.
Indexes on columns a worker fills in later are partial, and creation time is BRIN on
PostgreSQL, so that a bulk submit pays only for the indexes it needs (see sdq.db.models).
Alembic's autogenerate compares neither index predicates nor access methods:
tests/db/test_migrations.py checks those.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUS = sa.Enum(
    "pending", "queued", "running", "done", "failed", "cancelled",
    name="status", native_enum=False, create_constraint=True, length=16,
)
TIMESTAMP = sa.DateTime(timezone=True)



def partial(condition: str) -> dict[str, sa.TextClause]:
    return {"postgresql_where": sa.text(condition), "sqlite_where": sa.text(condition)}


SQLITE_FTS = [
    "CREATE VIRTUAL TABLE items_fts USING fts5("
    "prompt, content='items', content_rowid='id', tokenize='unicode61 remove_diacritics 0')",
    "CREATE TRIGGER items_fts_insert AFTER INSERT ON items BEGIN"
    " INSERT INTO items_fts(rowid, prompt) VALUES (new.id, new.prompt); END",
    "CREATE TRIGGER items_fts_delete AFTER DELETE ON items BEGIN"
    " INSERT INTO items_fts(items_fts, rowid, prompt) VALUES ('delete', old.id, old.prompt); END",
    "CREATE TRIGGER items_fts_update AFTER UPDATE OF prompt ON items BEGIN"
    " INSERT INTO items_fts(items_fts, rowid, prompt) VALUES ('delete', old.id, old.prompt);"
    " INSERT INTO items_fts(rowid, prompt) VALUES (new.id, new.prompt); END",
]
POSTGRESQL_FTS = [
    "ALTER TABLE items ADD COLUMN prompt_tsv tsvector"
    " GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, prompt)) STORED",
    "CREATE INDEX ix_items_prompt_tsv ON items USING gin (prompt_tsv)",
]


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("source_uri", sa.Text(), nullable=True),
        sa.Column("architecture", sa.String(length=32), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("sha256", name=op.f("uq_models_sha256")),
    )
    op.create_index(op.f("ix_models_name"), "models", ["name"])

    op.create_table(
        "schedules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("cron", sa.String(length=100), nullable=False),
        sa.Column("prompt_file_name", sa.String(length=500), nullable=False),
        sa.Column("prompt_text", sa.Text(), nullable=False),
        sa.Column("prompt_sha256", sa.String(length=64), nullable=False),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("last_run_day", sa.Date(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_schedules")),
        sa.UniqueConstraint("name", name=op.f("uq_schedules_name")),
    )

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=True),
        sa.Column("source_name", sa.String(length=500), nullable=True),
        sa.Column("source_sha256", sa.String(length=64), nullable=True),
        sa.Column("defaults", sa.JSON(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("status", STATUS, nullable=False),
        sa.Column("item_count", sa.Integer(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("schedule_id", sa.Integer(), nullable=True),
        sa.Column("run_day", sa.Date(), nullable=True),
        sa.CheckConstraint(
            "(schedule_id IS NULL) = (run_day IS NULL)", name=op.f("ck_jobs_schedule_run")
        ),
        sa.ForeignKeyConstraint(
            ["schedule_id"], ["schedules.id"], name=op.f("fk_jobs_schedule_id_schedules")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("schedule_id", "run_day", name=op.f("uq_jobs_schedule_id_run_day")),
    )

    op.create_table(
        "items",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("row_index", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("negative_prompt", sa.Text(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("sampler", sa.String(length=32), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("cfg", sa.Float(), nullable=False),
        sa.Column("eta", sa.Float(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=True),
        sa.Column("status", STATUS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("batch_id", sa.String(length=64), nullable=True),
        sa.Column("batch_position", sa.Integer(), nullable=True),
        sa.Column("queued_at", TIMESTAMP, nullable=True),
        sa.Column("lease_expires_at", TIMESTAMP, nullable=True),
        sa.Column("image_key", sa.String(length=255), nullable=True),
        sa.Column("image_sha256", sa.String(length=64), nullable=True),
        sa.Column("watermark", sa.String(length=64), nullable=True),
        sa.Column("worker_host", sa.String(length=255), nullable=True),
        sa.Column("device", sa.String(length=64), nullable=True),
        sa.Column("started_at", TIMESTAMP, nullable=True),
        sa.Column("finished_at", TIMESTAMP, nullable=True),
        sa.Column("duration_s", sa.Float(), nullable=True),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.CheckConstraint("seed >= 0 AND seed < 4294967296", name=op.f("ck_items_seed_range")),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_items_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], name=op.f("fk_items_model_id_models")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_items")),
        sa.UniqueConstraint("job_id", "row_index", name=op.f("uq_items_job_id_row_index")),
    )
    op.create_index(op.f("ix_items_seed"), "items", ["seed"])
    op.create_index(op.f("ix_items_job_id_status"), "items", ["job_id", "status"])
    op.create_index(
        op.f("ix_items_image_key"), "items", ["image_key"], unique=True,
        **partial("image_key IS NOT NULL"),
    )
    for column in ("batch_id", "model_id"):
        op.create_index(
            op.f(f"ix_items_{column}"), "items", [column], **partial(f"{column} IS NOT NULL")
        )
    op.create_index(
        op.f("ix_items_status_lease_expires_at"), "items", ["status", "lease_expires_at"],
        **partial("status NOT IN ('pending', 'done')"),
    )
    op.create_index(op.f("ix_items_created_at"), "items", ["created_at"], postgresql_using="brin")

    dialect = op.get_bind().dialect.name
    for statement in {"sqlite": SQLITE_FTS, "postgresql": POSTGRESQL_FTS}.get(dialect, []):
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for trigger in ("items_fts_update", "items_fts_delete", "items_fts_insert"):
            op.execute(f"DROP TRIGGER {trigger}")
        op.execute("DROP TABLE items_fts")
    # PostgreSQL's tsvector column and its index go with the items table.
    op.drop_table("items")
    op.drop_table("jobs")
    op.drop_table("schedules")
    op.drop_table("models")
