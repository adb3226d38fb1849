"""PostgreSQL only: NOTIFY datamachine_changes with the ids of changed jobs, flows and pipelines.

Every server process LISTENs on the channel and turns the ids into ``resources/updated`` for its
subscribers, so a change committed by any process reaches them at once (docs/storage.md, PostgreSQL).
The triggers are per statement (a claim of 500 jobs is one notification, not 500); an update notifies
only rows whose ``updated_at`` moved, so lease heartbeats stay silent. Payloads are
``<kind>:<id>,<id>,…`` in chunks below PostgreSQL's 8000-byte limit: ``j`` jobs, ``f`` flows as
``<flow_id>/<pipeline_id>``, ``p`` pipelines changed, ``P`` pipelines created or deleted.

Revision ID: 0003_pg_change_notify
Revises: 0002_pg_job_notify
"""

from alembic import op

revision = "0003_pg_change_notify"
down_revision = "0002_pg_job_notify"
branch_labels = None
depends_on = None

ANNOUNCE = """
CREATE OR REPLACE FUNCTION datamachine_announce(kind text, ids text[]) RETURNS void AS $$
DECLARE
    chunk text := '';
    id text;
BEGIN
    FOREACH id IN ARRAY ids LOOP
        IF length(chunk) + length(id) > 7900 THEN
            PERFORM pg_notify('datamachine_changes', kind || ':' || chunk);
            chunk := '';
        END IF;
        chunk := CASE WHEN chunk = '' THEN id ELSE chunk || ',' || id END;
    END LOOP;
    IF chunk <> '' THEN
        PERFORM pg_notify('datamachine_changes', kind || ':' || chunk);
    END IF;
END
$$ LANGUAGE plpgsql
"""

# table -> (trigger function, primary key, the payload text of a row r, kind on insert/delete, on update)
TABLES = {
    "datamachine_jobs": ("datamachine_jobs_changed", "job_id", "r.job_id::text", "j", "j"),
    "datamachine_flows": (
        "datamachine_flows_changed",
        "flow_id",
        "r.flow_id::text || '/' || r.pipeline_id::text",
        "f",
        "f",
    ),
    "datamachine_pipelines": ("datamachine_pipelines_changed", "pipeline_id", "r.pipeline_id::text", "P", "p"),
}


def _function(name: str, key: str, row_id: str, created_or_deleted: str, updated: str) -> str:
    return f"""
CREATE OR REPLACE FUNCTION {name}() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM datamachine_announce('{created_or_deleted}', ARRAY(SELECT {row_id} FROM new_rows r));
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM datamachine_announce('{created_or_deleted}', ARRAY(SELECT {row_id} FROM old_rows r));
    ELSE
        PERFORM datamachine_announce('{updated}', ARRAY(
            SELECT {row_id} FROM new_rows r JOIN old_rows o ON o.{key} = r.{key}
            WHERE r.updated_at IS DISTINCT FROM o.updated_at));
    END IF;
    RETURN NULL;
END
$$ LANGUAGE plpgsql
"""


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(ANNOUNCE)
    for table, (function, *spec) in TABLES.items():
        op.execute(_function(function, *spec))
        op.execute(
            f"CREATE TRIGGER {table}_insert_notify AFTER INSERT ON {table} "
            f"REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_update_notify AFTER UPDATE ON {table} "
            f"REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_delete_notify AFTER DELETE ON {table} "
            f"REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, (function, *_) in TABLES.items():
        for event in ("insert", "update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {table}_{event}_notify ON {table}")
        op.execute(f"DROP FUNCTION IF EXISTS {function}()")
    op.execute("DROP FUNCTION IF EXISTS datamachine_announce(text, text[])")
