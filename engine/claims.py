"""Item claims held by jobs (engine.md §10): taking them at a fetch commit, pushing their expiry,
moving them to batch children, and settling them when the job ends.

Every function runs inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, delete, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.engine import status as st
from datamachine_mcp.engine.dedup import CLAIMED, PROCESSED, active_claim
from datamachine_mcp.storage.dml import rowcount
from datamachine_mcp.storage.models import ProcessedItem

_ITEM_KEY = ("flow_step_id", "source_type", "item_identifier")


def _insert(session: AsyncSession) -> Any:
    """The dialect's INSERT construct (both offer ``on_conflict_do_nothing``)."""
    name = session.get_bind().dialect.name
    return pg_insert(ProcessedItem) if name == "postgresql" else sqlite_insert(ProcessedItem)


def active_claim_condition(now: datetime, *, other_than_job: int | None = None) -> Any:
    """SQL condition: the row is a claim held by a live job (engine.md §10.3), optionally not ``job``'s."""
    cond = active_claim(now)
    return and_(cond, ProcessedItem.job_id != other_than_job) if other_than_job is not None else cond


@dataclass(frozen=True)
class Candidate:
    """A fetched item eligible for this job, in source order."""

    identifier: str | None
    payload: Any  # whatever the step needs to build its packet


async def claim(
    session: AsyncSession,
    *,
    job_id: int,
    flow_key: int,
    flow_step_id: str,
    source_type: str,
    candidates: Sequence[Candidate],
    max_items: int,
    now: datetime,
    claim_ttl: int,
) -> tuple[list[Candidate], int]:
    """Claim up to ``max_items`` candidates in order, backfilling lost ones from the reserves.

    Returns (claimed candidates, claim conflicts). Items without an identifier are taken unclaimed.
    This job's older claims on the step that are not selected now are deleted (engine.md §10.1 step 7).
    """
    limit = max_items if max_items > 0 else len(candidates)
    expires = now + timedelta(seconds=claim_ttl)
    taken: list[Candidate] = []
    kept_ids: set[str] = set()
    conflicts = 0
    for candidate in candidates:
        if len(taken) >= limit:
            break
        ident = candidate.identifier
        if ident is None:
            taken.append(candidate)
            continue
        values = {
            "flow_step_id": flow_step_id,
            "source_type": source_type,
            "item_identifier": ident,
            "flow_key": flow_key,
            "job_id": job_id,
            "status": CLAIMED,
            "claim_expires_at": expires,
            "processed_timestamp": now,
        }
        # INSERT … ON CONFLICT DO NOTHING: a concurrent claim of the same item (PostgreSQL) makes this a
        # no-op instead of a unique-key error that would abort the whole step commit.
        inserted = (
            await session.execute(
                _insert(session)
                .values(**values)
                .on_conflict_do_nothing(index_elements=_ITEM_KEY)
                .returning(ProcessedItem.id)
            )
        ).scalar()
        if inserted is not None:
            taken.append(candidate)
            kept_ids.add(ident)
            continue
        row = (
            await session.execute(
                select(ProcessedItem)
                .where(
                    ProcessedItem.flow_step_id == flow_step_id,
                    ProcessedItem.source_type == source_type,
                    ProcessedItem.item_identifier == ident,
                )
                .execution_options(populate_existing=True)
            )
        ).scalar_one_or_none()
        if row is None:  # the conflicting row was deleted meanwhile: the item is free next run
            conflicts += 1
            continue
        elif row.job_id != job_id or row.status != CLAIMED:
            # Take the row over only if it is not processed and not actively claimed by another job.
            result = await session.execute(
                update(ProcessedItem)
                .where(
                    ProcessedItem.id == row.id,
                    ProcessedItem.status == CLAIMED,
                    ~active_claim_condition(now, other_than_job=job_id),
                )
                .values(job_id=job_id, claim_expires_at=expires, processed_timestamp=now)
                .execution_options(synchronize_session=False)
            )
            if rowcount(result) == 0:
                conflicts += 1
                continue
        else:
            await session.execute(
                update(ProcessedItem).where(ProcessedItem.id == row.id).values(claim_expires_at=expires)
            )
        taken.append(candidate)
        kept_ids.add(ident)
    leftovers = delete(ProcessedItem).where(
        ProcessedItem.job_id == job_id,
        ProcessedItem.flow_step_id == flow_step_id,
        ProcessedItem.status == CLAIMED,
    )
    if kept_ids:
        leftovers = leftovers.where(ProcessedItem.item_identifier.not_in(kept_ids))
    await session.execute(leftovers)
    return taken, conflicts


async def push_expiry(session: AsyncSession, job_id: int, expires: datetime | None) -> None:
    """Keep a job's claims ahead of its real lifetime (heartbeat, retry requeue, parking)."""
    await session.execute(
        update(ProcessedItem)
        .where(ProcessedItem.job_id == job_id, ProcessedItem.status == CLAIMED)
        .values(claim_expires_at=expires)
    )


async def settle(session: AsyncSession, job_id: int, final_status: str, now: datetime) -> int:
    """Complete (success statuses) or release (failed/cancelled) the job's claims; returns the count."""
    held = and_(ProcessedItem.job_id == job_id, ProcessedItem.status == CLAIMED)
    if final_status in st.SUCCESS:
        result = await session.execute(
            update(ProcessedItem).where(held).values(status=PROCESSED, processed_timestamp=now, claim_expires_at=None)
        )
    else:
        result = await session.execute(delete(ProcessedItem).where(held))
    return rowcount(result)


async def transfer_many(
    session: AsyncSession, *, parent_id: int, children: Sequence[tuple[int, dict[str, Any]]], expires: datetime
) -> None:
    """``transfer`` for a whole fan-out in one executemany UPDATE."""
    params = []
    for child_id, packet in children:
        meta = packet.get("metadata") or {}
        ident, source, fsid = meta.get("item_identifier"), meta.get("source_type"), meta.get("flow_step_id")
        if ident and source and fsid:
            params.append({"b_child": child_id, "b_ident": ident, "b_source": source, "b_fsid": fsid})
    if not params:
        return
    table = cast(Table, ProcessedItem.__table__)  # typed as FromClause; a declarative model maps a Table
    t = table.c
    await session.execute(
        update(table)
        .where(
            t.job_id == parent_id,
            t.status == CLAIMED,
            t.flow_step_id == bindparam("b_fsid"),
            t.source_type == bindparam("b_source"),
            t.item_identifier == bindparam("b_ident"),
        )
        .values(job_id=bindparam("b_child"), claim_expires_at=expires),
        params,
    )


async def reclaim(
    session: AsyncSession,
    *,
    job_id: int,
    flow_key: int,
    packets: Sequence[dict[str, Any]],
    now: datetime,
    claim_ttl: int,
) -> list[str]:
    """Re-claim the items of a failed job's packets for retry-job; returns conflicting identifiers."""
    conflicts: list[str] = []
    expires = now + timedelta(seconds=claim_ttl)
    for packet in packets:
        meta = packet.get("metadata") or {}
        ident, source, fsid = meta.get("item_identifier"), meta.get("source_type"), meta.get("flow_step_id")
        if not ident or not source or not fsid:
            continue
        row = (
            await session.execute(
                select(ProcessedItem).where(
                    ProcessedItem.flow_step_id == fsid,
                    ProcessedItem.source_type == source,
                    ProcessedItem.item_identifier == ident,
                )
            )
        ).scalar_one_or_none()
        if row is None:
            session.add(
                ProcessedItem(
                    flow_step_id=fsid,
                    source_type=source,
                    item_identifier=ident,
                    flow_key=flow_key,
                    job_id=job_id,
                    status=CLAIMED,
                    claim_expires_at=expires,
                    processed_timestamp=now,
                )
            )
            continue
        active = (
            await session.execute(
                select(ProcessedItem.id).where(
                    ProcessedItem.id == row.id, active_claim_condition(now, other_than_job=job_id)
                )
            )
        ).scalar()
        if row.status == PROCESSED or active is not None:
            conflicts.append(ident)
            continue
        row.job_id = job_id
        row.claim_expires_at = expires
        row.processed_timestamp = now
    return conflicts
