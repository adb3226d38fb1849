"""Retention of processed items on a 1,000,000-row ledger, against raw driver statements (goal ≤ 3×).

    python bench/retention.py [--rows 1000000] [--steps 200] [--pg URL]

The ledger is ``bench/dedup.py``'s (schema by the project's migrations, ``--rows`` processed items of
one flow step, bulk-loaded without statistics) plus ``--steps`` other flow steps of 50 items each;
every item was last seen by a fetch at the same moment. Retention keeps 30 days.

1. **idle**: the daily pass when no step has anything to forget (every one fetched its items within
   the window): ``engine.retention.forget_unseen`` vs its statement (a walk of the steps, index probes
   only) on the plain driver; a ``GROUP BY`` over the whole ledger is printed for comparison. It must
   not grow with the ledger.
2. **forget**: 10,000 items of the large step that its latest fetch had not seen for 60 days are
   deleted in batches of 1,000 rows per transaction (no lock is held for long): ``forget_unseen`` vs
   the same batched ``DELETE`` on the plain driver; one ``DELETE`` of all of them is printed for
   comparison.

SQLite always; PostgreSQL as well with ``--pg URL`` (default: ``DATAMACHINE_TEST_PG_URL``), a database
the bench may wipe.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from dedup import SOURCE, TABLE, create_database, line, load_postgres, load_sqlite, wipe_postgres  # noqa: E402
from sqlalchemy.dialects import postgresql, sqlite  # noqa: E402

from datamachine_mcp.engine.retention import BATCH, STEP_SPANS, forget_unseen  # noqa: E402
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime  # noqa: E402
from datamachine_mcp.storage.db import Database  # noqa: E402

# What a walk over the whole ledger costs (for comparison only: it grows with the ledger).
GROUP_BY = (
    f"SELECT flow_step_id, source_type, min(last_seen_at), max(last_seen_at) FROM {TABLE} "
    "GROUP BY flow_step_id, source_type"
)
SEEN = datetime(2026, 1, 1, tzinfo=UTC)  # when bench/dedup.py's loader says every row was seen
GONE = SEEN - timedelta(days=60)
WINDOW = timedelta(days=30)
SLICE = 10_000
REPS = 3
STEP_ROWS = 50


def sqlite_stamp(when: datetime) -> str:
    return when.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


def ratio(label: str, ours: list[float], raw: list[float]) -> str:
    r = sorted(ours)[len(ours) // 2] / sorted(raw)[len(raw) // 2]
    return f"ratio {label}: {r:.1f}  (goal <= 3){'' if r <= 3 else '  ** over goal **'}"


# --- SQLite --------------------------------------------------------------------------------------


def sqlite_other_steps(path: Path, fsid: str, flow_id: int, steps: int) -> None:
    conn = sqlite3.connect(path)
    rows = [
        (f"{fsid}-other{s:04d}", SOURCE, f"item-{i}", sqlite_stamp(SEEN), "processed", flow_id, sqlite_stamp(SEEN))
        for s in range(steps)
        for i in range(STEP_ROWS)
    ]
    conn.executemany(
        f"INSERT INTO {TABLE} (flow_step_id, source_type, item_identifier, processed_timestamp, status, flow_key, "
        "last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.commit()
    conn.close()


def sqlite_walk(path: Path, sql: str) -> tuple[float, int]:
    """One statement on a plain connection, in a read transaction: (seconds, rows)."""
    conn = sqlite3.connect(path, isolation_level=None)
    start = time.perf_counter()
    conn.execute("BEGIN")
    found = conn.execute(sql).fetchall()
    conn.execute("ROLLBACK")
    took = time.perf_counter() - start
    conn.close()
    return took, len(found)


def sqlite_back_date(path: Path, fsid: str, rep: int) -> None:
    """Setup only: one slice of the large step, last seen 60 days before its latest fetch."""
    conn = sqlite3.connect(path)
    conn.execute(
        f"UPDATE {TABLE} SET last_seen_at = ? WHERE id IN (SELECT id FROM {TABLE} WHERE flow_step_id = ? "
        "AND last_seen_at = ? ORDER BY id LIMIT ?)",
        (sqlite_stamp(GONE), fsid, sqlite_stamp(SEEN), SLICE),
    )
    conn.commit()
    conn.close()


_WHERE = "flow_step_id = {0} AND source_type = {1} AND status = 'processed' AND last_seen_at < {2}"
SQLITE_WHERE = _WHERE.format("?", "?", "?")
PG_WHERE = _WHERE.format("$1", "$2", "$3")


def sqlite_delete(path: Path, fsid: str, batch: int | None) -> float:
    """The slice's rows deleted by one DELETE, or ``batch`` rows per transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    params = (fsid, SOURCE, sqlite_stamp(SEEN - WINDOW - timedelta(days=1)))
    sql = f"DELETE FROM {TABLE} WHERE {SQLITE_WHERE}"
    if batch:
        sql = f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} WHERE {SQLITE_WHERE} LIMIT {batch})"
    start, total = time.perf_counter(), 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        deleted = conn.execute(sql, params).rowcount
        conn.execute("COMMIT")
        total += deleted
        if not batch or deleted < batch:
            break
    took = time.perf_counter() - start
    assert total == SLICE, total
    conn.close()
    return took


# --- PostgreSQL ----------------------------------------------------------------------------------


async def pg_other_steps(url: str, fsid: str, flow_id: int, steps: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        rows = [
            (f"{fsid}-other{s:04d}", SOURCE, f"item-{i}", SEEN, "processed", flow_id, SEEN)
            for s in range(steps)
            for i in range(STEP_ROWS)
        ]
        cols = ["flow_step_id", "source_type", "item_identifier", "processed_timestamp", "status", "flow_key"]
        await conn.copy_records_to_table(TABLE, records=rows, columns=[*cols, "last_seen_at"])
        await conn.execute(f"ANALYZE {TABLE}")
    finally:
        await conn.close()


async def pg_walk(url: str, sql: str) -> tuple[float, int]:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.fetch(sql)  # prepared once, as the engine's statement is
        start = time.perf_counter()
        async with conn.transaction():
            found = await conn.fetch(sql)
        return time.perf_counter() - start, len(found)
    finally:
        await conn.close()


async def pg_back_date(url: str, fsid: str, rep: int) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            f"UPDATE {TABLE} SET last_seen_at = $1 WHERE id IN (SELECT id FROM {TABLE} WHERE flow_step_id = $2 "
            "AND last_seen_at = $3 ORDER BY id LIMIT $4)",
            GONE,
            fsid,
            SEEN,
            SLICE,
        )
    finally:
        await conn.close()


async def pg_delete(url: str, fsid: str, batch: int | None) -> float:
    import asyncpg

    conn = await asyncpg.connect(url)
    sql = f"DELETE FROM {TABLE} WHERE {PG_WHERE}"
    if batch:
        sql = (
            f"DELETE FROM {TABLE} WHERE id IN (SELECT id FROM {TABLE} WHERE {PG_WHERE} LIMIT {batch} "
            "FOR UPDATE SKIP LOCKED)"
        )
    try:
        start, total = time.perf_counter(), 0
        while True:
            async with conn.transaction():
                status = await conn.execute(sql, fsid, SOURCE, SEEN - WINDOW - timedelta(days=1))
            deleted = int(status.split()[-1])
            total += deleted
            if not batch or deleted < batch:
                break
        took = time.perf_counter() - start
        assert total == SLICE, total
        return took
    finally:
        await conn.close()


# --- driver ----------------------------------------------------------------------------------------


async def run_backend(backend: str, url: str, tmp: Path, rows: int, steps: int) -> None:
    t0 = time.perf_counter()
    db = Database(url)
    fsid, flow_id, _ = await create_database(db, 1)
    await db.dispose()
    if backend == "sqlite":
        load_sqlite(Path(url), fsid, flow_id, rows)
        sqlite_other_steps(Path(url), fsid, flow_id, steps)
    else:
        await load_postgres(url, fsid, flow_id, rows)
        await pg_other_steps(url, fsid, flow_id, steps)
    print(
        f"\n=== {backend}: {rows:,} + {steps} x {STEP_ROWS} processed rows loaded in {time.perf_counter() - t0:.1f} s"
    )
    runtime = await open_runtime(ProcessConfig(db=url, data_dir=tmp, worker=False))
    try:
        services = runtime.engine
        assert services is not None
        ours_idle: list[float] = []
        raw_idle: list[float] = []
        scan: list[float] = []
        ours_forget: list[float] = []
        raw_forget: list[float] = []
        dialect = sqlite.dialect() if backend == "sqlite" else postgresql.dialect()
        walk = str(STEP_SPANS.compile(dialect=dialect))
        for rep in range(REPS + 1):  # the first round warms up
            start = time.perf_counter()
            assert await forget_unseen(services, WINDOW, dry_run=False) == 0
            took = time.perf_counter() - start
            for sql, into in ((walk, raw_idle), (GROUP_BY, scan)):
                raw, found = sqlite_walk(Path(url), sql) if backend == "sqlite" else await pg_walk(url, sql)
                assert found == steps + 1, found
                if rep:
                    into.append(raw)
            if rep:
                ours_idle.append(took)
        one_delete: list[float] = []
        for rep in range(3 * REPS):  # alternating: ours, raw in batches, raw in one DELETE, ours, …
            if backend == "sqlite":
                sqlite_back_date(Path(url), fsid, rep)
            else:
                await pg_back_date(url, fsid, rep)
            if rep % 3 == 0:
                start = time.perf_counter()
                assert await forget_unseen(services, WINDOW, dry_run=False) == SLICE
                ours_forget.append(time.perf_counter() - start)
                continue
            batch = BATCH if rep % 3 == 1 else None
            into = raw_forget if batch else one_delete
            into.append(
                sqlite_delete(Path(url), fsid, batch) if backend == "sqlite" else await pg_delete(url, fsid, batch)
            )
        print(f"-- idle pass: {steps + 1} steps, nothing to forget")
        print(line("retention.forget_unseen", ours_idle))
        print(line("raw driver, the same statement", raw_idle))
        print(line("(raw driver, GROUP BY over the whole ledger)", scan))
        print(ratio("idle pass / raw statement", ours_idle, raw_idle))
        print(f"-- forgetting {SLICE:,} items of the large step")
        print(line("retention.forget_unseen (1,000 per transaction)", ours_forget))
        print(line("raw driver, the same DELETE per 1,000 rows + COMMIT", raw_forget))
        print(line("(raw driver, one DELETE + COMMIT)", one_delete))
        print(ratio("forget / raw batched DELETE", ours_forget, raw_forget))
    finally:
        await runtime.db.dispose()


async def main(rows: int, steps: int, pg: str | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dm-bench-retention-"))
    try:
        await run_backend("sqlite", str(tmp / "bench.db"), tmp, rows, steps)
        if pg:
            await wipe_postgres(pg)
            await run_backend("postgresql", pg, tmp, rows, steps)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=200, help="other flow steps, 50 items each")
    parser.add_argument(
        "--pg", default=os.environ.get("DATAMACHINE_TEST_PG_URL"), help="PostgreSQL URL to wipe and use"
    )
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.steps, args.pg))
