"""Retention (docs/engine.md, Retention): delete what has aged out, in batches of 1,000 rows per transaction."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import String, column, delete, func, or_, select, text

from datamachine_mcp.engine import claims as claim_ops
from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.chat_cleanup import delete_expired_sessions
from datamachine_mcp.engine.dedup import ITEMS, LAST_SEEN_REFRESH
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.storage.dml import rowcount
from datamachine_mcp.storage.logs import write_log
from datamachine_mcp.storage.models import ChatSession, Job, LogEntry, ProcessedItem
from datamachine_mcp.storage.timeutil import iso, utcnow
from datamachine_mcp.storage.types import UTCDateTime

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
    # One statement per batch: the ids never travel to Python and back as 1,000 parameters.
    batch = services.db.for_update(select(pk).where(condition).limit(BATCH), skip_locked=True)
    stmt = delete(model).where(pk.in_(batch.scalar_subquery())).execution_options(synchronize_session=False)
    total = 0
    while True:
        async with services.db.write() as session:
            deleted = rowcount(await session.execute(stmt))
        total += deleted
        if deleted < BATCH:
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
    if (unseen_days := snap.int("retention_processed_items_days")) > 0:
        counts["processed_items"] = await forget_unseen(services, timedelta(days=unseen_days), dry_run=dry_run)
        ages["processed_items"] = unseen_days
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
                age = "no longer offered by their source for" if part == "processed_items" else "older than"
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


# --- processed items: forgotten only once a later fetch of their step no longer saw them -------------

_ITEMS = ITEMS.name


def _after(column: str, cast: str) -> str:
    """``column`` of the (flow_step_id, source_type) that follows the current one: the next source type
    of the same step, else the first of the next step. Two index probes; a row-value comparison would
    not use the index once it is correlated."""
    same = "p.flow_step_id = steps.fsid AND p.source_type > steps.source ORDER BY p.source_type"
    later = "p.flow_step_id > steps.fsid ORDER BY p.flow_step_id, p.source_type"
    return (
        f"CAST(COALESCE((SELECT p.{column} FROM {_ITEMS} p WHERE {same} LIMIT 1),"
        f" (SELECT p.{column} FROM {_ITEMS} p WHERE {later} LIMIT 1)) AS {cast})"
    )


_SEEN = f"FROM {_ITEMS} p WHERE p.flow_step_id = steps.fsid AND p.source_type = steps.source"
# Every (flow_step_id, source_type) of the ledger with its oldest and newest last_seen_at, in one
# statement that reads a few index entries per step, not the ledger: the recursive walk jumps from one
# step to the next, min and max are probes of the (flow_step_id, source_type, last_seen_at) index. The
# newest is the step's latest fetch (docs/engine.md, Retention). The casts give both terms one type.
STEP_SPANS = text(
    "WITH RECURSIVE steps(fsid, source, depth) AS ("
    " SELECT CAST('' AS VARCHAR(255)), CAST('' AS VARCHAR(50)), 0"
    f" UNION ALL SELECT {_after('flow_step_id', 'VARCHAR(255)')}, {_after('source_type', 'VARCHAR(50)')},"
    " steps.depth + 1 FROM steps WHERE steps.fsid IS NOT NULL)"
    f" SELECT fsid, source, (SELECT min(p.last_seen_at) {_SEEN}) AS oldest,"
    f" (SELECT max(p.last_seen_at) {_SEEN}) AS newest"
    " FROM steps WHERE depth > 0 AND fsid IS NOT NULL"
).columns(
    column("fsid", String), column("source", String), column("oldest", UTCDateTime()), column("newest", UTCDateTime())
)


async def forget_unseen(services: EngineServices, window: timedelta, *, dry_run: bool) -> int:
    """Delete the processed items that their step's latest fetch had not seen for ``window``.

    An item seen by a fetch has a last_seen_at at most LAST_SEEN_REFRESH older than that fetch, so an
    item more than ``window`` + the refresh older than the step's newest last_seen_at was missing from
    every fetch of the last ``window``. A step that has not fetched since (paused, manual, scheduled
    rarely) forgets nothing. Cost: a few index probes per step plus the rows deleted.
    """
    slack = window + LAST_SEEN_REFRESH
    async with services.db.read() as session:
        spans = (await session.execute(STEP_SPANS)).all()
    doomed = [(fsid, source, newest - slack) for fsid, source, oldest, newest in spans if oldest < newest - slack]
    total = 0
    for fsid, source, before in doomed:
        cond = (
            (ProcessedItem.flow_step_id == fsid)
            & (ProcessedItem.source_type == source)
            & (ProcessedItem.last_seen_at < before)
            & (ProcessedItem.status == claim_ops.PROCESSED)
        )
        total += await _delete_in_batches(services, ProcessedItem, ProcessedItem.id, cond, dry_run=dry_run)
    return total


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
