"""Taking one entry from a step's queue per run (docs/engine.md, Queues).

Queues live in the flow row and are consumed live. A consumed entry is backed up in the job's
``engine_data.queue_backups`` in the same lease-checked transaction, and a re-run of the step reuses
that backup, so retries and crashes never consume a second entry.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from datamachine_mcp.engine.steps import StepRun
from datamachine_mcp.storage.models import Flow
from datamachine_mcp.storage.timeutil import iso


async def take(run: StepRun, slot: str) -> tuple[dict[str, Any] | None, bool]:
    """Return (entry, empty): ``empty`` means a drain/loop queue had nothing, so the run has no work."""
    fsid = run.flow_step_id
    backup = (run.engine_data.get("queue_backups") or {}).get(fsid)
    if isinstance(backup, dict) and backup.get("slot") == slot:
        return backup.get("entry"), False
    if run.job.flow_key is None:  # direct workflow: a static one-entry queue inside the snapshot
        queue = (run.engine_data.get("flow_config") or {}).get(fsid, {}).get(slot) or []
        return (queue[0] if queue else None), False
    async with run.services.db.read() as session:
        flow = await session.get(Flow, run.job.flow_key)
        live = dict((flow.flow_config or {}).get(fsid) or {}) if flow is not None else {}
    mode = live.get("queue_mode") or "static"
    queue = list(live.get(slot) or [])
    if not queue:
        return None, mode in ("drain", "loop")
    if mode == "static" or run.dry_run:
        return queue[0], False
    async with run.lease_txn() as session:
        flow = (
            await session.execute(run.services.db.for_update(select(Flow).where(Flow.flow_id == run.job.flow_key)))
        ).scalar_one_or_none()
        if flow is None:
            return None, True
        config = {k: dict(v) for k, v in (flow.flow_config or {}).items()}
        entry_cfg = config.get(fsid, {})
        current = list(entry_cfg.get(slot) or [])
        if not current:
            return None, True
        item = current.pop(0)
        if mode == "loop":
            current.append(item)
        entry_cfg[slot] = current
        config[fsid] = entry_cfg
        flow.flow_config = config
        data = dict(run.job.engine_data or {})
        backups = dict(data.get("queue_backups") or {})
        backups[fsid] = {
            "slot": slot,
            "mode": mode,
            "entry": item,
            "original_index": 0,
            "consumed_at": iso(run.now()),
        }
        data["queue_backups"] = backups
        await run.save_engine_data(data, session)
    return item, False
