"""Dedup cost on a 1,000,000-row ledger, each part against raw driver queries on the same data (goal ≤ 3×
for the fetch check and the claim; the whole-tool-call figure of part 1 is shown for information).

    python bench/dedup.py [--rows 1000000] [--part all|check|fetch|claim] [--pg URL]

The schema comes from the project's own code (``storage.db.Database`` + ``storage.migrate``) with one
agent, pipeline, flow and some processing jobs; ``--rows`` processed items are bulk-loaded with the
plain driver, without gathering statistics (what a long-lived database looks like to the planner).

1. **check**: p50 of ``check-processed-item`` through ``abilities.runner.invoke`` as the local owner
   vs one indexed ``SELECT`` on a plain ``sqlite3`` connection (SQLite only).
2. **fetch**: the fetch step's classification of 1,000 candidates (half of them processed) against
   the ledger (``engine.steps.fetch.classify``, the lookups it makes and its ``last_seen_at`` touch)
   vs one raw ``IN`` query on the unique ``(flow_step_id, source_type, item_identifier)`` index.
   *first* sees the candidates for the first time (the processed ones get their ``last_seen_at``
   written); *again* classifies the same candidates once more (the steady state of a scheduled flow).
3. **claim**: claiming 500 new items at a fetch commit (``engine.claims.claim`` in a write
   transaction) vs one raw multi-row ``INSERT … ON CONFLICT DO NOTHING`` in a transaction.

SQLite always; PostgreSQL as well with ``--pg URL`` (default: ``DATAMACHINE_TEST_PG_URL``), a database
the bench may wipe.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from datamachine_mcp.abilities.access import Principal  # noqa: E402
from datamachine_mcp.abilities.registry import load_all  # noqa: E402
from datamachine_mcp.abilities.runner import invoke  # noqa: E402
from datamachine_mcp.engine import claims, dedup  # noqa: E402
from datamachine_mcp.engine.items import Item  # noqa: E402
from datamachine_mcp.engine.steps.fetch import classify  # noqa: E402
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime  # noqa: E402
from datamachine_mcp.storage.db import Database  # noqa: E402
from datamachine_mcp.storage.migrate import migrate  # noqa: E402
from datamachine_mcp.storage.models import Agent, AgentAccess, Flow, Job, Pipeline, ProcessedItem  # noqa: E402
from datamachine_mcp.storage.timeutil import utcnow  # noqa: E402

OWNER = Principal(user_id=1, is_admin=True, transport="stdio")
SOURCE = "rss"
TABLE = "datamachine_processed_items"
CANDIDATES = 1000
CLAIMS = 500
REPS = 15
LOADED_AT = "2026-01-01 00:00:00.000000"
HAS_SEEN = "last_seen_at" in ProcessedItem.__table__.c
RAW_SQL = (
    f"SELECT processed_timestamp FROM {TABLE} "
    "WHERE flow_step_id = ? AND source_type = ? AND item_identifier = ? AND status = 'processed' LIMIT 1"
)
COLUMNS = "flow_step_id, source_type, item_identifier, job_id, processed_timestamp, status, claim_expires_at, flow_key"


def item(i: int) -> str:
    return f"https://news.example.com/2026/articles/{i:07d}-{(i * 2654435761) % 4294967296:08x}"


def new_item(tag: str, i: int) -> str:
    return f"https://news.example.com/new/{tag}/{i:05d}-{uuid.uuid4().hex[:12]}"


async def create_database(db: Database, jobs: int) -> tuple[str, int, list[int]]:
    """Schema by migrations; one agent, pipeline, flow and ``jobs`` processing jobs through the ORM."""
    await migrate(db)
    now = utcnow()
    async with db.write() as s:
        agent = Agent(
            agent_slug="bench",
            agent_name="bench",
            owner_id=1,
            agent_config={},
            status="active",
            created_at=now,
            updated_at=now,
        )
        s.add(agent)
        await s.flush()
        s.add(AgentAccess(agent_id=agent.agent_id, user_id=1, role="admin", granted_at=now))
        pipeline = Pipeline(
            user_id=1,
            agent_id=agent.agent_id,
            pipeline_name="bench",
            pipeline_config={},
            created_at=now,
            updated_at=now,
        )
        s.add(pipeline)
        await s.flush()
        psid = f"{pipeline.pipeline_id}_{uuid.uuid4()}"
        pipeline.pipeline_config = {
            psid: {"pipeline_step_id": psid, "step_type": "fetch", "execution_order": 0, "label": "Fetch"}
        }
        flow = Flow(
            pipeline_id=pipeline.pipeline_id,
            user_id=1,
            agent_id=agent.agent_id,
            flow_name="bench",
            flow_config={},
            scheduling_config={"interval": "manual"},
            created_at=now,
            updated_at=now,
        )
        s.add(flow)
        await s.flush()
        fsid = f"{psid}_{flow.flow_id}"
        flow.flow_config = {
            fsid: {
                "flow_step_id": fsid,
                "pipeline_step_id": psid,
                "step_type": "fetch",
                "execution_order": 0,
                "pipeline_id": pipeline.pipeline_id,
                "flow_id": flow.flow_id,
                "handler_slugs": ["rss"],
                "handler_configs": {"rss": {"feed_url": "https://news.example.com/feed"}},
            }
        }
        rows = [
            Job(
                user_id=1,
                agent_id=agent.agent_id,
                pipeline_id=str(pipeline.pipeline_id),
                flow_id=str(flow.flow_id),
                pipeline_key=pipeline.pipeline_id,
                flow_key=flow.flow_id,
                status="processing",
                engine_data={},
                created_at=now,
                run_at=now,
                updated_at=now,
            )
            for _ in range(jobs)
        ]
        s.add_all(rows)
        await s.flush()
        return fsid, flow.flow_id, [j.job_id for j in rows]


def load_sqlite(path: Path, fsid: str, flow_id: int, rows: int, batch: int = 100_000) -> None:
    """Setup only: plain sqlite3 executemany in large batches, in key order.

    The secondary indexes are dropped for the load and recreated from their own DDL afterwards
    (building an index once is much faster than maintaining it row by row); the unique index the
    lookups use is part of the table and stays. No ANALYZE.
    """
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    conn.execute("PRAGMA journal_mode=OFF")
    indexes = conn.execute(
        f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = '{TABLE}' AND sql IS NOT NULL"
    ).fetchall()
    for name, _ in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    columns = [r[1] for r in conn.execute(f"PRAGMA table_info({TABLE})")]
    extra = ", last_seen_at" if "last_seen_at" in columns else ""
    sql = f"INSERT INTO {TABLE} ({COLUMNS}{extra}) VALUES (?, ?, ?, NULL, ?, 'processed', NULL, ?{', ?' if extra else ''})"
    seen = (LOADED_AT,) if extra else ()
    for start in range(0, rows, batch):
        conn.executemany(
            sql, ((fsid, SOURCE, item(i), LOADED_AT, flow_id, *seen) for i in range(start, min(rows, start + batch)))
        )
        conn.commit()
    for _, ddl in indexes:
        conn.execute(ddl)
    conn.commit()
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()


async def load_postgres(url: str, fsid: str, flow_id: int, rows: int) -> None:
    """Setup only: COPY with the secondary indexes dropped and recreated, then ANALYZE (autovacuum's
    steady state: PostgreSQL gathers statistics by itself)."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        indexes = await conn.fetch(
            "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.tablename = $1 AND NOT EXISTS "
            "(SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)",
            TABLE,
        )
        for row in indexes:
            await conn.execute(f'DROP INDEX "{row["indexname"]}"')
        columns = {
            r["column_name"]
            for r in await conn.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = $1", TABLE)
        }
        names = [c.strip() for c in COLUMNS.split(",")] + (["last_seen_at"] if "last_seen_at" in columns else [])
        from datetime import UTC, datetime

        stamp = datetime(2026, 1, 1, tzinfo=UTC)
        batch = 100_000
        for start in range(0, rows, batch):
            records = []
            for i in range(start, min(rows, start + batch)):
                rec = [fsid, SOURCE, item(i), None, stamp, "processed", None, flow_id]
                if len(names) > 8:
                    rec.append(stamp)
                records.append(tuple(rec))
            await conn.copy_records_to_table(TABLE, records=records, columns=names)
        for row in indexes:
            await conn.execute(row["indexdef"])
        await conn.execute(f"ANALYZE {TABLE}")
    finally:
        await conn.close()


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(samples: list[float]) -> str:
    return f"p50 {pct(samples, 0.5) * 1e3:8.2f} ms   p95 {pct(samples, 0.95) * 1e3:8.2f} ms   ({len(samples)} runs)"


def line(label: str, samples: list[float]) -> str:
    return f"{label:<52} {ms(samples)}"


def ratio(label: str, ours: list[float], raw: list[float], *, goal: bool = True) -> str:
    r = pct(ours, 0.5) / pct(raw, 0.5)
    if not goal:
        return f"ratio {label}: {r:.1f}  (no goal: a whole tool call against one SELECT)"
    return f"ratio {label}: {r:.1f}  (goal <= 3){'' if r <= 3 else '  ** over goal **'}"


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await fn()
    return time.perf_counter() - start


# --- 2. fetch-step candidate check -----------------------------------------------------------------


def candidate_sets(rows: int, reps: int) -> list[list[str]]:
    rng = random.Random(11)
    out = []
    for r in range(reps + 1):  # one warm-up set
        idents = [item(i) for i in rng.sample(range(rows), CANDIDATES // 2)]
        idents += [new_item(f"c{r}", i) for i in range(CANDIDATES - len(idents))]
        rng.shuffle(idents)
        out.append(idents)
    return out


async def fetch_ours(runtime: Any, fsid: str, job_id: int, flow_id: int, sets: list[list[str]]) -> dict[str, list]:
    run = SimpleNamespace(
        dedupes=True,
        dry_run=False,
        now=utcnow,
        services=runtime.engine,
        flow_step_id=fsid,
        job=SimpleNamespace(job_id=job_id, flow_key=flow_id),
    )
    out: dict[str, list[float]] = {"first": [], "again": []}
    for n, idents in enumerate(sets):
        items = [Item(identifier=i, title="", body="", content_string="") for i in idents]
        for label in ("first", "again"):
            start = time.perf_counter()
            eligible, stages = await classify(cast(Any, run), SOURCE, items)  # the attributes classify reads
            took = time.perf_counter() - start
            assert stages["processed_skipped"] == CANDIDATES // 2 and len(eligible) == CANDIDATES // 2, stages
            if n:  # the first set warms up
                out[label].append(took)
    return out


def fetch_raw_sqlite(path: Path, fsid: str, sets: list[list[str]]) -> tuple[list[float], list[float], str]:
    """(the IN query alone, the IN query + an UPDATE of the found rows' last_seen_at in a transaction, plan)."""
    conn = sqlite3.connect(path, isolation_level=None)
    where = f"FROM {TABLE} WHERE flow_step_id = ? AND source_type = ? AND item_identifier IN ({', '.join('?' * CANDIDATES)})"
    sql = f"SELECT item_identifier {where}"
    plan = " / ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, (fsid, SOURCE, *sets[0])))
    query, touch = [], []
    for n, idents in enumerate(sets):
        start = time.perf_counter()
        found = conn.execute(sql, (fsid, SOURCE, *idents)).fetchall()
        if n:
            query.append(time.perf_counter() - start)
        assert len(found) == CANDIDATES // 2
        if not HAS_SEEN:
            continue
        stamp = utcnow().strftime("%Y-%m-%d %H:%M:%S.%f")
        start = time.perf_counter()
        ids = [r[0] for r in conn.execute(f"SELECT id {where}", (fsid, SOURCE, *idents)).fetchall()]
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(f"UPDATE {TABLE} SET last_seen_at = ? WHERE id IN ({', '.join('?' * len(ids))})", (stamp, *ids))
        conn.execute("COMMIT")
        if n:
            touch.append(time.perf_counter() - start)
    conn.close()
    return query, touch, plan


async def fetch_raw_pg(url: str, fsid: str, sets: list[list[str]]) -> tuple[list[float], list[float]]:
    import asyncpg

    conn = await asyncpg.connect(url)
    where = f"FROM {TABLE} WHERE flow_step_id = $1 AND source_type = $2 AND item_identifier = ANY($3::varchar[])"
    query, touch = [], []
    try:
        for n, idents in enumerate(sets):
            start = time.perf_counter()
            found = await conn.fetch(f"SELECT item_identifier {where}", fsid, SOURCE, idents)
            if n:
                query.append(time.perf_counter() - start)
            assert len(found) == CANDIDATES // 2
            if not HAS_SEEN:
                continue
            start = time.perf_counter()
            ids = [r[0] for r in await conn.fetch(f"SELECT id {where}", fsid, SOURCE, idents)]
            async with conn.transaction():
                await conn.execute(f"UPDATE {TABLE} SET last_seen_at = now() WHERE id = ANY($1::bigint[])", ids)
            if n:
                touch.append(time.perf_counter() - start)
    finally:
        await conn.close()
    return query, touch


# --- 3. claiming 500 new items -------------------------------------------------------------------


async def claim_ours(runtime: Any, fsid: str, flow_id: int, job_ids: list[int]) -> list[float]:
    samples = []
    for n, job_id in enumerate(job_ids):
        cands = [claims.Candidate(new_item(f"o{n}", i), None) for i in range(CLAIMS)]

        async def one(job_id: int = job_id, cands: list[claims.Candidate] = cands) -> None:
            async with runtime.db.write() as session:
                taken, conflicts = await claims.claim(
                    session,
                    job_id=job_id,
                    flow_key=flow_id,
                    flow_step_id=fsid,
                    source_type=SOURCE,
                    candidates=cands,
                    max_items=CLAIMS,
                    now=utcnow(),
                    claim_ttl=3600,
                )
                assert len(taken) == CLAIMS and conflicts == 0

        took = await timed(one)
        if n:
            samples.append(took)
    return samples


def claim_rows(tag: str, fsid: str, flow_id: int, job_id: int, seen: bool) -> list[tuple[Any, ...]]:
    now = utcnow()
    extra = (now,) if seen else ()
    return [(fsid, SOURCE, new_item(tag, i), job_id, now, "claimed", now, flow_id, *extra) for i in range(CLAIMS)]


def claim_raw_sqlite(path: Path, fsid: str, flow_id: int, job_ids: list[int]) -> list[float]:
    conn = sqlite3.connect(path, isolation_level=None)
    seen = "last_seen_at" in [r[1] for r in conn.execute(f"PRAGMA table_info({TABLE})")]
    width = 9 if seen else 8
    one = "(" + ", ".join("?" * width) + ")"
    columns = COLUMNS + (", last_seen_at" if seen else "")
    sql = f"INSERT INTO {TABLE} ({columns}) VALUES {', '.join([one] * CLAIMS)} ON CONFLICT DO NOTHING"
    samples = []
    for n, job_id in enumerate(job_ids):
        params = [v for row in claim_rows(f"r{n}", fsid, flow_id, job_id, seen) for v in row]
        params = [v.strftime("%Y-%m-%d %H:%M:%S.%f") if hasattr(v, "strftime") else v for v in params]
        start = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(sql, params)
        conn.execute("COMMIT")
        if n:
            samples.append(time.perf_counter() - start)
    conn.close()
    return samples


async def claim_raw_pg(url: str, fsid: str, flow_id: int, job_ids: list[int]) -> list[float]:
    import asyncpg

    conn = await asyncpg.connect(url)
    seen = bool(
        await conn.fetchval(
            "SELECT 1 FROM information_schema.columns WHERE table_name = $1 AND column_name = 'last_seen_at'", TABLE
        )
    )
    width = 9 if seen else 8
    values = ", ".join("(" + ", ".join(f"${r * width + c + 1}" for c in range(width)) + ")" for r in range(CLAIMS))
    columns = COLUMNS + (", last_seen_at" if seen else "")
    sql = f"INSERT INTO {TABLE} ({columns}) VALUES {values} ON CONFLICT DO NOTHING"
    samples = []
    try:
        for n, job_id in enumerate(job_ids):
            params = [v for row in claim_rows(f"r{n}", fsid, flow_id, job_id, seen) for v in row]
            start = time.perf_counter()
            async with conn.transaction():
                await conn.execute(sql, *params)
            if n:
                samples.append(time.perf_counter() - start)
    finally:
        await conn.close()
    return samples


# --- 1. check-processed-item (SQLite) --------------------------------------------------------------


async def check_part(runtime: Any, path: Path, fsid: str, rows: int, calls: int) -> None:
    rng = random.Random(7)
    existing = [item(rng.randrange(rows)) for _ in range(calls // 2)]
    missing = [f"https://news.example.com/missing/{rng.randrange(10**9)}" for _ in range(calls - len(existing))]
    keys = existing + missing
    rng.shuffle(keys)
    expected = set(existing)
    ability = load_all()["check-processed-item"]
    for key in keys[:200]:  # warm up
        await invoke(runtime, ability, {"flow_step_id": fsid, "source_type": SOURCE, "item_identifier": key}, OWNER)
    handler = []
    for key in keys:
        args = {"flow_step_id": fsid, "source_type": SOURCE, "item_identifier": key}
        start = time.perf_counter()
        out = await invoke(runtime, ability, args, OWNER)
        handler.append(time.perf_counter() - start)
        assert out.ok and out.output is not None and out.output["is_processed"] == (key in expected), out
    engine = []
    async with runtime.db.read() as session:
        for key in keys:
            start = time.perf_counter()
            await dedup.processed_at(session, fsid, SOURCE, key)
            engine.append(time.perf_counter() - start)
    conn = sqlite3.connect(path, isolation_level=None)
    for key in keys[:200]:
        conn.execute(RAW_SQL, (fsid, SOURCE, key)).fetchone()
    raw, raw_txn = [], []
    for key in keys:
        start = time.perf_counter()
        found = conn.execute(RAW_SQL, (fsid, SOURCE, key)).fetchone()
        raw.append(time.perf_counter() - start)
        assert (found is not None) == (key in expected)
    for key in keys:  # the same with the transaction each ability call opens
        start = time.perf_counter()
        conn.execute("BEGIN")
        conn.execute(RAW_SQL, (fsid, SOURCE, key)).fetchone()
        conn.execute("ROLLBACK")
        raw_txn.append(time.perf_counter() - start)
    conn.close()

    def us(label: str, samples: list[float]) -> str:
        return f"{label:<52} p50 {pct(samples, 0.5) * 1e6:8.1f} µs   p95 {pct(samples, 0.95) * 1e6:8.1f} µs"

    print("-- check-processed-item, one key (SQLite)")
    print(us("check-processed-item (runner.invoke, owner)", handler))
    print(us("engine.dedup.processed_at (open session)", engine))
    print(us("raw sqlite3 indexed SELECT", raw))
    print(us("raw sqlite3 BEGIN + SELECT + ROLLBACK", raw_txn))
    print(ratio("check-processed-item / raw SELECT", handler, raw, goal=False))
    print(f"mean handler {statistics.mean(handler) * 1e6:.1f} µs, mean raw {statistics.mean(raw) * 1e6:.1f} µs")


# --- driver ----------------------------------------------------------------------------------------


async def run_backend(backend: str, url: str, tmp: Path, rows: int, calls: int, parts: set[str]) -> None:
    t0 = time.perf_counter()
    db = Database(url)
    fsid, flow_id, job_ids = await create_database(db, REPS + 1)
    await db.dispose()
    if backend == "sqlite":
        load_sqlite(Path(url), fsid, flow_id, rows)
    else:
        await load_postgres(url, fsid, flow_id, rows)
    print(f"\n=== {backend}: {rows:,} processed rows loaded in {time.perf_counter() - t0:.1f} s")
    runtime = await open_runtime(ProcessConfig(db=url, data_dir=tmp, worker=False))
    try:
        if "check" in parts and backend == "sqlite":
            await check_part(runtime, Path(url), fsid, rows, calls)
        if "fetch" in parts:
            sets = candidate_sets(rows, REPS)
            ours = await fetch_ours(runtime, fsid, job_ids[0], flow_id, sets)
            print(f"-- fetch step: classify {CANDIDATES:,} candidates (half processed)")
            print(line("fetch.classify, first sight", ours["first"]))
            print(line("fetch.classify, same candidates again", ours["again"]))
            if backend == "sqlite":
                raw, touch, plan = fetch_raw_sqlite(Path(url), fsid, sets)
                print(line("raw sqlite3 IN query", raw))
                print(line("raw sqlite3 IN query + UPDATE last_seen_at", touch))
                print(f"raw query plan: {plan}")
            else:
                raw, touch = await fetch_raw_pg(url, fsid, sets)
                print(line("raw asyncpg = ANY query", raw))
                print(line("raw asyncpg = ANY query + UPDATE last_seen_at", touch))
            print(ratio("fetch check again / raw IN query", ours["again"], raw))
            if touch:
                print(ratio("fetch check first / raw IN query + UPDATE", ours["first"], touch))
            else:
                print(ratio("fetch check first / raw IN query", ours["first"], raw))
        if "claim" in parts:
            ours_claim = await claim_ours(runtime, fsid, flow_id, job_ids)
            print(f"-- fetch commit: claim {CLAIMS} new items")
            print(line("claims.claim in a write transaction", ours_claim))
            if backend == "sqlite":
                raw = claim_raw_sqlite(Path(url), fsid, flow_id, job_ids)
                print(line("raw sqlite3 multi-row INSERT + COMMIT", raw))
            else:
                raw = await claim_raw_pg(url, fsid, flow_id, job_ids)
                print(line("raw asyncpg multi-row INSERT + COMMIT", raw))
            print(ratio("claim / raw", ours_claim, raw))
    finally:
        await runtime.db.dispose()


async def wipe_postgres(url: str) -> None:
    db = Database(url)
    try:
        await migrate(db)
        async with db.write() as s:
            tables = await s.execute(text("SELECT tablename FROM pg_tables WHERE tablename LIKE 'datamachine_%'"))
            names = ", ".join(r[0] for r in tables.all())
            await s.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    finally:
        await db.dispose()


async def main(rows: int, calls: int, parts: set[str], pg: str | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dm-bench-dedup-"))
    try:
        await run_backend("sqlite", str(tmp / "bench.db"), tmp, rows, calls, parts)
        if pg:
            await wipe_postgres(pg)
            await run_backend("postgresql", pg, tmp, rows, calls, parts)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=3000, help="check-processed-item calls")
    parser.add_argument("--part", choices=["all", "check", "fetch", "claim"], default="all")
    parser.add_argument(
        "--pg", default=os.environ.get("DATAMACHINE_TEST_PG_URL"), help="PostgreSQL URL to wipe and use"
    )
    args = parser.parse_args()
    parts = {"check", "fetch", "claim"} if args.part == "all" else {args.part}
    asyncio.run(main(args.rows, args.calls, parts, args.pg))
