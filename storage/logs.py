"""The single function that writes log rows (docs/storage.md, datamachine_logs; Log context).

It promotes integer ``job_id``/``flow_id``/``pipeline_id`` context values to their indexed
columns, truncates long messages, and drops entries below the ``log_level`` threshold (audit
rows are never dropped).
"""

from __future__ import annotations

from collections.abc import Hashable
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.storage.models import LOG_LEVELS, LogEntry
from datamachine_mcp.storage.timeutil import utcnow

MAX_MESSAGE = 4000
LEVEL_RANK = {level: rank for rank, level in enumerate(LOG_LEVELS)}


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def level_allows(level: str, threshold: str) -> bool:
    return LEVEL_RANK[level] >= LEVEL_RANK.get(threshold, 1)


def log_values(
    level: str,
    message: str,
    context: dict[str, Any] | None = None,
    *,
    agent_id: int | None = None,
    user_id: int | None = None,
    created_at: datetime | None = None,
) -> dict[str, Any]:
    """The column values of one log row (for writers that insert rows without the ORM)."""
    if level not in LEVEL_RANK:
        raise ValueError(f"unknown log level {level!r}")
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    ctx = context or None
    return {
        "level": level,
        "message": message,
        "context": ctx,
        "agent_id": agent_id,
        "user_id": user_id,
        "created_at": created_at or utcnow(),
        "job_id": _int_or_none((ctx or {}).get("job_id")),
        "flow_id": _int_or_none((ctx or {}).get("flow_id")),
        "pipeline_id": _int_or_none((ctx or {}).get("pipeline_id")),
    }


def build_log_row(
    level: str,
    message: str,
    context: dict[str, Any] | None = None,
    *,
    agent_id: int | None = None,
    user_id: int | None = None,
) -> LogEntry:
    return LogEntry(**log_values(level, message, context, agent_id=agent_id, user_id=user_id))


async def write_log(
    session: AsyncSession,
    level: str,
    message: str,
    context: dict[str, Any] | None = None,
    *,
    agent_id: int | None = None,
    user_id: int | None = None,
    threshold: str = "debug",
    audit: bool = False,
) -> LogEntry | None:
    """Add one log row to ``session``; returns None when the level is below ``threshold``."""
    if not audit and not level_allows(level, threshold):
        return None
    row = build_log_row(level, message, context, agent_id=agent_id, user_id=user_id)
    session.add(row)
    return row


class LogThrottle:
    """At most one row per key every ``every`` seconds, for events a caller can repeat at will (refused
    webhooks, rate-limited requests): ``due`` counts the event and says how many to report now."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._last: dict[Hashable, float] = {}
        self._unlogged: dict[Hashable, int] = {}

    def due(self, key: Hashable, now: float) -> int | None:
        """The events to report in a row now (this one included), or None while the key's period runs."""
        self._unlogged[key] = self._unlogged.get(key, 0) + 1
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            return None
        self._last[key] = now
        return self._unlogged.pop(key)
