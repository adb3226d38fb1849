"""Upgrading a populated database loses nothing: a database built at an older revision, with jobs that
have children, claimed and processed items and parked jobs, is migrated to head on each backend.

On SQLite a migration that changes a constraint rebuilds the table; dropping the old table must not fire
its foreign keys' ON DELETE actions (children deleted, claims set free) nor let an id be handed out again.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import bindparam, text
from sqlalchemy.exc import IntegrityError

from datamachine_mcp.storage.db import Database
from datamachine_mcp.storage.migrate import alembic_config, current_revision, migrate
from datamachine_mcp.storage.migrations import HEAD_REVISION
from datamachine_mcp.storage.timeutil import utcnow
from datamachine_mcp.storage.types import UTCDateTime
from tests.conftest import TABLES, database_url

pytestmark = [pytest.mark.anyio, pytest.mark.backends]

# The revision before the wait_kind constraint named no step type.
BEFORE = "0004_processed_last_seen"


async def database_at(url: str, revision: str) -> Database:
    """An empty database brought to ``revision`` (PostgreSQL: the test database's schema is recreated)."""
    db = Database(url)
    if db.dialect == "postgresql":
        async with db.write_engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
    async with db.write_engine.begin() as conn:
        await conn.run_sync(lambda sync: command.upgrade(alembic_config(sync), revision))
    return db


async def execute(db: Database, sql: str, **params: Any) -> None:
    stamps = [bindparam(k, type_=UTCDateTime()) for k in params if k.endswith("_at")]
    async with db.write() as s:
        await s.execute(text(sql).bindparams(*stamps), params)


JOB_COLUMNS = (
    "job_id, user_id, pipeline_id, flow_id, pipeline_key, flow_key, source, parent_job_id, status, engine_data, "
    "created_at, run_trigger, packets, attempts, max_attempts, run_at, updated_at, wait_kind, wait_ref"
)


async def job(db: Database, job_id: int, status: str, *, parent: int | None = None, wait: tuple | None = None) -> None:
    kind, ref = wait or (None, None)
    await execute(
        db,
        f"INSERT INTO datamachine_jobs ({JOB_COLUMNS}) VALUES (:id, 1, '1', '1', 1, 1, 'pipeline', :parent, "
        ":status, :data, :made_at, 'manual', '[]', 1, 3, :made_at, :made_at, :kind, :ref)",
        id=job_id,
        parent=parent,
        status=status,
        data=json.dumps({"note": f"job {job_id}"}),
        made_at=utcnow(),
        kind=kind,
        ref=ref,
    )
    if db.dialect == "postgresql":  # an explicit id does not advance the sequence; the engine's inserts do
        await execute(db, f"SELECT setval(pg_get_serial_sequence('datamachine_jobs', 'job_id'), {job_id})")


async def populate(db: Database) -> None:
    now = utcnow()
    await execute(
        db,
        "INSERT INTO datamachine_agents (agent_slug, agent_name, owner_id, agent_config, status, created_at, "
        "updated_at) VALUES ('keeper', 'Keeper', 1, '{}', 'active', :made_at, :made_at)",
        made_at=now,
    )
    await execute(
        db,
        "INSERT INTO datamachine_pipelines (user_id, agent_id, pipeline_name, pipeline_config, created_at, "
        "updated_at) VALUES (1, 1, 'P', '{}', :made_at, :made_at)",
        made_at=now,
    )
    await execute(
        db,
        "INSERT INTO datamachine_flows (pipeline_id, user_id, agent_id, flow_name, flow_config, scheduling_config, "
        "created_at, updated_at, consecutive_failures, consecutive_no_items) "
        "VALUES (1, 1, 1, 'F', '{}', '{\"interval\": \"manual\"}', :made_at, :made_at, 0, 0)",
        made_at=now,
    )
    await job(db, 1, "processing")  # a batch parent and its two children
    await job(db, 2, "pending", parent=1)
    await job(db, 3, "completed", parent=1)
    await job(db, 4, "waiting", wait=("approval", "pa_0123"))
    await job(db, 5, "waiting", wait=("webhook_gate", "f" * 64))
    await job(db, 6, "completed")
    await job(db, 7, "failed")
    await execute(db, "DELETE FROM datamachine_jobs WHERE job_id = 7")  # the highest id ever handed out
    items = [
        ("claimed", 2, now + timedelta(hours=1)),  # held by a child
        ("processed", 3, None),
        ("processed", 6, None),
        ("processed", None, None),
    ]
    for n, (status, holder, expires) in enumerate(items):
        await execute(
            db,
            "INSERT INTO datamachine_processed_items (flow_step_id, source_type, item_identifier, job_id, "
            "processed_timestamp, status, claim_expires_at, flow_key, last_seen_at) "
            "VALUES ('s_1', 'rss', :item, :holder, :made_at, :status, :expires_at, 1, :made_at)",
            item=f"item-{n}",
            holder=holder,
            made_at=now,
            status=status,
            expires_at=expires,
        )
    await execute(
        db,
        "INSERT INTO datamachine_logs (level, message, context, created_at, job_id, flow_id, pipeline_id) "
        "VALUES ('info', 'Job 1 started', '{}', :made_at, 1, 1, 1)",
        made_at=now,
    )


async def rows(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    out = {}
    async with db.read() as s:
        for table in TABLES:
            found = (await s.execute(text(f"SELECT * FROM {table} ORDER BY 1"))).all()
            out[table] = [
                tuple(json.dumps(v, sort_keys=True) if isinstance(v, dict | list) else v for v in r) for r in found
            ]
    return out


async def scalar(db: Database, sql: str) -> Any:
    async with db.read() as s:
        return (await s.execute(text(sql))).scalar()


async def test_a_populated_database_upgrades_to_head_without_losing_a_row(tmp_path, db_backend):
    db = await database_at(database_url(db_backend, tmp_path), BEFORE)
    try:
        await populate(db)
        before = await rows(db)

        assert await migrate(db) is True
        assert await current_revision(db) == HEAD_REVISION
        assert await rows(db) == before  # children, claims and their holders, parked jobs: all as they were

        # A parking step type declared later needs no schema change: any wait kind is stored.
        await job(db, 8, "waiting", wait=("hold", "hold_1"))
        assert await scalar(db, "SELECT wait_kind FROM datamachine_jobs WHERE job_id = 8") == "hold"
        # The other constraints of the rebuilt table still hold.
        for bad in (
            "UPDATE datamachine_jobs SET status = 'bogus' WHERE job_id = 6",
            "UPDATE datamachine_jobs SET max_attempts = 0 WHERE job_id = 6",
            "UPDATE datamachine_jobs SET wait_ref = 'pa_0123' WHERE job_id = 6",  # wait_ref stays unique
            "UPDATE datamachine_jobs SET parent_job_id = 999 WHERE job_id = 6",  # foreign keys are enforced
        ):
            with pytest.raises(IntegrityError):
                await execute(db, bad)
        # Ids are never handed out twice: the next job comes after the deleted 7.
        await execute(
            db,
            f"INSERT INTO datamachine_jobs ({JOB_COLUMNS.removeprefix('job_id, ')}) VALUES (1, 'direct', 'direct', "
            "NULL, NULL, 'pipeline', NULL, 'pending', '{}', :made_at, 'manual', '[]', 0, 3, :made_at, :made_at, "
            "NULL, NULL)",
            made_at=utcnow(),
        )
        assert await scalar(db, "SELECT max(job_id) FROM datamachine_jobs") == 9
        # The foreign keys' actions survived the rebuild: deleting the parent takes its children and
        # frees their claims; processed items keep their history.
        await execute(db, "DELETE FROM datamachine_jobs WHERE job_id = 1")
        assert await scalar(db, "SELECT count(*) FROM datamachine_jobs WHERE job_id IN (1, 2, 3)") == 0
        assert await scalar(db, "SELECT count(*) FROM datamachine_processed_items") == 4
        assert await scalar(db, "SELECT count(*) FROM datamachine_processed_items WHERE job_id IS NULL") == 3
        if db.dialect == "sqlite":
            assert await scalar(db, "PRAGMA foreign_keys") == 1
    finally:
        await db.dispose()
