"""The processed-items ledger: identifiers, lookups, claims and clearing (engine.md §10, storage.md §3.4).

Pure database functions on a caller's session, shared by the processed-items tools and the fetch
engine. A row is either a ``processed`` record or an in-flight ``claimed`` row; only processed rows
count as processed, and clearing never deletes an *active* claim (§10.3), so a running job's
settlement is not lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, String, and_, bindparam, cast, delete, exists, func, literal, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from datamachine_mcp.engine.items import normalise_identifier
from datamachine_mcp.storage.dml import rowcount
from datamachine_mcp.storage.models import Job, ProcessedItem

MAX_IDENTIFIER = 255
CHUNK = 500
ACTIVE_JOB_STATUSES = ("pending", "processing", "waiting")
PROCESSED = "processed"
CLAIMED = "claimed"

P = ProcessedItem


def normalize_identifier(identifier: str) -> str:
    """Identifiers longer than 255 characters become ``sha256:<64 hex>`` of the full text (§2.7)."""
    return normalise_identifier(identifier) or identifier


def chunks(values: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def active_claim(now: datetime | ColumnElement[datetime]) -> ColumnElement[bool]:
    """engine.md §10.3: a claim held by a job that is not final and whose expiry has not passed."""
    job_alive = exists().where(Job.job_id == P.job_id, Job.status.in_(ACTIVE_JOB_STATUSES))
    return and_(
        P.status == CLAIMED,
        P.job_id.is_not(None),
        job_alive,
        or_(P.claim_expires_at.is_(None), P.claim_expires_at > now),
    )


# --- lookups (only processed rows count) -----------------------------------------------------------

# The one-row lookup (params ``fsid``, ``source``, ``item``), built once on table columns so that it
# runs on SQLAlchemy's Core path: it is the hot path of check-processed-item and of fetches.
_T = ProcessedItem.__table__.c
PROCESSED_AT = (
    select(_T.processed_timestamp)
    .where(
        _T.flow_step_id == bindparam("fsid"),
        _T.source_type == bindparam("source"),
        _T.item_identifier == bindparam("item"),
        _T.status == PROCESSED,
    )
    .limit(1)
)


async def processed_at(session: AsyncSession, flow_step_id: str, source_type: str, identifier: str) -> datetime | None:
    """When the item was processed for this step and source type, or None. ``identifier`` is normalised."""
    params = {"fsid": flow_step_id, "source": source_type, "item": normalize_identifier(identifier)}
    return (await session.execute(PROCESSED_AT, params)).scalar()


async def processed_times(
    session: AsyncSession, flow_step_id: str, source_type: str, identifiers: Iterable[str]
) -> dict[str, datetime]:
    """``{normalised identifier: processed_timestamp}`` for the processed ones, 500 per query.

    The status is checked here rather than in SQL: with a ``status`` term SQLite's planner (which has
    no statistics) prefers the ``(status, …)`` index and scans every processed row of the table; the
    unique ``(flow_step_id, source_type, item_identifier)`` index answers the IN-list directly.
    """
    keys = list(dict.fromkeys(normalize_identifier(i) for i in identifiers))
    found: dict[str, datetime] = {}
    for part in chunks(keys):
        rows = await session.execute(
            select(_T.item_identifier, _T.processed_timestamp, _T.status).where(
                _T.flow_step_id == flow_step_id, _T.source_type == source_type, _T.item_identifier.in_(part)
            )
        )
        found.update({ident: stamp for ident, stamp, status in rows.all() if status == PROCESSED})
    return found


async def active_claims(
    session: AsyncSession, flow_step_id: str, source_type: str, identifiers: Iterable[str], now: datetime
) -> dict[str, int | None]:
    """``{normalised identifier: job_id}`` of active claims (the fetch engine's 'actively-claimed').

    job_id is None when the claiming job was deleted (the claim then lapses at its expiry)."""
    keys = list(dict.fromkeys(normalize_identifier(i) for i in identifiers))
    found: dict[str, int | None] = {}
    for part in chunks(keys):
        rows = await session.execute(
            select(P.item_identifier, P.job_id).where(
                P.flow_step_id == flow_step_id,
                P.source_type == source_type,
                P.item_identifier.in_(part),
                active_claim(now),
            )
        )
        found.update({ident: job_id for ident, job_id in rows.all()})
    return found


def _count(*conds: ColumnElement[bool]) -> Any:
    return select(func.count()).select_from(ProcessedItem.__table__).where(*conds).scalar_subquery()


# All rows of the step (counted on its index alone) minus its claims (found through the status index;
# claims are few). A direct "status = 'processed'" count would make SQLite walk the status index
# over every processed row of the table, or look each of the step's rows up for its status.
PROCESSED_COUNT = select(
    _count(_T.flow_step_id == bindparam("fsid")),
    _count(_T.flow_step_id == bindparam("fsid"), _T.status == CLAIMED),
)


async def processed_count(session: AsyncSession, flow_step_id: str) -> int:
    """Processed rows of one flow step."""
    total, claimed = (await session.execute(PROCESSED_COUNT, {"fsid": flow_step_id})).one()
    return int(total) - int(claimed)


# --- marking ---------------------------------------------------------------------------------------


async def mark_processed(
    session: AsyncSession,
    *,
    flow_step_id: str,
    flow_id: int,
    source_type: str,
    identifier: str,
    job_id: int | None,
    now: datetime,
) -> tuple[ProcessedItem, bool]:
    """Upsert the item to ``processed`` (engine.md §10.4); overrides a claim. Returns (row, created).

    ``job_id`` replaces the stored one when given; otherwise the stored value is kept (NULL for a
    new row). The timestamp is refreshed on every call.
    """
    item = normalize_identifier(identifier)
    key = (P.flow_step_id == flow_step_id, P.source_type == source_type, P.item_identifier == item)
    existed = (await session.execute(select(P.id).where(*key))).scalar() is not None
    dialect = sqlite if session.get_bind().dialect.name == "sqlite" else postgresql
    values = {
        "flow_step_id": flow_step_id,
        "source_type": source_type,
        "item_identifier": item,
        "job_id": job_id,
        "processed_timestamp": now,
        "status": PROCESSED,
        "claim_expires_at": None,
        "flow_key": flow_id,
    }
    stmt = dialect.insert(P).values(**values)
    update = {"processed_timestamp": now, "status": PROCESSED, "claim_expires_at": None, "flow_key": flow_id}
    if job_id is not None:
        update["job_id"] = job_id
    stmt = stmt.on_conflict_do_update(index_elements=["flow_step_id", "source_type", "item_identifier"], set_=update)
    await session.execute(stmt)
    row = (await session.execute(select(P).where(*key).execution_options(populate_existing=True))).scalar_one()
    return row, not existed


# --- clearing (never active claims) ------------------------------------------------------------------


async def _clear(session: AsyncSession, scope: ColumnElement[bool], now: datetime) -> tuple[int, int]:
    keep = active_claim(now)
    skipped = (await session.execute(select(func.count()).select_from(P).where(scope, keep))).scalar() or 0
    result = await session.execute(delete(P).where(scope, ~keep).execution_options(synchronize_session=False))
    return rowcount(result), int(skipped)


async def clear_flows(session: AsyncSession, flow_ids: Sequence[int], now: datetime) -> tuple[int, int]:
    """Delete processed rows and inactive claims of these flows (by ``flow_key``, never LIKE).

    Returns (deleted, skipped active claims).
    """
    if not flow_ids:
        return 0, 0
    return await _clear(session, P.flow_key.in_(list(flow_ids)), now)


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "\\_%"


async def clear_pipeline_step(session: AsyncSession, pipeline_step_id: str, now: datetime) -> tuple[int, int]:
    """Clear the rows of every flow step of one pipeline step.

    The escaped prefix of storage.md §3.4 narrows the rows; the exact ``{pipeline_step_id}_{flow_key}``
    comparison keeps a longer step id that merely starts with this one out.
    """
    exact = P.flow_step_id == literal(f"{pipeline_step_id}_") + cast(P.flow_key, String)
    scope = and_(P.flow_step_id.like(_like_prefix(pipeline_step_id), escape="\\"), exact)
    return await _clear(session, scope, now)


async def clear_jobs(session: AsyncSession, job_ids: Sequence[int], now: datetime) -> tuple[int, int]:
    """Clear the rows written by these jobs (delete-jobs with cleanup, before the jobs go)."""
    if not job_ids:
        return 0, 0
    return await _clear(session, P.job_id.in_(list(job_ids)), now)
