"""The children of a fan-out: one pending ``batch`` job per packet, each with the parent's engine data
(minus its control and observability keys) plus what its packet carries (docs/engine.md, Fan-out and parent completion)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.plan import OBSERVABILITY_KEYS, control_keys, reserved_keys
from datamachine_mcp.engine.store import JobRow
from datamachine_mcp.storage.timeutil import iso


def child_rows(parent: JobRow, packets: list[dict[str, Any]], next_step: str, now: datetime) -> list[tuple[Any, ...]]:
    """The rows to insert, in the order ``StoreTx.insert_children`` takes their columns."""
    return [
        (
            parent.user_id,
            parent.agent_id,
            parent.pipeline_id,
            parent.flow_id,
            parent.pipeline_key,
            parent.flow_key,
            parent.source,
            (str((packet.get("data") or {}).get("title") or "") or "Untitled")[:255],
            parent.job_id,
            st.PENDING,
            "batch",
            next_step,
            [packet],
            0,
            parent.max_attempts,
            now,
            now,
            now,
            f"batch:{parent.job_id}:{index}",
            parent.affinity,
            parent.handler_slug,
            {},
        )
        for index, packet in enumerate(packets)
    ]


def child_engine_data(
    parent: JobRow, data: dict[str, Any], children: Iterable[tuple[int, dict[str, Any]]], now: datetime
) -> list[tuple[int, dict[str, Any]]]:
    """Each child's engine data: the parent's shared keys, its packet's ``_engine_data`` (no reserved key)
    and item identity, and its own ``job`` record."""
    hidden = control_keys()
    base = {k: v for k, v in data.items() if k not in hidden and k not in OBSERVABILITY_KEYS}
    reserved = reserved_keys()
    out = []
    for child_id, packet in children:
        meta = packet.get("metadata") or {}
        one = dict(base)
        extra = meta.get("_engine_data")
        if isinstance(extra, dict):
            one.update({k: v for k, v in extra.items() if k not in reserved})
        for key in ("item_identifier", "source_type", "source_url"):
            if meta.get(key) is not None:
                one[key] = meta[key]
        job_meta = dict(one.get("job") or {})
        job_meta.update(job_id=child_id, parent_job_id=parent.job_id, created_at=iso(now), trigger="batch")
        one["job"] = job_meta
        out.append((child_id, one))
    return out
