"""Retention (storage.md §10): delete what has aged out, in batches of 1,000 rows per transaction."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, or_, select

from engine import claims as claim_ops
from engine import status as st
from engine.chat_cleanup import delete_expired_sessions
from engine.runtime import EngineServices
from storage.logs import write_log
from storage.models import ChatSession, Job, LogEntry, ProcessedItem
from storage.timeutil import iso, parse_datetime, utcnow

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
            ids = [r[0] for r in (await session.execute(select(pk).where(condition).limit(BATCH))).all()]
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
        cond = (ProcessedItem.status == claim_ops.PROCESSED) & (ProcessedItem.processed_timestamp < c)
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
            # storage.md §10: each part logs one info row with its counts
            for part, deleted in counts.items():
                days = ages[part]
                older = f" older than {days} days" if days else ""
                context = {"retention": part, "deleted": deleted}
                if days:
                    context["days"] = days
                message = f"Retention: deleted {deleted} {PART_NAMES[part]}{older}"
                await write_log(session, "info", message, context, threshold=str(snap["log_level"]))
            await services.settings.internal_set(session, LAST_RUN_KEY, iso(now))
    return result


async def due(services: EngineServices, now: datetime) -> bool:
    """Retention runs at start when the last run is older than 24 h, then every 24 hours."""
    async with services.db.read() as session:
        last = await services.settings.internal_get(session, LAST_RUN_KEY)
    if not isinstance(last, str):
        return True
    return now - parse_datetime(last) >= timedelta(hours=24)
