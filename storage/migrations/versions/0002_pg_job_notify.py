"""PostgreSQL only: NOTIFY datamachine_jobs when a job becomes pending (docs/storage.md, PostgreSQL).

Workers in other processes LISTEN on the channel, so a new or requeued job starts without waiting for a
poll. The payload is empty so PostgreSQL folds the notifications of one transaction into one.

Revision ID: 0002_pg_job_notify
Revises: 0001_initial
"""

from alembic import op

revision = "0002_pg_job_notify"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        CREATE OR REPLACE FUNCTION datamachine_notify_job() RETURNS trigger AS $$
        BEGIN
            PERFORM pg_notify('datamachine_jobs', '');
            RETURN NULL;
        END
        $$ LANGUAGE plpgsql
        """
    )
    op.execute(
        """
        CREATE TRIGGER datamachine_jobs_notify
        AFTER INSERT OR UPDATE OF status, run_at ON datamachine_jobs
        FOR EACH ROW WHEN (NEW.status = 'pending')
        EXECUTE FUNCTION datamachine_notify_job()
        """
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER IF EXISTS datamachine_jobs_notify ON datamachine_jobs")
    op.execute("DROP FUNCTION IF EXISTS datamachine_notify_job()")
