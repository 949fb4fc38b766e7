"""PostgreSQL: check items' references to jobs and models once per statement, not per row.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29

A foreign key checks every inserted row with a lookup of its own. In a bulk submit of 100 000
items, which all name one job and one model, the two keys cost about 0.4 s of the server's
2 s (bench/bench_db_copy.py, docs/db.md). The triggers here keep the same guarantees with
one set-based check per INSERT statement (a COPY is one statement) over its transition table:

- inserted items must name an existing job and, when set, an existing model; those rows are
  locked FOR KEY SHARE, as a foreign key locks them, so neither can be deleted before the
  inserting transaction ends;
- an update that changes an item's job or model is checked the same way, row by row (only
  such rows: a worker changing an item's status pays nothing);
- deleting jobs deletes their items (the old ON DELETE CASCADE);
- deleting a model that items still name is refused, like the old key (NO ACTION);
- job and model ids never change (a foreign key would have to follow them).

Errors keep the foreign keys' SQLSTATE (23503) and constraint names, so callers still see an
IntegrityError. SQLite keeps its foreign keys: it checks row by row whatever the form.
The ORM metadata still declares both keys (relationships and SQLite use them);
migrations/env.py leaves them out of the comparison on PostgreSQL.
"""
from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REFERENCES = (("job_id", "jobs", "fk_items_job_id_jobs"), ("model_id", "models", "fk_items_model_id_models"))
"""(item column, parent table, the foreign key it replaces); a null reference is not checked."""


def _violation(constraint: str, column: str, table: str, value: str) -> str:
    return (
        f"RAISE foreign_key_violation USING CONSTRAINT = '{constraint}', TABLE = 'items',"
        f" MESSAGE = 'insert or update on table \"items\" violates foreign key constraint \"{constraint}\"',"
        f" DETAIL = 'Key ({column})=(' || {value} || ') is not present in table \"{table}\".';"
    )


def _statement_check(column: str, table: str, constraint: str) -> str:
    """Lock the parents that exist, then compare counts: a parent that is missing, or deleted
    while we waited for its lock, is not counted."""
    return f"""
        IF (SELECT count(*) FROM (SELECT 1 FROM {table} WHERE id IN (SELECT {column} FROM new_items)
                                  FOR KEY SHARE) AS locked)
           < (SELECT count(DISTINCT {column}) FROM new_items) THEN
            SELECT n.{column} INTO missing FROM new_items AS n
             WHERE n.{column} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {table} WHERE id = n.{column})
             LIMIT 1;
            {_violation(constraint, column, table, "missing")}
        END IF;"""


def _row_check(column: str, table: str, constraint: str) -> str:
    return f"""
        IF NEW.{column} IS NOT NULL THEN
            PERFORM 1 FROM {table} WHERE id = NEW.{column} FOR KEY SHARE;
            IF NOT FOUND THEN
                {_violation(constraint, column, table, f"NEW.{column}")}
            END IF;
        END IF;"""


UPGRADE = [
    *(f"ALTER TABLE items DROP CONSTRAINT {constraint}" for _, _, constraint in REFERENCES),
    f"""CREATE FUNCTION sdq_items_insert_references() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        missing bigint;
    BEGIN{"".join(_statement_check(*reference) for reference in REFERENCES)}
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER items_insert_references AFTER INSERT ON items REFERENCING NEW TABLE AS new_items"
    " FOR EACH STATEMENT EXECUTE FUNCTION sdq_items_insert_references()",
    f"""CREATE FUNCTION sdq_items_update_references() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN{"".join(_row_check(*reference) for reference in REFERENCES)}
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER items_update_references AFTER UPDATE OF job_id, model_id ON items FOR EACH ROW"
    " WHEN (OLD.job_id IS DISTINCT FROM NEW.job_id OR OLD.model_id IS DISTINCT FROM NEW.model_id)"
    " EXECUTE FUNCTION sdq_items_update_references()",
    """CREATE FUNCTION sdq_jobs_delete_items() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM items WHERE job_id IN (SELECT id FROM old_jobs);
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER jobs_delete_items AFTER DELETE ON jobs REFERENCING OLD TABLE AS old_jobs"
    " FOR EACH STATEMENT EXECUTE FUNCTION sdq_jobs_delete_items()",
    """CREATE FUNCTION sdq_models_refuse_delete_in_use() RETURNS trigger LANGUAGE plpgsql AS $$
    DECLARE
        used bigint;
    BEGIN
        SELECT model_id INTO used FROM items  -- IS NOT NULL lets the partial index on model_id serve
         WHERE model_id IS NOT NULL AND model_id IN (SELECT id FROM old_models) LIMIT 1;
        IF FOUND THEN
            RAISE foreign_key_violation USING CONSTRAINT = 'fk_items_model_id_models', TABLE = 'items',
                MESSAGE = 'update or delete on table "models" violates foreign key constraint'
                          ' "fk_items_model_id_models" on table "items"',
                DETAIL = 'Key (id)=(' || used || ') is still referenced from table "items".';
        END IF;
        RETURN NULL;
    END $$""",
    "CREATE TRIGGER models_refuse_delete_in_use AFTER DELETE ON models REFERENCING OLD TABLE AS old_models"
    " FOR EACH STATEMENT EXECUTE FUNCTION sdq_models_refuse_delete_in_use()",
    """CREATE FUNCTION sdq_refuse_id_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE foreign_key_violation USING TABLE = TG_TABLE_NAME,
            MESSAGE = TG_TABLE_NAME || ' ids are referenced by items and cannot change';
    END $$""",
    *(f"CREATE TRIGGER {table}_keep_ids BEFORE UPDATE OF id ON {table} FOR EACH ROW"
      " WHEN (OLD.id IS DISTINCT FROM NEW.id) EXECUTE FUNCTION sdq_refuse_id_change()"
      for table in ("jobs", "models")),
]

DOWNGRADE = [
    *(f"DROP TRIGGER {table}_keep_ids ON {table}" for table in ("jobs", "models")),
    "DROP FUNCTION sdq_refuse_id_change()",
    "DROP TRIGGER models_refuse_delete_in_use ON models",
    "DROP FUNCTION sdq_models_refuse_delete_in_use()",
    "DROP TRIGGER jobs_delete_items ON jobs",
    "DROP FUNCTION sdq_jobs_delete_items()",
    "DROP TRIGGER items_update_references ON items",
    "DROP FUNCTION sdq_items_update_references()",
    "DROP TRIGGER items_insert_references ON items",
    "DROP FUNCTION sdq_items_insert_references()",
    "ALTER TABLE items ADD CONSTRAINT fk_items_job_id_jobs FOREIGN KEY (job_id) REFERENCES jobs (id)"
    " ON DELETE CASCADE",
    "ALTER TABLE items ADD CONSTRAINT fk_items_model_id_models FOREIGN KEY (model_id) REFERENCES models (id)",
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in UPGRADE:
            op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for statement in DOWNGRADE:
            op.execute(statement)
