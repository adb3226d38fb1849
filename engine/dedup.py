"""The processed-items ledger: identifiers, lookups, claims and clearing (docs/engine.md, Dedup and claims).

Pure database functions on a caller's session, shared by the processed-items tools and the fetch
engine. A row is either a ``processed`` record or an in-flight ``claimed`` row; only processed rows
count as processed, and clearing never deletes an *active* claim, so a running job's
settlement is not lost.
"""

from __future__ import annotations

import json
import typing
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    String,
    Table,
    and_,
    any_,
    bindparam,
    cast,
    delete,
    exists,
    func,
    literal,
    literal_column,
    or_,
    select,
    text,
    update,
)
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
# A fetch rewrites an item's last_seen_at only when it is older than this, so a flow that runs every
# few minutes does not write its whole feed each run; retention adds it to its window in return.
# last_seen_at is only ever a fetch's time (docs/engine.md, Retention): claims take their fetch's time,
# settling keeps it, and rows written without a fetch (mark-processed, retry-job) take seen_floor().
LAST_SEEN_REFRESH = timedelta(days=1)

P = ProcessedItem


def normalize_identifier(identifier: str) -> str:
    """Identifiers longer than 255 characters become ``sha256:<64 hex>`` of the full text, so they fit the column."""
    return normalise_identifier(identifier) or identifier


def chunks(values: Sequence[str], size: int = CHUNK) -> Iterator[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def active_claim(now: datetime | ColumnElement[datetime]) -> ColumnElement[bool]:
    """An active claim: held by a job that is not final and whose expiry has not passed."""
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
ITEMS = typing.cast(Table, ProcessedItem.__table__)  # typed as FromClause; a declarative model maps a Table
_T = ITEMS.c
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


@dataclass
class Ledger:
    """What the ledger holds for a fetch's candidates (normalised identifiers)."""

    processed: set[str] = field(default_factory=set)
    claimed_elsewhere: set[str] = field(default_factory=set)
    # ids of the rows (processed or claimed) whose last_seen_at is older than LAST_SEEN_REFRESH
    seen_stale: list[int] = field(default_factory=list)


# --- a list of identifiers as one parameter ---------------------------------------------------------
# A JSON array on SQLite (json_each), an array on PostgreSQL: the statement is the same for 1 or 1,000
# identifiers (cached once, no per-call SQL for a long IN list, no per-value parameter processing).


def list_value(values: Iterable[Any], dialect: str) -> Any:
    """The bound value of a ``listed`` parameter."""
    return list(values) if dialect == "postgresql" else json.dumps(list(values))


def list_rows(name: str, dialect: str, element: Any = String) -> Select[Any]:
    """``SELECT value`` for each entry of the list parameter ``name``."""
    if dialect == "postgresql":
        return select(func.unnest(bindparam(name, type_=postgresql.ARRAY(element))).label("value"))
    return select(literal_column("value")).select_from(func.json_each(bindparam(name, type_=String)))


def listed(column: ColumnElement[Any], name: str, dialect: str, element: Any = String) -> ColumnElement[bool]:
    """``column`` is one of the entries of the list parameter ``name``."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=postgresql.ARRAY(element)))
    return column.in_(list_rows(name, dialect, element).scalar_subquery())


def _ledger_rows(dialect: str) -> Any:
    """The ledger rows of a fetch's identifiers, answered by the unique ``(flow_step_id, source_type,
    item_identifier)`` index; two flags computed by the database, so no timestamp is parsed per row."""
    seen_stale = bindparam("stale_before", type_=_T.last_seen_at.type)
    now = bindparam("now", type_=_T.claim_expires_at.type)
    if dialect == "sqlite":
        # CROSS JOIN makes the list the outer loop: one index search per identifier.
        return text(
            "SELECT p.id, p.item_identifier, p.status, p.job_id, p.last_seen_at < :stale_before, "
            "p.claim_expires_at IS NULL OR p.claim_expires_at > :now "
            f"FROM json_each(:items) AS j CROSS JOIN {ProcessedItem.__tablename__} AS p "
            "WHERE p.flow_step_id = :fsid AND p.source_type = :source AND p.item_identifier = j.value"
        ).bindparams(seen_stale, now)
    return select(
        _T.id,
        _T.item_identifier,
        _T.status,
        _T.job_id,
        _T.last_seen_at < seen_stale,
        or_(_T.claim_expires_at.is_(None), _T.claim_expires_at > now),
    ).where(
        _T.flow_step_id == bindparam("fsid"),
        _T.source_type == bindparam("source"),
        listed(_T.item_identifier, "items", dialect),
    )


LEDGER_ROWS = {name: _ledger_rows(name) for name in ("sqlite", "postgresql")}
LIVE_JOBS = select(Job.__table__.c.job_id).where(
    Job.__table__.c.job_id.in_(bindparam("jobs", expanding=True)), Job.__table__.c.status.in_(ACTIVE_JOB_STATUSES)
)


async def ledger(
    session: AsyncSession,
    flow_step_id: str,
    source_type: str,
    identifiers: Sequence[str],
    *,
    job_id: int,
    now: datetime,
    also_seen: Sequence[str] = (),
) -> Ledger:
    """Classify a fetch's candidates against the ledger in one query, statuses sorted out here.

    ``also_seen`` are identifiers the source offered that the filters dropped: not candidates, but
    seen, so their rows' last_seen_at is refreshed too. A status term in SQL would let the planner walk
    a ``(status, …)`` index across every flow's processed rows instead; the job-liveness check of a
    claim runs only for the claims found.
    """
    out = Ledger()
    candidates = set(identifiers)
    keys = list(dict.fromkeys([*identifiers, *also_seen]))
    dialect = session.get_bind().dialect.name
    params = {
        "fsid": flow_step_id,
        "source": source_type,
        "items": list_value(keys, dialect),
        "stale_before": now - LAST_SEEN_REFRESH,
        "now": now,
    }
    claims: dict[str, int] = {}
    for row_id, ident, status, holder, seen_stale, unexpired in (
        await session.execute(LEDGER_ROWS[dialect], params)
    ).all():
        if seen_stale:
            out.seen_stale.append(row_id)
        if ident not in candidates:
            continue
        if status == PROCESSED:
            out.processed.add(ident)
        elif holder is not None and holder != job_id and unexpired:
            claims[ident] = holder
    if claims:
        live = {r[0] for r in (await session.execute(LIVE_JOBS, {"jobs": list(set(claims.values()))})).all()}
        out.claimed_elsewhere = {ident for ident, holder in claims.items() if holder in live}
    return out


# The step's latest fetch time (its newest last_seen_at), or now for a step with no rows yet: the
# last_seen_at of a row written without a fetch, so that writing it proves no other item absent.
SEEN_FLOOR = func.coalesce(
    select(func.max(_T.last_seen_at))
    .where(_T.flow_step_id == bindparam("fsid"), _T.source_type == bindparam("source"))
    .scalar_subquery(),
    bindparam("now", type_=_T.last_seen_at.type),
)


async def seen_floor(session: AsyncSession, flow_step_id: str, source_type: str, now: datetime) -> datetime:
    """The last_seen_at of an item recorded without a fetch (see ``SEEN_FLOOR``)."""
    params = {"fsid": flow_step_id, "source": source_type, "now": now}
    return (await session.execute(select(SEEN_FLOOR), params)).scalar_one()


TOUCH_SEEN = {
    name: update(ITEMS).where(listed(_T.id, "ids", name, BigInteger)).values(last_seen_at=bindparam("now"))
    for name in ("sqlite", "postgresql")
}


async def touch_seen(session: AsyncSession, row_ids: Sequence[int], now: datetime) -> None:
    """Record that a fetch saw these items in their source: one UPDATE by primary key."""
    dialect = session.get_bind().dialect.name
    await session.execute(TOUCH_SEEN[dialect], {"ids": list_value(row_ids, dialect), "now": now})


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
    """Upsert the item to ``processed``; overrides a claim. Returns (row, created).

    ``job_id`` replaces the stored one when given; otherwise the stored value is kept (NULL for a
    new row). The timestamp is refreshed on every call; last_seen_at is not (marking is not a fetch).
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
        "last_seen_at": await seen_floor(session, flow_step_id, source_type, now),
        "status": PROCESSED,
        "claim_expires_at": None,
        "flow_key": flow_id,
    }
    stmt = dialect.insert(P).values(**values)
    changes = {
        "processed_timestamp": now,
        "status": PROCESSED,
        "claim_expires_at": None,
        "flow_key": flow_id,
    }
    if job_id is not None:
        changes["job_id"] = job_id
    stmt = stmt.on_conflict_do_update(index_elements=["flow_step_id", "source_type", "item_identifier"], set_=changes)
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

    An escaped ``LIKE '{pipeline_step_id}_%'`` narrows the rows (it can use the index); the exact
    ``{pipeline_step_id}_{flow_key}`` comparison keeps a longer step id that merely starts with this one out.
    """
    exact = P.flow_step_id == literal(f"{pipeline_step_id}_") + cast(P.flow_key, String)
    scope = and_(P.flow_step_id.like(_like_prefix(pipeline_step_id), escape="\\"), exact)
    return await _clear(session, scope, now)


async def clear_jobs(session: AsyncSession, job_ids: Sequence[int], now: datetime) -> tuple[int, int]:
    """Clear the rows written by these jobs (delete-jobs with cleanup, before the jobs go)."""
    if not job_ids:
        return 0, 0
    return await _clear(session, P.job_id.in_(list(job_ids)), now)
