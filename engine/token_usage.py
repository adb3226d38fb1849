"""AI token usage of a job: its own steps' (``engine_data.token_usage``) and, for a batch parent, its
children's summed in the database (children record their own as they run)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.storage.models import Job

TOKEN_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")

_CHILDREN = select(*(func.coalesce(func.sum(Job.engine_data[("token_usage", k)].as_integer()), 0) for k in TOKEN_KEYS))


def own_usage(engine_data: dict[str, Any] | None) -> dict[str, int]:
    usage = (engine_data or {}).get("token_usage")
    usage = usage if isinstance(usage, dict) else {}
    return {k: int(usage.get(k) or 0) for k in TOKEN_KEYS}


async def with_children(session: AsyncSession, job: Job) -> dict[str, int]:
    """The job's own usage plus its children's (one aggregate query)."""
    own = own_usage(job.engine_data)
    children = (await session.execute(_CHILDREN.where(Job.parent_job_id == job.job_id))).one()
    return {k: own[k] + int(n or 0) for k, n in zip(TOKEN_KEYS, children, strict=True)}
