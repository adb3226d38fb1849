"""Retention (docs/engine.md, Retention): exactly what each part deletes, per setting, in batches, never active work.

``engine.retention.run_retention`` is called directly here; the ``retention`` system task (run-task) and
the maintenance loop's daily schedule are covered too. Rows are seeded with back-dated timestamps.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, insert, select

from datamachine_mcp.engine import retention
from datamachine_mcp.engine.host import EngineHost
from datamachine_mcp.storage.models import ChatSession, Job, LogEntry, ProcessedItem
from datamachine_mcp.storage.timeutil import iso, parse_datetime, utcnow
from tests.conftest import call, fail, log_rows
from tests.test_scheduler import until

pytestmark = [pytest.mark.anyio, pytest.mark.backends]

ECHO = {"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {}}}
DAY = timedelta(days=1)


class Seed:
    """Back-dated rows for one pipeline/flow, remembering which ids each part must delete or keep."""

    def __init__(self, runtime: Any, pipeline_id: int, flow_id: int, fsid: str) -> None:
        self.runtime = runtime
        self.pid = pipeline_id
        self.fid = flow_id
        self.fsid = fsid
        self.now = utcnow()

    async def job(self, status: str, *, age: timedelta | None = None, parent: int | None = None, **extra: Any) -> int:
        created = self.now - (age or timedelta(0)) - timedelta(minutes=5)
        completed = self.now - age if age is not None else None
        async with self.runtime.db.write() as s:
            job = Job(
                user_id=1,
                pipeline_id=str(self.pid),
                flow_id=str(self.fid),
                pipeline_key=self.pid,
                flow_key=self.fid,
                source="pipeline",
                label=f"{status} {age}",
                status=status,
                parent_job_id=parent,
                run_trigger="batch" if parent else "manual",
                current_step_id=self.fsid,
                packets=[],
                engine_data={},
                created_at=created,
                updated_at=completed or created,
                run_at=created,
                completed_at=completed,
                **extra,
            )
            s.add(job)
            await s.flush()
            return job.job_id

    async def item(
        self,
        ident: str,
        status: str,
        *,
        age: timedelta = timedelta(0),
        job_id: int | None = None,
        expires: datetime | None = None,
    ) -> int:
        async with self.runtime.db.write() as s:
            row = ProcessedItem(
                flow_step_id=self.fsid,
                source_type="files",
                item_identifier=ident,
                job_id=job_id,
                processed_timestamp=self.now - age,
                status=status,
                claim_expires_at=expires,
                flow_key=self.fid,
            )
            s.add(row)
            await s.flush()
            return row.id

    async def log(self, message: str, age: timedelta) -> int:
        async with self.runtime.db.write() as s:
            row = LogEntry(level="info", message=message, context=None, created_at=self.now - age)
            s.add(row)
            await s.flush()
            return row.id

    async def chat(self, sid: str, expires: datetime | None) -> None:
        async with self.runtime.db.write() as s:
            s.add(
                ChatSession(
                    session_id=sid,
                    user_id=1,
                    title=sid,
                    messages=[],
                    meta={},
                    created_at=self.now - 3 * DAY,
                    updated_at=self.now - 2 * DAY,
                    expires_at=expires,
                )
            )


async def seed(runtime: Any, owner: Any) -> Seed:
    out = await call(owner, "create-pipeline", {"pipeline_name": "Old stuff", "workflow": {"steps": [ECHO]}})
    return Seed(runtime, out["pipeline_id"], out["flow_id"], out["flow_step_ids"][0])


async def ids(runtime: Any, model: Any, pk: Any) -> set[Any]:
    async with runtime.db.read() as s:
        return set((await s.execute(select(pk))).scalars())


async def job_ids(runtime: Any) -> set[int]:
    return await ids(runtime, Job, Job.job_id)


async def item_ids(runtime: Any) -> set[int]:
    return await ids(runtime, ProcessedItem, ProcessedItem.id)


async def log_ids(runtime: Any) -> set[int]:
    return await ids(runtime, LogEntry, LogEntry.id)


async def chat_ids(runtime: Any) -> set[str]:
    return await ids(runtime, ChatSession, ChatSession.session_id)


async def test_each_part_deletes_exactly_what_storage_md_lists(runtime, owner):
    s = await seed(runtime, owner)
    old, recent = 40 * DAY, 10 * DAY
    deleted_jobs, kept_jobs = set(), set()
    # completed jobs (completed, completed_no_items, agent_skipped), top-level, completed_at older than 30 days
    for status in ("completed", "completed_no_items", "agent_skipped"):
        deleted_jobs.add(await s.job(status, age=old))
        kept_jobs.add(await s.job(status, age=recent))
    # failed/cancelled
    for status in ("failed", "cancelled"):
        deleted_jobs.add(await s.job(status, age=old))
        kept_jobs.add(await s.job(status, age=recent))
    # non-final jobs are never deleted, whatever their age (even with a stray completed_at)
    for status in ("pending", "processing", "waiting"):
        kept_jobs.add(await s.job(status, age=None))
        kept_jobs.add(await s.job(status, age=400 * DAY))
    # children go with their old parent by cascade...
    parent = await s.job("completed", age=old)
    children = {await s.job("completed", age=old, parent=parent), await s.job("failed", age=old, parent=parent)}
    deleted_jobs |= {parent} | children
    # ...and an old child of a parent that is still kept is kept
    young_parent = await s.job("completed", age=recent)
    kept_jobs |= {young_parent, await s.job("completed", age=old, parent=young_parent)}

    pending = await s.job("pending")
    waiting = await s.job("waiting")
    final = await s.job("completed", age=recent)
    kept_jobs |= {pending, waiting, final}
    doomed = sorted(deleted_jobs)[0]  # deleted by this run: its claim becomes free (job_id NULL)
    future = s.now + timedelta(hours=1)
    deleted_items = {
        await s.item("processed-old", "processed", age=old),
        await s.item("claim-no-job", "claimed"),
        await s.item("claim-final-job", "claimed", job_id=final, expires=future),
        await s.item("claim-of-deleted-job", "claimed", job_id=doomed, expires=future),
        await s.item("claim-expired", "claimed", job_id=pending, expires=s.now - timedelta(minutes=1)),
    }
    kept_items = {
        await s.item("processed-recent", "processed", age=recent),
        await s.item("claim-active", "claimed", age=old, job_id=pending, expires=future),
        await s.item("claim-held", "claimed", age=old, job_id=waiting, expires=None),
    }
    old_logs = {await s.log(f"old {i}", old) for i in range(3)}
    await s.log("recent", recent)
    await s.chat("expired", s.now - timedelta(minutes=1))
    await s.chat("live", s.now + DAY)
    await s.chat("forever", None)

    logs_before = await log_ids(runtime)
    result = await retention.run_retention(runtime.engine)
    assert result["dry_run"] is False and parse_datetime(result["ran_at"]) >= s.now.replace(microsecond=0)
    assert result["deleted"] == {
        "completed_jobs": 4,  # top-level rows (the cascaded children are not counted)
        "failed_jobs": 2,
        "logs": 3,
        "processed_items": 1,
        "stale_claims": 4,
        "chat_sessions": 1,
    }
    assert await job_ids(runtime) == kept_jobs
    assert await item_ids(runtime) == kept_items
    assert not deleted_items & await item_ids(runtime)
    assert await chat_ids(runtime) == {"live", "forever"}
    after = await log_ids(runtime)
    assert not old_logs & after and (logs_before - old_logs) <= after

    # one info row per part with its counts, and the time of the run
    rows = [r for r in await log_rows(runtime) if (r["context"] or {}).get("retention")]
    assert [(r["level"], r["context"]["retention"], r["context"]["deleted"]) for r in rows] == [
        ("info", "completed_jobs", 4),
        ("info", "failed_jobs", 2),
        ("info", "logs", 3),
        ("info", "processed_items", 1),
        ("info", "stale_claims", 4),
        ("info", "chat_sessions", 1),
    ]
    assert rows[0]["message"] == "Retention: deleted 4 completed jobs older than 30 days"
    async with runtime.db.read() as session:
        last = await runtime.settings.internal_get(session, retention.LAST_RUN_KEY)
    assert last == result["ran_at"]

    # a second run finds nothing left to delete
    again = await retention.run_retention(runtime.engine)
    assert set(again["deleted"].values()) == {0}
    assert await job_ids(runtime) == kept_jobs


async def test_dry_run_counts_and_deletes_nothing(runtime, owner):
    s = await seed(runtime, owner)
    await s.job("completed", age=40 * DAY)
    await s.log("old", 40 * DAY)
    await s.item("stale", "claimed")
    jobs, items, logs = await job_ids(runtime), await item_ids(runtime), await log_ids(runtime)
    result = await retention.run_retention(runtime.engine, dry_run=True)
    assert result["dry_run"] is True
    assert result["deleted"] == {
        "completed_jobs": 1,
        "failed_jobs": 0,
        "logs": 1,
        "processed_items": 0,
        "stale_claims": 1,
        "chat_sessions": 0,
    }
    assert (await job_ids(runtime), await item_ids(runtime), await log_ids(runtime)) == (jobs, items, logs)
    async with runtime.db.read() as session:
        assert await runtime.settings.internal_get(session, retention.LAST_RUN_KEY) is None


async def test_each_part_follows_its_own_setting_and_zero_disables_it(runtime, owner):
    s = await seed(runtime, owner)
    await call(
        owner,
        "update-settings",
        {
            "settings": {
                "retention_completed_jobs_days": 0,
                "retention_failed_jobs_days": 7,
                "retention_logs_days": 0,
                "retention_processed_items_days": 60,
            }
        },
    )
    ancient_completed = await s.job("completed", age=999 * DAY)
    failed_10 = await s.job("failed", age=10 * DAY)
    failed_5 = await s.job("failed", age=5 * DAY)
    ancient_log = await s.log("ancient", 999 * DAY)
    item_0 = await s.item("p0", "processed")  # the step's latest fetch saw this one today
    item_40 = await s.item("p40", "processed", age=40 * DAY)
    item_70 = await s.item("p70", "processed", age=70 * DAY)

    result = await retention.run_retention(runtime.engine)
    # disabled parts are skipped entirely (not reported as 0)
    assert result["deleted"] == {
        "failed_jobs": 1,
        "processed_items": 1,
        "stale_claims": 0,
        "chat_sessions": 0,
    }
    assert await job_ids(runtime) == {ancient_completed, failed_5}
    assert failed_10 not in await job_ids(runtime)
    assert ancient_log in await log_ids(runtime)
    assert await item_ids(runtime) == {item_0, item_40}
    assert item_70 not in await item_ids(runtime)
    rows = [r for r in await log_rows(runtime) if (r["context"] or {}).get("retention") == "failed_jobs"]
    assert rows[-1]["message"] == "Retention: deleted 1 failed or cancelled jobs older than 7 days"
    assert rows[-1]["context"] == {"retention": "failed_jobs", "deleted": 1, "days": 7}


async def test_deletes_in_batches_of_1000_rows(runtime, owner):
    s = await seed(runtime, owner)
    when = s.now - 40 * DAY
    await s.item("seen-today", "processed")  # a fetch today no longer saw the 1,200 old items
    async with runtime.db.write() as session:
        await session.execute(
            insert(LogEntry),
            [{"level": "debug", "message": f"old {i}", "created_at": when} for i in range(2500)],
        )
        await session.execute(
            insert(ProcessedItem),
            [
                {
                    "flow_step_id": s.fsid,
                    "source_type": "files",
                    "item_identifier": f"item-{i}",
                    "processed_timestamp": when,
                    "status": "processed",
                    "flow_key": s.fid,
                }
                for i in range(1200)
            ],
        )
    deletes: list[tuple[str, int]] = []

    def record(_conn: Any, _cursor: Any, statement: str, _params: Any, _context: Any, _many: bool) -> None:
        text = statement.lstrip().upper()
        if text.startswith("DELETE FROM DATAMACHINE_LOGS") or text.startswith(
            "DELETE FROM DATAMACHINE_PROCESSED_ITEMS"
        ):
            deletes.append((text.split()[2].lower(), _cursor.rowcount))

    engine = runtime.db.write_engine.sync_engine
    event.listen(engine, "after_cursor_execute", record)
    try:
        result = await retention.run_retention(runtime.engine)
    finally:
        event.remove(engine, "after_cursor_execute", record)
    assert result["deleted"]["logs"] == 2500 and result["deleted"]["processed_items"] == 1200
    # (a part with nothing to delete, here the stale claims, runs one DELETE that finds nothing)
    assert [n for t, n in deletes if t == "datamachine_logs" and n] == [1000, 1000, 500]
    assert [n for t, n in deletes if t == "datamachine_processed_items" and n] == [1000, 200]


async def test_maintenance_loop_runs_retention_at_start_and_then_daily(runtime, owner):
    s = await seed(runtime, owner)
    old = await s.log("old", 40 * DAY)
    async with runtime.db.read() as session:
        assert await runtime.settings.internal_get(session, retention.LAST_RUN_KEY) is None  # never ran
    host = EngineHost(runtime.engine, concurrency=1, poll_seconds=0.2)
    await host.start()
    try:

        async def gone() -> bool:
            return old not in await log_ids(runtime)

        await until(gone, 15)
    finally:
        await host.stop(grace=5)
    async with runtime.db.read() as session:
        last = parse_datetime(await runtime.settings.internal_get(session, retention.LAST_RUN_KEY))
    assert not await retention.claim_due(runtime.engine, last + timedelta(hours=23, minutes=59))
    assert await retention.claim_due(runtime.engine, last + timedelta(hours=24))
    # taking the run stamps it: the same moment is not due again
    assert not await retention.claim_due(runtime.engine, last + timedelta(hours=24))

    # the internal key is neither listed nor settable
    settings = await call(owner, "get-settings")
    assert retention.LAST_RUN_KEY not in settings["settings"] and retention.LAST_RUN_KEY not in settings["defaults"]
    await fail(owner, "update-settings", {"settings": {retention.LAST_RUN_KEY: iso(utcnow())}}, "invalid_setting")


async def test_processes_starting_together_run_retention_once(runtime):
    """Workers started at the same moment all find retention due; exactly one takes the run."""
    import anyio

    now = utcnow()
    won: list[bool] = []

    async def take() -> None:
        won.append(await retention.claim_due(runtime.engine, now))

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(take)
    assert sorted(won) == [False] * 7 + [True]
    later = now + timedelta(hours=24)
    assert await retention.claim_due(runtime.engine, later) and not await retention.claim_due(runtime.engine, later)
