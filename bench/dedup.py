"""p50 of ``check-processed-item`` at handler level vs a raw sqlite3 indexed SELECT, on 1,000,000 rows.

    python bench/dedup.py [--rows 1000000] [--calls 3000]

Builds a SQLite database with the project's own code (``storage.db.Database`` + ``storage.migrate``)
holding one agent, pipeline and flow, bulk-loads ``--rows`` processed items with plain sqlite3, then
times the same random keys (half existing, half missing) two ways:

* the ability through ``abilities.runner.invoke`` as the local owner (input validation, the read
  transaction, the flow/owner lookup and access check, the lookup, output validation);
* one indexed ``SELECT`` on a plain ``sqlite3`` connection to the same file.

Prints both p50s and their ratio (goal <= 3), plus the engine-level lookup alone for reference.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from datamachine_mcp.abilities.access import Principal  # noqa: E402
from datamachine_mcp.abilities.registry import load_all  # noqa: E402
from datamachine_mcp.abilities.runner import invoke  # noqa: E402
from datamachine_mcp.engine import dedup  # noqa: E402
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime  # noqa: E402
from datamachine_mcp.storage.db import Database  # noqa: E402
from datamachine_mcp.storage.migrate import migrate  # noqa: E402
from datamachine_mcp.storage.models import Agent, AgentAccess, Flow, Pipeline  # noqa: E402
from datamachine_mcp.storage.timeutil import utcnow  # noqa: E402

OWNER = Principal(user_id=1, is_admin=True, transport="stdio")
SOURCE = "rss"
RAW_SQL = (
    "SELECT processed_timestamp FROM datamachine_processed_items "
    "WHERE flow_step_id = ? AND source_type = ? AND item_identifier = ? AND status = 'processed' LIMIT 1"
)


def item(i: int) -> str:
    return f"https://news.example.com/2026/articles/{i:07d}-{(i * 2654435761) % 4294967296:08x}"


async def create_database(path: Path) -> tuple[str, int]:
    """Schema by the project's migrations; one agent, pipeline and flow through the ORM. Returns the flow step id."""
    db = Database(str(path))
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
        flow_id = flow.flow_id
    await db.dispose()
    return fsid, flow_id


def bulk_load(path: Path, fsid: str, flow_id: int, rows: int, batch: int = 100_000) -> None:
    """Setup only: plain sqlite3 executemany in large batches, in key order.

    The secondary indexes are dropped for the load and recreated from their own DDL afterwards
    (building an index once is much faster than maintaining it row by row); the unique index the
    lookup uses is part of the table and stays.
    """
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    conn.execute("PRAGMA journal_mode=OFF")
    indexes = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'datamachine_processed_items' "
        "AND sql IS NOT NULL"
    ).fetchall()
    for name, _ in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    stamp = "2026-01-01 00:00:00.000000"
    sql = (
        "INSERT INTO datamachine_processed_items (flow_step_id, source_type, item_identifier, job_id, "
        "processed_timestamp, status, claim_expires_at, flow_key) VALUES (?, ?, ?, NULL, ?, 'processed', NULL, ?)"
    )
    for start in range(0, rows, batch):
        conn.executemany(sql, ((fsid, SOURCE, item(i), stamp, flow_id) for i in range(start, min(rows, start + batch))))
        conn.commit()
    for _, ddl in indexes:
        conn.execute(ddl)
    conn.commit()
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def line(label: str, samples: list[float]) -> str:
    return f"{label:<44} p50 {pct(samples, 0.5) * 1e6:8.1f} µs   p95 {pct(samples, 0.95) * 1e6:8.1f} µs   ({len(samples)} calls)"


async def main(rows: int, calls: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="dm-bench-dedup-"))
    try:
        await run(tmp, rows, calls)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def run(tmp: Path, rows: int, calls: int) -> None:
    path = tmp / "bench.db"
    t0 = time.perf_counter()
    fsid, flow_id = await create_database(path)
    bulk_load(path, fsid, flow_id, rows)
    print(f"setup: {rows:,} processed rows in {time.perf_counter() - t0:.1f} s")

    rng = random.Random(7)
    existing = [item(rng.randrange(rows)) for _ in range(calls // 2)]
    missing = [f"https://news.example.com/missing/{rng.randrange(10**9)}" for _ in range(calls - len(existing))]
    keys = existing + missing
    rng.shuffle(keys)
    expected = set(existing)

    runtime = await open_runtime(ProcessConfig(db=str(path), data_dir=tmp, worker=False))
    ability = load_all()["check-processed-item"]
    try:
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
    finally:
        await runtime.db.dispose()

    conn = sqlite3.connect(path, isolation_level=None)
    plan = " / ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + RAW_SQL, (fsid, SOURCE, keys[0])))
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

    print(f"raw query plan: {plan}")
    print(line("check-processed-item (runner.invoke, owner)", handler))
    print(line("engine.dedup.processed_at (open session)", engine))
    print(line("raw sqlite3 indexed SELECT", raw))
    print(line("raw sqlite3 BEGIN + SELECT + ROLLBACK", raw_txn))
    ratio = pct(handler, 0.5) / pct(raw, 0.5)
    print(f"ratio (p50 check-processed-item / p50 raw SELECT): {ratio:.1f}  (goal <= 3)")
    print(f"mean handler {statistics.mean(handler) * 1e6:.1f} µs, mean raw {statistics.mean(raw) * 1e6:.1f} µs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.calls))
