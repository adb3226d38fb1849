"""Item claims held by jobs (docs/engine.md, Dedup and claims): taking them at a fetch commit,
pushing their expiry, moving them to batch children, and settling them when the job ends.

Every function runs inside the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, delete, literal, select, true, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.engine.dedup import (
    CLAIMED,
    ITEMS,
    PROCESSED,
    active_claim,
    list_rows,
    list_value,
    listed,
    seen_floor,
)
from datamachine_mcp.storage.dml import rowcount
from datamachine_mcp.storage.models import ProcessedItem

_ITEM_KEY = ("flow_step_id", "source_type", "item_identifier")


def active_claim_condition(now: datetime, *, other_than_job: int | None = None) -> Any:
    """SQL condition: the row is a claim held by a live job (an active claim), optionally not ``job``'s."""
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
    This job's older claims on the step that are not selected now are deleted.
    The new items of each round go in one multi-row ``INSERT … ON CONFLICT DO NOTHING``; only the few
    that hit an existing row are looked at one by one.
    """
    limit = max_items if max_items > 0 else len(candidates)
    expires = now + timedelta(seconds=claim_ttl)
    taken: dict[int, Candidate] = {}  # by position, so the result keeps source order
    kept_ids: set[str] = set()
    conflicts = 0
    pos = 0
    while len(taken) < limit and pos < len(candidates):
        batch: list[tuple[int, str]] = []
        while len(taken) + len(batch) < limit and pos < len(candidates):
            candidate = candidates[pos]
            if candidate.identifier is None:
                taken[pos] = candidate
            else:
                batch.append((pos, candidate.identifier))
            pos += 1
        if not batch:
            break
        inserted = await _insert_claims(
            session, [ident for _, ident in batch], job_id, flow_key, flow_step_id, source_type, now, expires
        )
        for at, ident in batch:
            if ident in inserted or await _take_existing(
                session,
                ident,
                job_id=job_id,
                flow_step_id=flow_step_id,
                source_type=source_type,
                now=now,
                expires=expires,
            ):
                taken[at] = candidates[at]
                kept_ids.add(ident)
            else:
                conflicts += 1
    dialect = session.get_bind().dialect.name
    await session.execute(
        LEFTOVERS[dialect], {"job_id": job_id, "fsid": flow_step_id, "kept": list_value(kept_ids, dialect)}
    )
    return [taken[at] for at in sorted(taken)], conflicts


def _leftovers(dialect: str) -> Any:
    """This job's claims on the step that are not among ``kept`` (from an earlier attempt)."""
    t = ITEMS.c
    return delete(ITEMS).where(
        t.job_id == bindparam("job_id"),
        t.flow_step_id == bindparam("fsid"),
        t.status == CLAIMED,
        ~listed(t.item_identifier, "kept", dialect),
    )


LEFTOVERS = {name: _leftovers(name) for name in ("sqlite", "postgresql")}


def _claims_insert(dialect: str) -> Any:
    """INSERT … SELECT one claim per entry of the list parameter ``items`` … ON CONFLICT DO NOTHING
    RETURNING the identifiers inserted: one statement with seven parameters for any number of items."""
    t = ITEMS
    c = t.c
    items = list_rows("items", dialect).subquery()
    rows = select(
        bindparam("fsid", type_=c.flow_step_id.type),
        bindparam("source", type_=c.source_type.type),
        items.c.value,
        bindparam("flow_key", type_=c.flow_key.type),
        bindparam("job_id", type_=c.job_id.type),
        literal(CLAIMED, type_=c.status.type),
        bindparam("expires", type_=c.claim_expires_at.type),
        bindparam("now", type_=c.processed_timestamp.type),
        bindparam("now", type_=c.last_seen_at.type),
    ).where(true())  # SQLite needs a WHERE before ON CONFLICT in INSERT … SELECT
    columns = [
        "flow_step_id",
        "source_type",
        "item_identifier",
        "flow_key",
        "job_id",
        "status",
        "claim_expires_at",
        "processed_timestamp",
        "last_seen_at",
    ]
    insert = pg_insert(t) if dialect == "postgresql" else sqlite_insert(t)
    # ON CONFLICT DO NOTHING: a concurrent claim of the same item (PostgreSQL) leaves its row alone
    # instead of raising a unique-key error that would abort the whole step commit.
    return (
        insert.from_select(columns, rows).on_conflict_do_nothing(index_elements=_ITEM_KEY).returning(c.item_identifier)
    )


CLAIMS_INSERT = {name: _claims_insert(name) for name in ("sqlite", "postgresql")}


async def _insert_claims(
    session: AsyncSession,
    idents: list[str],
    job_id: int,
    flow_key: int,
    flow_step_id: str,
    source_type: str,
    now: datetime,
    expires: datetime,
) -> set[str]:
    """Insert claims for the identifiers that have no row yet; returns those inserted."""
    dialect = session.get_bind().dialect.name
    params = {
        "items": list_value(dict.fromkeys(idents), dialect),
        "fsid": flow_step_id,
        "source": source_type,
        "flow_key": flow_key,
        "job_id": job_id,
        "expires": expires,
        "now": now,
    }
    return set((await session.execute(CLAIMS_INSERT[dialect], params)).scalars().all())


async def _take_existing(
    session: AsyncSession,
    ident: str,
    *,
    job_id: int,
    flow_step_id: str,
    source_type: str,
    now: datetime,
    expires: datetime,
) -> bool:
    """An item that already has a row: keep this job's own claim, or take over a free claim.

    A processed row, or a claim a live job holds, stays as it is (False).
    """
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
        return False
    if row.job_id == job_id and row.status == CLAIMED:
        await session.execute(update(ProcessedItem).where(ProcessedItem.id == row.id).values(claim_expires_at=expires))
        return True
    # Take the row over only if it is not processed and not actively claimed by another job.
    result = await session.execute(
        update(ProcessedItem)
        .where(
            ProcessedItem.id == row.id,
            ProcessedItem.status == CLAIMED,
            ~active_claim_condition(now, other_than_job=job_id),
        )
        .values(job_id=job_id, claim_expires_at=expires, processed_timestamp=now, last_seen_at=now)
        .execution_options(synchronize_session=False)
    )
    return rowcount(result) > 0


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
    """Re-claim the items of a failed job's packets for retry-job; returns conflicting identifiers.

    A retry is not a fetch: a new row takes the step's latest fetch time as its last_seen_at, an
    existing one keeps its own (docs/engine.md, Retention)."""
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
                    last_seen_at=await seen_floor(session, fsid, source, now),
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
