"""Initial schema: the eight Data Machine tables and the two auxiliary tables (docs/storage.md, Tables).

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-22 20:37:46.154711
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "datamachine_agents",
        sa.Column(
            "agent_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("agent_slug", sa.String(length=200), nullable=False),
        sa.Column("agent_name", sa.String(length=200), nullable=False),
        sa.Column("owner_id", sa.BigInteger(), nullable=False),
        sa.Column(
            "agent_config",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=True,
        ),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("status IN ('active', 'inactive')", name=op.f("ck_agents_status")),
        sa.PrimaryKeyConstraint("agent_id", name=op.f("pk_agents")),
        sa.UniqueConstraint("agent_slug", name=op.f("uq_agents_agent_slug")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("datamachine_agents", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_agents_owner_id"), ["owner_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_agents_status"), ["status"], unique=False)

    op.create_table(
        "datamachine_logs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("agent_id", sa.BigInteger(), nullable=True),
        sa.Column("user_id", sa.BigInteger(), nullable=True),
        sa.Column("level", sa.String(length=20), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column(
            "context",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.Column("flow_id", sa.BigInteger(), nullable=True),
        sa.Column("pipeline_id", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("level IN ('debug', 'info', 'warning', 'error', 'critical')", name=op.f("ck_logs_level")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_logs")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("datamachine_logs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_logs_agent_id_created_at"), ["agent_id", "created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_logs_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_logs_flow_id_created_at"), ["flow_id", "created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_logs_job_id_created_at"), ["job_id", "created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_logs_level_created_at"), ["level", "created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_logs_pipeline_id_created_at"), ["pipeline_id", "created_at"], unique=False)

    op.create_table(
        "datamachine_settings",
        sa.Column("key", sa.String(length=191), nullable=False),
        sa.Column(
            "value",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=False,
        ),
        sa.Column("is_secret", sa.Boolean(create_constraint=True, name="is_secret"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_by_user_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_settings")),
    )
    op.create_table(
        "datamachine_agent_access",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("agent_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("granted_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("role IN ('viewer', 'operator', 'admin')", name=op.f("ck_agent_access_role")),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["datamachine_agents.agent_id"],
            name=op.f("fk_agent_access_agent_id"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_agent_access")),
        sa.UniqueConstraint("agent_id", "user_id", name=op.f("uq_agent_access_agent_id_user_id")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("datamachine_agent_access", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_agent_access_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_agent_access_role"), ["role"], unique=False)
        batch_op.create_index(batch_op.f("ix_agent_access_user_id"), ["user_id"], unique=False)

    op.create_table(
        "datamachine_agent_tokens",
        sa.Column(
            "token_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("agent_id", sa.BigInteger(), nullable=True),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("label", sa.String(length=100), nullable=True),
        sa.Column("token_prefix", sa.String(length=230), nullable=False),
        sa.Column("lookup_key", sa.String(length=12), nullable=False),
        sa.Column("salt", sa.String(length=32), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "capabilities",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=True,
        ),
        sa.Column("rate_limit_per_minute", sa.Integer(), nullable=True),
        sa.Column("created_by_user_id", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["datamachine_agents.agent_id"],
            name=op.f("fk_agent_tokens_agent_id"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token_id", name=op.f("pk_agent_tokens")),
        sa.UniqueConstraint("lookup_key", name=op.f("uq_agent_tokens_lookup_key")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("datamachine_agent_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_agent_tokens_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_agent_tokens_revoked_at_expires_at"), ["revoked_at", "expires_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_agent_tokens_user_id"), ["user_id"], unique=False)

    op.create_table(
        "datamachine_chat_sessions",
        sa.Column("session_id", sa.String(length=50), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("agent_id", sa.BigInteger(), nullable=True),
        sa.Column("title", sa.String(length=100), nullable=True),
        sa.Column(
            "messages",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=False,
        ),
        sa.Column(
            "metadata",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=True,
        ),
        sa.Column("provider", sa.String(length=50), nullable=True),
        sa.Column("model", sa.String(length=100), nullable=True),
        sa.Column("context", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_read_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("context IN ('chat', 'pipeline', 'system')", name=op.f("ck_chat_sessions_context")),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["datamachine_agents.agent_id"],
            name=op.f("fk_chat_sessions_agent_id"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("session_id", name=op.f("pk_chat_sessions")),
    )
    with op.batch_alter_table("datamachine_chat_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_chat_sessions_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_chat_sessions_context"), ["context"], unique=False)
        batch_op.create_index(batch_op.f("ix_chat_sessions_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_chat_sessions_expires_at"), ["expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_chat_sessions_updated_at"), ["updated_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_chat_sessions_user_id"), ["user_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_chat_sessions_user_id_context"), ["user_id", "context"], unique=False)

    op.create_table(
        "datamachine_pipelines",
        sa.Column(
            "pipeline_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("agent_id", sa.BigInteger(), nullable=True),
        sa.Column("pipeline_name", sa.String(length=255), nullable=False),
        sa.Column(
            "pipeline_config",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"],
            ["datamachine_agents.agent_id"],
            name=op.f("fk_pipelines_agent_id"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("pipeline_id", name=op.f("pk_pipelines")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("datamachine_pipelines", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_pipelines_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_pipelines_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_pipelines_pipeline_name"), ["pipeline_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_pipelines_updated_at"), ["updated_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_pipelines_user_id"), ["user_id"], unique=False)

    op.create_table(
        "datamachine_flows",
        sa.Column(
            "flow_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("pipeline_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("agent_id", sa.BigInteger(), nullable=True),
        sa.Column("flow_name", sa.String(length=255), nullable=False),
        sa.Column(
            "flow_config",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=False,
        ),
        sa.Column(
            "scheduling_config",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_run_status", sa.String(length=255), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), nullable=False),
        sa.Column("consecutive_no_items", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["datamachine_agents.agent_id"], name=op.f("fk_flows_agent_id"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["pipeline_id"],
            ["datamachine_pipelines.pipeline_id"],
            name=op.f("fk_flows_pipeline_id"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("flow_id", name=op.f("pk_flows")),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("datamachine_flows", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_flows_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_flows_next_run_at"), ["next_run_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_flows_pipeline_id"), ["pipeline_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_flows_updated_at"), ["updated_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_flows_user_id"), ["user_id"], unique=False)

    op.create_table(
        "datamachine_jobs",
        sa.Column("job_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("user_id", sa.BigInteger(), nullable=False),
        sa.Column("agent_id", sa.BigInteger(), nullable=True),
        sa.Column("pipeline_id", sa.String(length=20), nullable=True),
        sa.Column("flow_id", sa.String(length=20), nullable=True),
        sa.Column("source", sa.String(length=50), nullable=False),
        sa.Column("label", sa.String(length=255), nullable=True),
        sa.Column("parent_job_id", sa.BigInteger(), nullable=True),
        sa.Column("status", sa.String(length=255), nullable=False),
        sa.Column("status_reason", sa.String(length=500), nullable=True),
        sa.Column(
            "engine_data",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pipeline_key", sa.BigInteger(), nullable=True),
        sa.Column("flow_key", sa.BigInteger(), nullable=True),
        sa.Column("run_trigger", sa.String(length=20), nullable=False),
        sa.Column("current_step_id", sa.String(length=255), nullable=True),
        sa.Column(
            "packets",
            sa.JSON(none_as_null=True).with_variant(
                postgresql.JSONB(none_as_null=True, astext_type=sa.Text()), "postgresql"
            ),
            nullable=False,
        ),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("run_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=100), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("wait_kind", sa.String(length=20), nullable=True),
        sa.Column("wait_ref", sa.String(length=100), nullable=True),
        sa.Column("wait_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("affinity", sa.String(length=100), nullable=True),
        sa.Column("handler_slug", sa.String(length=100), nullable=True),
        sa.CheckConstraint(
            "(pipeline_id IS NULL AND flow_id IS NULL AND pipeline_key IS NULL AND flow_key IS NULL) OR (pipeline_id = 'direct' AND flow_id = 'direct' AND pipeline_key IS NULL AND flow_key IS NULL) OR (pipeline_key IS NOT NULL AND flow_key IS NOT NULL AND pipeline_id = CAST(pipeline_key AS VARCHAR(20)) AND flow_id = CAST(flow_key AS VARCHAR(20)))",
            name=op.f("ck_jobs_ids_shape"),
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'processing', 'waiting', 'completed', 'completed_no_items', 'agent_skipped', 'failed', 'cancelled')",
            name=op.f("ck_jobs_status"),
        ),
        sa.CheckConstraint(
            "wait_kind IS NULL OR wait_kind IN ('approval', 'webhook_gate')", name=op.f("ck_jobs_wait_kind")
        ),
        sa.CheckConstraint("attempts >= 0 AND max_attempts BETWEEN 1 AND 10", name=op.f("ck_jobs_attempts")),
        sa.ForeignKeyConstraint(
            ["agent_id"], ["datamachine_agents.agent_id"], name=op.f("fk_jobs_agent_id"), ondelete="SET NULL"
        ),
        sa.ForeignKeyConstraint(
            ["flow_key"], ["datamachine_flows.flow_id"], name=op.f("fk_jobs_flow_key"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["parent_job_id"],
            ["datamachine_jobs.job_id"],
            name=op.f("fk_jobs_parent_job_id"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["pipeline_key"],
            ["datamachine_pipelines.pipeline_id"],
            name=op.f("fk_jobs_pipeline_key"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("idempotency_key", name="uq_jobs_idempotency_key"),
        sa.UniqueConstraint("wait_ref", name="uq_jobs_wait_ref"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("datamachine_jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_agent_id"), ["agent_id"], unique=False)
        batch_op.create_index(
            "ix_jobs_claim",
            ["status", "run_at", "job_id"],
            unique=False,
            postgresql_where=sa.text("status = 'pending'"),
        )
        batch_op.create_index("ix_jobs_completed", ["status", "completed_at"], unique=False)
        batch_op.create_index("ix_jobs_flow_created", ["flow_key", "created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_flow_id"), ["flow_id"], unique=False)
        batch_op.create_index("ix_jobs_flow_status", ["flow_key", "status"], unique=False)
        batch_op.create_index("ix_jobs_handler", ["handler_slug"], unique=False)
        batch_op.create_index("ix_jobs_lease", ["status", "lease_expires_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_parent_job_id"), ["parent_job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_pipeline_id"), ["pipeline_id"], unique=False)
        batch_op.create_index("ix_jobs_pipeline_key", ["pipeline_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_source"), ["source"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_status"), ["status"], unique=False)
        batch_op.create_index("ix_jobs_updated", ["updated_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_user_id"), ["user_id"], unique=False)
        batch_op.create_index("ix_jobs_wait", ["wait_kind", "wait_expires_at"], unique=False)

    op.create_table(
        "datamachine_processed_items",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("flow_step_id", sa.String(length=255), nullable=False),
        sa.Column("source_type", sa.String(length=50), nullable=False),
        sa.Column("item_identifier", sa.String(length=255), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.Column("processed_timestamp", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("claim_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("flow_key", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("status IN ('claimed', 'processed')", name=op.f("ck_processed_status")),
        sa.ForeignKeyConstraint(
            ["flow_key"],
            ["datamachine_flows.flow_id"],
            name=op.f("fk_processed_items_flow_key"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["datamachine_jobs.job_id"],
            name=op.f("fk_processed_items_job_id"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_processed_items")),
        sa.UniqueConstraint("flow_step_id", "source_type", "item_identifier", name="uq_processed_flow_source_item"),
        sqlite_autoincrement=True,
    )
    with op.batch_alter_table("datamachine_processed_items", schema=None) as batch_op:
        batch_op.create_index("ix_processed_flow_key", ["flow_key"], unique=False)
        batch_op.create_index(batch_op.f("ix_processed_items_flow_step_id"), ["flow_step_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_processed_items_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_processed_items_source_type"), ["source_type"], unique=False)
        batch_op.create_index("ix_processed_status_expiry", ["status", "claim_expires_at"], unique=False)
        batch_op.create_index("ix_processed_timestamp", ["status", "processed_timestamp"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("datamachine_processed_items", schema=None) as batch_op:
        batch_op.drop_index("ix_processed_timestamp")
        batch_op.drop_index("ix_processed_status_expiry")
        batch_op.drop_index(batch_op.f("ix_processed_items_source_type"))
        batch_op.drop_index(batch_op.f("ix_processed_items_job_id"))
        batch_op.drop_index(batch_op.f("ix_processed_items_flow_step_id"))
        batch_op.drop_index("ix_processed_flow_key")

    op.drop_table("datamachine_processed_items")
    with op.batch_alter_table("datamachine_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_wait")
        batch_op.drop_index(batch_op.f("ix_jobs_user_id"))
        batch_op.drop_index("ix_jobs_updated")
        batch_op.drop_index(batch_op.f("ix_jobs_status"))
        batch_op.drop_index(batch_op.f("ix_jobs_source"))
        batch_op.drop_index("ix_jobs_pipeline_key")
        batch_op.drop_index(batch_op.f("ix_jobs_pipeline_id"))
        batch_op.drop_index(batch_op.f("ix_jobs_parent_job_id"))
        batch_op.drop_index("ix_jobs_lease")
        batch_op.drop_index("ix_jobs_handler")
        batch_op.drop_index("ix_jobs_flow_status")
        batch_op.drop_index(batch_op.f("ix_jobs_flow_id"))
        batch_op.drop_index("ix_jobs_flow_created")
        batch_op.drop_index("ix_jobs_completed")
        batch_op.drop_index("ix_jobs_claim", postgresql_where=sa.text("status = 'pending'"))
        batch_op.drop_index(batch_op.f("ix_jobs_agent_id"))

    op.drop_table("datamachine_jobs")
    with op.batch_alter_table("datamachine_flows", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_flows_user_id"))
        batch_op.drop_index(batch_op.f("ix_flows_updated_at"))
        batch_op.drop_index(batch_op.f("ix_flows_pipeline_id"))
        batch_op.drop_index(batch_op.f("ix_flows_next_run_at"))
        batch_op.drop_index(batch_op.f("ix_flows_agent_id"))

    op.drop_table("datamachine_flows")
    with op.batch_alter_table("datamachine_pipelines", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_pipelines_user_id"))
        batch_op.drop_index(batch_op.f("ix_pipelines_updated_at"))
        batch_op.drop_index(batch_op.f("ix_pipelines_pipeline_name"))
        batch_op.drop_index(batch_op.f("ix_pipelines_created_at"))
        batch_op.drop_index(batch_op.f("ix_pipelines_agent_id"))

    op.drop_table("datamachine_pipelines")
    with op.batch_alter_table("datamachine_chat_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_chat_sessions_user_id_context"))
        batch_op.drop_index(batch_op.f("ix_chat_sessions_user_id"))
        batch_op.drop_index(batch_op.f("ix_chat_sessions_updated_at"))
        batch_op.drop_index(batch_op.f("ix_chat_sessions_expires_at"))
        batch_op.drop_index(batch_op.f("ix_chat_sessions_created_at"))
        batch_op.drop_index(batch_op.f("ix_chat_sessions_context"))
        batch_op.drop_index(batch_op.f("ix_chat_sessions_agent_id"))

    op.drop_table("datamachine_chat_sessions")
    with op.batch_alter_table("datamachine_agent_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_agent_tokens_user_id"))
        batch_op.drop_index(batch_op.f("ix_agent_tokens_revoked_at_expires_at"))
        batch_op.drop_index(batch_op.f("ix_agent_tokens_agent_id"))

    op.drop_table("datamachine_agent_tokens")
    with op.batch_alter_table("datamachine_agent_access", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_agent_access_user_id"))
        batch_op.drop_index(batch_op.f("ix_agent_access_role"))
        batch_op.drop_index(batch_op.f("ix_agent_access_agent_id"))

    op.drop_table("datamachine_agent_access")
    op.drop_table("datamachine_settings")
    with op.batch_alter_table("datamachine_logs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_logs_pipeline_id_created_at"))
        batch_op.drop_index(batch_op.f("ix_logs_level_created_at"))
        batch_op.drop_index(batch_op.f("ix_logs_job_id_created_at"))
        batch_op.drop_index(batch_op.f("ix_logs_flow_id_created_at"))
        batch_op.drop_index(batch_op.f("ix_logs_created_at"))
        batch_op.drop_index(batch_op.f("ix_logs_agent_id_created_at"))

    op.drop_table("datamachine_logs")
    with op.batch_alter_table("datamachine_agents", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_agents_status"))
        batch_op.drop_index(batch_op.f("ix_agents_owner_id"))

    op.drop_table("datamachine_agents")
