"""Deleting expired chat sessions (docs/engine.md, Retention).

Sessions expire on a sliding window (``expires_at = updated_at + chat_session_ttl_hours``); this
removes those whose ``expires_at`` has passed, 1,000 per transaction so that no transaction holds the
write lock for long. The maintenance loop schedules it; it can also be called on demand.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, select

from datamachine_mcp.storage.db import Database
from datamachine_mcp.storage.models import ChatSession
from datamachine_mcp.storage.timeutil import utcnow

BATCH = 1000


async def delete_expired_sessions(db: Database, *, now: datetime | None = None, batch: int = BATCH) -> int:
    """Delete sessions with ``expires_at < now`` (NULL never expires). Returns how many were deleted."""
    cutoff = now or utcnow()
    total = 0
    while True:
        async with db.write() as session:
            ids = list(
                (
                    await session.execute(
                        select(ChatSession.session_id)
                        .where(ChatSession.expires_at < cutoff)
                        .order_by(ChatSession.expires_at, ChatSession.session_id)
                        .limit(batch)
                    )
                ).scalars()
            )
            if ids:
                await session.execute(
                    delete(ChatSession)
                    .where(ChatSession.session_id.in_(ids))
                    .execution_options(synchronize_session=False)
                )
        total += len(ids)
        if len(ids) < batch:
            return total
