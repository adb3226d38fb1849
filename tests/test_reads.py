"""Light reads (``Database.reads``): prebuilt Core SELECTs without an ORM session, decoded like a session's."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import bindparam, func, select, update

from datamachine_mcp.abilities.agent_detail import COUNTS
from datamachine_mcp.storage.models import Agent, Job
from tests.conftest import OWNER, call, connect
from tests.jobs_support import echo_step, make_flow

pytestmark = pytest.mark.anyio

BY_SLUG = select(Agent.__table__).where(Agent.agent_slug == bindparam("slug"))


@pytest.mark.backends
async def test_rows_are_decoded_as_a_session_decodes_them(runtime):
    async with connect(runtime) as client:
        await call(client, "create-agent", {"agent_slug": "reader", "agent_config": {"description": "d", "n": [1]}})
        flow = await make_flow(client, [echo_step()])
        await call(client, "run-flow", {"flow_id": flow["flow_id"], "wait_seconds": 0})
    async with runtime.db.read() as session:
        expected = (await session.execute(BY_SLUG, {"slug": "reader"})).one()
        counts = (await session.execute(COUNTS, {"aid": expected.agent_id})).one()
    async with runtime.db.reads() as reads:
        row = (await reads.execute(BY_SLUG, {"slug": "reader"})).one()
        light_counts = (await reads.execute(COUNTS, {"aid": row.agent_id})).one()
        assert (await reads.execute(BY_SLUG, {"slug": "nobody"})).one_or_none() is None
    assert tuple(row) == tuple(expected)
    assert row.agent_config == {"description": "d", "n": [1]}
    assert row.created_at.tzinfo is not None and row.created_at == expected.created_at
    # the IN list written into the statement (active statuses) is bound on every call
    assert tuple(light_counts) == tuple(counts)


async def test_a_light_read_is_one_snapshot_and_changes_nothing(runtime):
    """SQLite: the statements of one read see one state, even while another connection commits."""
    async with connect(runtime, OWNER) as client:
        flow = await make_flow(client, [echo_step()])
        await call(client, "run-flow", {"flow_id": flow["flow_id"], "wait_seconds": 0})
    jobs = select(func.count()).select_from(Job).where(Job.status == bindparam("status"))
    async with runtime.db.reads() as reads:
        before = (await reads.execute(jobs, {"status": "pending"})).one()[0]
        async with runtime.db.write() as session:
            await session.execute(update(Job).values(status="cancelled"))
        assert (await reads.execute(jobs, {"status": "pending"})).one()[0] == before == 1
        conn = runtime.db.light_connections or None
        assert conn is None  # the connection is this read's until it ends
    async with runtime.db.reads() as reads:
        assert (await reads.execute(jobs, {"status": "pending"})).one()[0] == 0
    (idle,) = runtime.db.light_connections  # handed back for the next read
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        idle.execute("DELETE FROM datamachine_jobs")


async def test_a_list_bound_per_call_is_refused(runtime):
    per_call = select(Agent.agent_id).where(Agent.agent_slug.in_(bindparam("slugs", expanding=True)))
    async with runtime.db.reads() as reads:
        with pytest.raises(ValueError, match="IN lists"):
            await reads.execute(per_call, {"slugs": ["a", "b"]})
