"""Rows as the job store reads and writes them: plain objects, not ORM instances.

SQLite keeps datetimes as naive UTC text in SQLAlchemy's format (``YYYY-MM-DD HH:MM:SS.ffffff``, so text
comparison is time order) and JSON as text; PostgreSQL drivers hand back aware datetimes and decoded JSON.
The helpers here convert both ways, so statements see the same values whichever engine wrote the row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter
from typing import Any

JOB_COLUMNS = (
    "job_id",
    "user_id",
    "agent_id",
    "pipeline_id",
    "flow_id",
    "source",
    "label",
    "parent_job_id",
    "status",
    "status_reason",
    "engine_data",
    "created_at",
    "completed_at",
    "pipeline_key",
    "flow_key",
    "run_trigger",
    "current_step_id",
    "packets",
    "attempts",
    "max_attempts",
    "run_at",
    "started_at",
    "updated_at",
    "lease_owner",
    "lease_expires_at",
    "idempotency_key",
    "wait_kind",
    "wait_ref",
    "wait_expires_at",
    "affinity",
    "handler_slug",
)
_DATETIMES = frozenset(
    {"created_at", "completed_at", "run_at", "started_at", "updated_at", "lease_expires_at", "wait_expires_at"}
)
_JSON = frozenset({"engine_data", "packets"})
_DT_INDEX = tuple(i for i, c in enumerate(JOB_COLUMNS) if c in _DATETIMES)
_JSON_INDEX = tuple(i for i, c in enumerate(JOB_COLUMNS) if c in _JSON)


@dataclass(slots=True)
class JobRow:
    """One ``datamachine_jobs`` row. Attribute names are the columns', so steps read it like the model."""

    job_id: int
    user_id: int
    agent_id: int | None
    pipeline_id: str | None
    flow_id: str | None
    source: str
    label: str | None
    parent_job_id: int | None
    status: str
    status_reason: str | None
    engine_data: dict[str, Any] | None
    created_at: datetime
    completed_at: datetime | None
    pipeline_key: int | None
    flow_key: int | None
    run_trigger: str
    current_step_id: str | None
    packets: list[Any] = field(default_factory=list)
    attempts: int = 0
    max_attempts: int = 3
    run_at: datetime | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    idempotency_key: str | None = None
    wait_kind: str | None = None
    wait_ref: str | None = None
    wait_expires_at: datetime | None = None
    affinity: str | None = None
    handler_slug: str | None = None

    @classmethod
    def of(cls, job: Any) -> JobRow:
        """From anything with the job's attributes (an ORM ``Job``)."""
        return cls(*(getattr(job, c) for c in JOB_COLUMNS))


_ALL = attrgetter(*JOB_COLUMNS)


def snapshot(job: JobRow) -> tuple[Any, ...]:
    """The row's values (cheap: one C call), to ``restore`` it later."""
    values: tuple[Any, ...] = _ALL(job)
    return values


def restore(job: JobRow, saved: tuple[Any, ...]) -> None:
    for name, value in zip(JOB_COLUMNS, saved, strict=True):
        setattr(job, name, value)


def dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def sqlite_ts(value: datetime) -> str:
    """An aware datetime as SQLAlchemy stores it on SQLite (naive UTC, always six fraction digits)."""
    if value.tzinfo is not UTC:
        value = value.astimezone(UTC)
    return "%04d-%02d-%02d %02d:%02d:%02d.%06d" % (  # noqa: UP031 - the fastest exact format
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
        value.microsecond,
    )


def parse_sqlite_ts(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def job_from_sqlite(row: tuple[Any, ...]) -> JobRow:
    values = list(row)
    for i in _DT_INDEX:
        if values[i] is not None:
            values[i] = datetime.fromisoformat(values[i]).replace(tzinfo=UTC)
    for i in _JSON_INDEX:
        if values[i] is not None:
            values[i] = json.loads(values[i])
    return JobRow(*values)


def job_from_decoded(row: Any) -> JobRow:
    """From a PostgreSQL row (JSON already decoded, datetimes aware)."""
    return JobRow(*row)
