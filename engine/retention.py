"""Retention (docs/engine.md, Retention): delete what has aged out, in batches of 1,000 rows per transaction."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select

from datamachine_mcp.engine import claims as claim_ops
from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.chat_cleanup import delete_expired_sessions
from datamachine_mcp.engine.dedup import LAST_SEEN_REFRESH
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.storage.logs import write_log
from datamachine_mcp.storage.models import ChatSession, Job, LogEntry, ProcessedItem
from datamachine_mcp.storage.timeutil import iso, utcnow

BATCH = 1000
LAST_RUN_KEY = "maintenance_last_retention_at"
PART_NAMES = {
    "completed_jobs": "completed jobs",
    "failed_jobs": "failed or cancelled jobs",
    "logs": "log rows",
    "processed_items": "processed items",
    "stale_claims": "stale claims",
    "chat_sessions": "expired chat sessions",
}


async def _delete_in_batches(services: EngineServices, model: Any, pk: Any, condition: Any, *, dry_run: bool) -> int:
    if dry_run:
        async with services.db.read() as session:
            return int((await session.execute(select(func.count()).select_from(model).where(condition))).scalar() or 0)
    total = 0
    while True:
        async with services.db.write() as session:
            batch = services.db.for_update(select(pk).where(condition).limit(BATCH), skip_locked=True)
            ids = [r[0] for r in (await session.execute(batch)).all()]
            if not ids:
                return total
            await session.execute(delete(model).where(pk.in_(ids)))
            total += len(ids)
        if len(ids) < BATCH:
            return total


async def run_retention(
    services: EngineServices, *, dry_run: bool = False, now: datetime | None = None
) -> dict[str, Any]:
    """Run every retention part whose setting is not 0; returns counts per part."""
    now = now or utcnow()
    snap = await services.snapshot()

    def cutoff(key: str) -> datetime | None:
        days = snap.int(key)
        return now - timedelta(days=days) if days > 0 else None

    counts: dict[str, Any] = {}
    ages: dict[str, int | None] = {}
    top = Job.parent_job_id.is_(None)
    if (c := cutoff("retention_completed_jobs_days")) is not None:
        cond = (Job.status.in_(st.SUCCESS)) & (Job.completed_at < c) & top
        counts["completed_jobs"] = await _delete_in_batches(services, Job, Job.job_id, cond, dry_run=dry_run)
        ages["completed_jobs"] = snap.int("retention_completed_jobs_days")
    if (c := cutoff("retention_failed_jobs_days")) is not None:
        cond = (Job.status.in_((st.FAILED, st.CANCELLED))) & (Job.completed_at < c) & top
        counts["failed_jobs"] = await _delete_in_batches(services, Job, Job.job_id, cond, dry_run=dry_run)
        ages["failed_jobs"] = snap.int("retention_failed_jobs_days")
    if (c := cutoff("retention_logs_days")) is not None:
        counts["logs"] = await _delete_in_batches(
            services, LogEntry, LogEntry.id, LogEntry.created_at < c, dry_run=dry_run
        )
        ages["logs"] = snap.int("retention_logs_days")
    if (c := cutoff("retention_processed_items_days")) is not None:
        # By when a fetch last saw the item, not when it was processed: an item the source still
        # offers is never forgotten (and so never taken twice). The refresh slack matches how rarely
        # a fetch rewrites last_seen_at.
        cond = (ProcessedItem.status == claim_ops.PROCESSED) & (ProcessedItem.last_seen_at < c - LAST_SEEN_REFRESH)
        counts["processed_items"] = await _delete_in_batches(
            services, ProcessedItem, ProcessedItem.id, cond, dry_run=dry_run
        )
        ages["processed_items"] = snap.int("retention_processed_items_days")
    stale = (ProcessedItem.status == claim_ops.CLAIMED) & or_(
        ProcessedItem.job_id.is_(None), ~claim_ops.active_claim_condition(now)
    )
    counts["stale_claims"] = await _delete_in_batches(services, ProcessedItem, ProcessedItem.id, stale, dry_run=dry_run)
    ages["stale_claims"] = None
    if dry_run:
        async with services.db.read() as session:
            expired = select(func.count()).select_from(ChatSession).where(ChatSession.expires_at < now)
            counts["chat_sessions"] = int((await session.execute(expired)).scalar() or 0)
    else:
        counts["chat_sessions"] = await delete_expired_sessions(services.db, now=now)
    ages["chat_sessions"] = None
    result = {"dry_run": dry_run, "ran_at": iso(now), "deleted": counts}
    if not dry_run:
        async with services.db.write() as session:
            # each part logs one info row with its counts
            for part, deleted in counts.items():
                days = ages[part]
                age = "not seen by a fetch for" if part == "processed_items" else "older than"
                older = f" {age} {days} days" if days else ""
                context = {"retention": part, "deleted": deleted}
                if days:
                    context["days"] = days
                message = f"Retention: deleted {deleted} {PART_NAMES[part]}{older}"
                await write_log(session, "info", message, context, threshold=str(snap["log_level"]))
            await services.settings.internal_set(session, LAST_RUN_KEY, iso(now), at=_stamp(now))
        # After the day's deletions: statistics for the planner (see Database.analyze).
        await services.db.analyze()
    return result


def _stamp(now: datetime) -> datetime:
    """The run's time as its stored value gives it (whole seconds), so the value and the row agree."""
    return now.replace(microsecond=0)


async def claim_due(services: EngineServices, now: datetime) -> bool:
    """True when a retention run is due (never ran, or the last run is 24 hours old) and this process
    took it: the run is stamped in the same statement, so of several processes starting together
    exactly one runs retention."""
    async with services.db.write() as session:
        return await services.settings.internal_claim(
            session, LAST_RUN_KEY, iso(now), at=_stamp(now), unless_after=now - timedelta(hours=24)
        )
