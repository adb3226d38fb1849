"""Claiming due jobs under a lease (engine.md §5.2). The one place that knows how each backend claims.

SQLite: one ``BEGIN IMMEDIATE`` transaction picks candidates and updates them with a status guard.
PostgreSQL: ``FOR UPDATE SKIP LOCKED`` so concurrent workers skip each other's rows (in a materialized CTE).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update

from datamachine_mcp.engine import status as st
from datamachine_mcp.storage.db import Database
from datamachine_mcp.storage.models import Job


async def claim_due(db: Database, worker_id: str, limit: int, *, now: datetime, lease_ttl: int) -> list[int]:
    """Claim up to ``limit`` due pending jobs for ``worker_id``; returns their ids in claim order."""
    if limit <= 0:
        return []
    due = (
        select(Job.job_id)
        .where(
            Job.status == st.PENDING,
            Job.run_at <= now,
            or_(Job.affinity.is_(None), Job.affinity == worker_id),
        )
        .order_by(Job.run_at, Job.job_id)
        .limit(limit)
    )
    if db.dialect == "postgresql":
        due = due.with_for_update(skip_locked=True)
    values = {
        "status": st.PROCESSING,
        "lease_owner": worker_id,
        "lease_expires_at": now + timedelta(seconds=lease_ttl),
        "started_at": func.coalesce(Job.started_at, now),
        "attempts": Job.attempts + 1,
        "updated_at": now,
    }
    async with db.write() as session:
        if db.dialect == "postgresql":
            # The candidates come from a MATERIALIZED CTE, evaluated exactly once. The literal form
            # ``WHERE job_id IN (SELECT … LIMIT n FOR UPDATE SKIP LOCKED)`` is unsafe: with a nested
            # loop semi join (chosen e.g. on stale statistics right after a large fan-out) the subquery
            # is re-run per outer row, skips the rows this statement already updated, and the UPDATE
            # claims far more than n jobs.
            picked = due.cte("due").prefix_with("MATERIALIZED")
            stmt = (
                update(Job)
                .where(Job.job_id == picked.c.job_id)
                .values(**values)
                .returning(Job.job_id, Job.run_at)
                .execution_options(synchronize_session=False)
            )
            rows = (await session.execute(stmt)).all()
            return [r[0] for r in sorted(rows, key=lambda r: (r[1], r[0]))]
        ids = [r[0] for r in (await session.execute(due)).all()]
        if not ids:
            return []
        claim = (
            update(Job)
            .where(Job.job_id.in_(ids), Job.status == st.PENDING)
            .values(**values)
            .returning(Job.job_id)
            .execution_options(synchronize_session=False)
        )
        claimed = {r[0] for r in (await session.execute(claim)).all()}
        return [i for i in ids if i in claimed]


async def next_due_at(db: Database, worker_id: str) -> datetime | None:
    """When the earliest pending job becomes due (for sleeping until then)."""
    async with db.read() as session:
        return (
            await session.execute(
                select(func.min(Job.run_at)).where(
                    Job.status == st.PENDING, or_(Job.affinity.is_(None), Job.affinity == worker_id)
                )
            )
        ).scalar()
