"""The maintenance loop's pass: recovery (``engine.recovery``), then housekeeping."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update

from datamachine_mcp.engine import claims as claim_ops
from datamachine_mcp.engine import schedule as sched
from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.recovery import recover
from datamachine_mcp.engine.runtime import EngineServices
from datamachine_mcp.storage.dml import rowcount
from datamachine_mcp.storage.logs import write_log
from datamachine_mcp.storage.models import Flow, Job, ProcessedItem
from datamachine_mcp.storage.settings_schema import Snapshot
from datamachine_mcp.storage.timeutil import iso, utcnow

log = logging.getLogger("datamachine.maintenance")


CLAIM_SWEEP = 5000


async def housekeeping(services: EngineServices, snap: Snapshot, now: datetime) -> dict[str, int]:
    """Maintenance steps 4-6: delete inactive claims, re-derive lost next runs, clear stale affinity."""
    counts = {"inactive_claims": 0, "affinity_cleared": 0, "next_runs_restored": 0}
    async with services.db.write() as session:
        inactive = (
            select(ProcessedItem.id)
            .where(ProcessedItem.status == claim_ops.CLAIMED, ~claim_ops.active_claim_condition(now))
            .limit(CLAIM_SWEEP)
        )  # bounded per pass (one IN list); the next pass takes the rest
        ids = [r[0] for r in (await session.execute(services.db.for_update(inactive, skip_locked=True))).all()]
        if ids:
            await session.execute(delete(ProcessedItem).where(ProcessedItem.id.in_(ids)))
        counts["inactive_claims"] = len(ids)
        stale = now - timedelta(seconds=snap.int("lease_ttl_seconds"))
        result = await session.execute(
            update(Job)
            .where(Job.status == st.PENDING, Job.affinity.is_not(None), Job.run_at < stale)
            .values(affinity=None)
            .execution_options(synchronize_session=False)
        )
        counts["affinity_cleared"] = rowcount(result)
        # Interval and cron flows always have a next run while enabled; one_time's NULL means "fired".
        recurring = Flow.scheduling_config["interval"].as_string().not_in(("manual", "one_time"))
        rows = (await session.execute(select(Flow).where(Flow.next_run_at.is_(None), recurring).limit(500))).scalars()
        for flow in list(rows):
            upcoming = sched.upcoming(flow.scheduling_config or {}, flow_id=flow.flow_id, now=now)
            if upcoming is None:
                continue
            flow.next_run_at = upcoming
            flow.scheduling_config = sched.with_next_run(dict(flow.scheduling_config or {}), upcoming)
            counts["next_runs_restored"] += 1
            await write_log(
                session,
                "warning",
                f"Flow {flow.flow_id} had no next run; restored to {iso(upcoming)}",
                {"flow_id": flow.flow_id, "pipeline_id": flow.pipeline_id},
                agent_id=flow.agent_id,
            )
    return counts


async def tick(services: EngineServices) -> dict[str, Any]:
    """One maintenance pass over everything (the loop runs it every maintenance_interval_seconds)."""
    now = utcnow()
    snap = await services.snapshot()
    report = await recover(services, limit=1000, now=now)
    report.update(await housekeeping(services, snap, now))
    return report
