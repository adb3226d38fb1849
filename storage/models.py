"""SQLAlchemy models of the eight Data Machine tables and the two auxiliary tables.

Columns, indexes and cascades are described in docs/storage.md, Tables; keep the two in step.
Defaults are applied by the application (no server defaults), so SQLite and PostgreSQL hold
identical values.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import conv
from sqlalchemy.sql.schema import Constraint

from datamachine_mcp.storage.types import PK, JSONType, UTCDateTime

TABLE_PREFIX = "datamachine_"


def _suffix(constraint: Constraint, table: Table) -> str:
    return table.name.removeprefix(TABLE_PREFIX)


NAMING_CONVENTION: dict[str, Any] = {
    "suffix": _suffix,
    "ix": "ix_%(suffix)s_%(column_0_N_name)s",
    "uq": "uq_%(suffix)s_%(column_0_N_name)s",
    "ck": "ck_%(suffix)s_%(constraint_name)s",
    "fk": "fk_%(suffix)s_%(column_0_name)s",
    "pk": "pk_%(suffix)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
        list[Any]: JSONType,
    }


JOB_STATUSES = (
    "pending",
    "processing",
    "waiting",
    "completed",
    "completed_no_items",
    "agent_skipped",
    "failed",
    "cancelled",
)
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
ROLES = ("viewer", "operator", "admin")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _agent_fk(ondelete: str) -> ForeignKey:
    return ForeignKey("datamachine_agents.agent_id", ondelete=ondelete)


class Pipeline(Base):
    __tablename__ = "datamachine_pipelines"
    __table_args__ = (
        Index(None, "user_id"),
        Index(None, "agent_id"),
        Index(None, "pipeline_name"),
        Index(None, "created_at"),
        Index(None, "updated_at"),
        {"sqlite_autoincrement": True},
    )

    pipeline_id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(BigInteger, default=0)
    agent_id: Mapped[int | None] = mapped_column(BigInteger, _agent_fk("SET NULL"))
    pipeline_name: Mapped[str] = mapped_column(String(255))
    pipeline_config: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Flow(Base):
    __tablename__ = "datamachine_flows"
    __table_args__ = (
        Index(None, "pipeline_id"),
        Index(None, "user_id"),
        Index(None, "agent_id"),
        Index(None, "next_run_at"),
        Index(None, "updated_at"),
        {"sqlite_autoincrement": True},
    )

    flow_id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    pipeline_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("datamachine_pipelines.pipeline_id", ondelete="CASCADE")
    )
    user_id: Mapped[int] = mapped_column(BigInteger, default=0)
    agent_id: Mapped[int | None] = mapped_column(BigInteger, _agent_fk("SET NULL"))
    flow_name: Mapped[str] = mapped_column(String(255))
    flow_config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    scheduling_config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=lambda: {"interval": "manual"})
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    next_run_at: Mapped[datetime | None]
    last_run_at: Mapped[datetime | None]
    last_run_status: Mapped[str | None] = mapped_column(String(255))
    consecutive_failures: Mapped[int] = mapped_column(Integer, default=0)
    consecutive_no_items: Mapped[int] = mapped_column(Integer, default=0)


class Job(Base):
    __tablename__ = "datamachine_jobs"
    __table_args__ = (
        Index(None, "status"),
        Index(None, "pipeline_id"),
        Index(None, "flow_id"),
        Index(None, "source"),
        Index(None, "parent_job_id"),
        Index(None, "user_id"),
        Index(None, "agent_id"),
        Index(
            "ix_jobs_claim",
            "status",
            "run_at",
            "job_id",
            postgresql_where=text("status = 'pending'"),
        ),
        Index("ix_jobs_lease", "status", "lease_expires_at"),
        Index("ix_jobs_flow_status", "flow_key", "status"),
        Index("ix_jobs_flow_created", "flow_key", "created_at"),
        Index("ix_jobs_pipeline_key", "pipeline_key"),
        Index("ix_jobs_wait", "wait_kind", "wait_expires_at"),
        Index("ix_jobs_completed", "status", "completed_at"),
        Index("ix_jobs_updated", "updated_at"),
        Index("ix_jobs_handler", "handler_slug"),
        UniqueConstraint("idempotency_key", name="uq_jobs_idempotency_key"),
        UniqueConstraint("wait_ref", name="uq_jobs_wait_ref"),
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        CheckConstraint("attempts >= 0 AND max_attempts BETWEEN 1 AND 10", name="attempts"),
        CheckConstraint(
            "(pipeline_id IS NULL AND flow_id IS NULL AND pipeline_key IS NULL AND flow_key IS NULL)"
            " OR (pipeline_id = 'direct' AND flow_id = 'direct'"
            " AND pipeline_key IS NULL AND flow_key IS NULL)"
            " OR (pipeline_key IS NOT NULL AND flow_key IS NOT NULL"
            " AND pipeline_id = CAST(pipeline_key AS VARCHAR(20))"
            " AND flow_id = CAST(flow_key AS VARCHAR(20)))",
            name="ids_shape",
        ),
        {"sqlite_autoincrement": True},
    )

    job_id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(BigInteger, default=0)
    agent_id: Mapped[int | None] = mapped_column(BigInteger, _agent_fk("SET NULL"))
    pipeline_id: Mapped[str | None] = mapped_column(String(20))
    flow_id: Mapped[str | None] = mapped_column(String(20))
    source: Mapped[str] = mapped_column(String(50), default="pipeline")
    label: Mapped[str | None] = mapped_column(String(255))
    parent_job_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("datamachine_jobs.job_id", ondelete="CASCADE")
    )
    status: Mapped[str] = mapped_column(String(255))
    status_reason: Mapped[str | None] = mapped_column(String(500))
    engine_data: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    pipeline_key: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("datamachine_pipelines.pipeline_id", ondelete="CASCADE")
    )
    flow_key: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("datamachine_flows.flow_id", ondelete="CASCADE")
    )
    run_trigger: Mapped[str] = mapped_column(String(20), default="manual")
    current_step_id: Mapped[str | None] = mapped_column(String(255))
    packets: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    run_at: Mapped[datetime]
    started_at: Mapped[datetime | None]
    updated_at: Mapped[datetime]
    lease_owner: Mapped[str | None] = mapped_column(String(100))
    lease_expires_at: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    wait_kind: Mapped[str | None] = mapped_column(String(20))
    wait_ref: Mapped[str | None] = mapped_column(String(100))
    wait_expires_at: Mapped[datetime | None]
    affinity: Mapped[str | None] = mapped_column(String(100))
    handler_slug: Mapped[str | None] = mapped_column(String(100))


def _seen_when_written(context: Any) -> Any:
    """An inserted row was last seen when it was written (its ``processed_timestamp``)."""
    return context.get_current_parameters()["processed_timestamp"]


class ProcessedItem(Base):
    __tablename__ = "datamachine_processed_items"
    __table_args__ = (
        UniqueConstraint("flow_step_id", "source_type", "item_identifier", name="uq_processed_flow_source_item"),
        Index(None, "flow_step_id"),
        Index(None, "source_type"),
        Index(None, "job_id"),
        Index("ix_processed_flow_key", "flow_key"),
        Index("ix_processed_status_expiry", "status", "claim_expires_at"),
        # retention: a step's newest and oldest last_seen_at, and its rows older than a cutoff
        Index("ix_processed_step_seen", "flow_step_id", "source_type", "last_seen_at"),
        CheckConstraint("status IN ('claimed', 'processed')", name=conv("ck_processed_status")),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    flow_step_id: Mapped[str] = mapped_column(String(255))
    source_type: Mapped[str] = mapped_column(String(50))
    item_identifier: Mapped[str] = mapped_column(String(255))
    job_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("datamachine_jobs.job_id", ondelete="SET NULL"))
    processed_timestamp: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(20), default="processed")
    claim_expires_at: Mapped[datetime | None]
    flow_key: Mapped[int] = mapped_column(BigInteger, ForeignKey("datamachine_flows.flow_id", ondelete="CASCADE"))
    # When a fetch last found the item in its source (always a fetch's time: see engine.dedup); retention
    # forgets a processed item only when its step's later fetches no longer found it.
    last_seen_at: Mapped[datetime] = mapped_column(default=_seen_when_written)


class ChatSession(Base):
    __tablename__ = "datamachine_chat_sessions"
    __table_args__ = (
        Index(None, "user_id"),
        Index(None, "agent_id"),
        Index(None, "context"),
        Index(None, "user_id", "context"),
        Index(None, "created_at"),
        Index(None, "updated_at"),
        Index(None, "expires_at"),
        CheckConstraint("context IN ('chat', 'pipeline', 'system')", name="context"),
    )

    session_id: Mapped[str] = mapped_column(String(50), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger)
    agent_id: Mapped[int | None] = mapped_column(BigInteger, _agent_fk("SET NULL"))
    title: Mapped[str | None] = mapped_column(String(100))
    messages: Mapped[list[Any]] = mapped_column(JSONType, default=list)
    # "metadata" is reserved on declarative classes; the column keeps its schema name.
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSONType)
    provider: Mapped[str | None] = mapped_column(String(50))
    model: Mapped[str | None] = mapped_column(String(100))
    context: Mapped[str] = mapped_column(String(20), default="chat")
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    last_read_at: Mapped[datetime | None]


class Agent(Base):
    __tablename__ = "datamachine_agents"
    __table_args__ = (
        UniqueConstraint("agent_slug"),
        Index(None, "owner_id"),
        Index(None, "status"),
        CheckConstraint("status IN ('active', 'inactive')", name="status"),
        {"sqlite_autoincrement": True},
    )

    agent_id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    agent_slug: Mapped[str] = mapped_column(String(200))
    agent_name: Mapped[str] = mapped_column(String(200))
    owner_id: Mapped[int] = mapped_column(BigInteger)
    agent_config: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    status: Mapped[str] = mapped_column(String(20), default="active")
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class AgentAccess(Base):
    __tablename__ = "datamachine_agent_access"
    __table_args__ = (
        UniqueConstraint("agent_id", "user_id"),
        Index(None, "agent_id"),
        Index(None, "user_id"),
        Index(None, "role"),
        CheckConstraint(_in("role", ROLES), name="role"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    agent_id: Mapped[int] = mapped_column(BigInteger, _agent_fk("CASCADE"))
    user_id: Mapped[int] = mapped_column(BigInteger)
    role: Mapped[str] = mapped_column(String(20), default="viewer")
    granted_at: Mapped[datetime]


class LogEntry(Base):
    __tablename__ = "datamachine_logs"
    __table_args__ = (
        Index(None, "agent_id", "created_at"),
        Index(None, "level", "created_at"),
        Index(None, "created_at"),
        Index(None, "job_id", "created_at"),
        Index(None, "flow_id", "created_at"),
        Index(None, "pipeline_id", "created_at"),
        CheckConstraint(_in("level", LOG_LEVELS), name="level"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    agent_id: Mapped[int | None] = mapped_column(BigInteger)
    user_id: Mapped[int | None] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(20), default="info")
    message: Mapped[str] = mapped_column(Text)
    context: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime]
    job_id: Mapped[int | None] = mapped_column(BigInteger)
    flow_id: Mapped[int | None] = mapped_column(BigInteger)
    pipeline_id: Mapped[int | None] = mapped_column(BigInteger)


class AgentToken(Base):
    __tablename__ = "datamachine_agent_tokens"
    __table_args__ = (
        UniqueConstraint("lookup_key"),
        Index(None, "agent_id"),
        Index(None, "user_id"),
        Index(None, "revoked_at", "expires_at"),
        {"sqlite_autoincrement": True},
    )

    token_id: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    agent_id: Mapped[int | None] = mapped_column(BigInteger, _agent_fk("CASCADE"))
    user_id: Mapped[int] = mapped_column(BigInteger)
    label: Mapped[str | None] = mapped_column(String(100))
    token_prefix: Mapped[str] = mapped_column(String(230))
    lookup_key: Mapped[str] = mapped_column(String(12))
    salt: Mapped[str] = mapped_column(String(32))
    token_hash: Mapped[str] = mapped_column(String(64))
    capabilities: Mapped[list[Any] | None] = mapped_column(JSONType)
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)
    created_by_user_id: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]


class Setting(Base):
    __tablename__ = "datamachine_settings"

    key: Mapped[str] = mapped_column(String(191), primary_key=True)
    value: Mapped[Any] = mapped_column(JSONType)
    is_secret: Mapped[bool] = mapped_column(Boolean(create_constraint=True, name="is_secret"), default=False)
    updated_at: Mapped[datetime]
    updated_by_user_id: Mapped[int | None] = mapped_column(BigInteger)


ALL_TABLES = [model.__table__ for model in Base.__subclasses__()]
