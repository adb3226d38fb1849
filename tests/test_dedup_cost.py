"""Dedup cost is proportional to the candidates, not the ledger: the fetch step's lookup runs on the
``(flow_step_id, source_type, item_identifier)`` index (never a status index across all flows, whatever
the planner's statistics), and a fetch commit claims its new items in one INSERT. The timings
themselves are in bench/dedup.py."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest
from sqlalchemy import event

from datamachine_mcp.abilities.context import Runtime
from tests import jobs_support
from tests.conftest import call
from tests.feeds import ident, rss
from tests.jobs_support import dirs, make_flow, run

pytestmark = [pytest.mark.anyio, pytest.mark.backends]
engine = jobs_support.engine  # fixture

ITEMS = 30


def feed_step(url: str) -> dict[str, Any]:
    return {
        "step_type": "fetch",
        "handler_slugs": ["rss"],
        "handler_configs": {"rss": {"feed_url": url, "max_items": 0}},
    }


ECHO = {"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {}}}


def capture(runtime: Runtime) -> list[tuple[str, Any]]:
    """Every statement either engine sends from now on, with its parameters."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    for eng in {runtime.db.write_engine, runtime.db.read_engine}:
        event.listen(eng.sync_engine, "before_cursor_execute", record)
    return seen


async def test_fetch_lookup_uses_the_item_index_and_claims_are_one_insert(runtime, owner, engine, db_backend):
    inbox, _ = dirs(runtime)
    feed = inbox / "feed.xml"
    feed.write_text(rss(*((f"i{n}", f"Item {n}") for n in range(ITEMS))))
    made = await make_flow(owner, [feed_step(feed.as_uri()), ECHO])
    fsid = made["flow_step_ids"][0]
    for n in range(0, ITEMS, 3):  # a third of them already processed
        await call(
            owner,
            "mark-processed",
            {"flow_step_id": fsid, "source_type": "rss", "item_identifier": ident(f"i{n}")},
        )
    statements = capture(runtime)
    done = await run(owner, made["flow_id"], wait=30)
    assert done["job"]["status"] == "completed", done["job"]
    assert done["job"]["child_counts"]["total"] == ITEMS - ITEMS // 3

    inserts = [s for s, _ in statements if s.lstrip().upper().startswith("INSERT INTO DATAMACHINE_PROCESSED_ITEMS")]
    assert len(inserts) == 1, inserts
    # the fetch step's reads of the ledger: the ones that carry the fetched identifiers
    lookups = [
        (s, p)
        for s, p in statements
        if s.lstrip().upper().startswith("SELECT")
        and "datamachine_processed_items" in s
        and any(ident("i1") in str(v) for v in (p.values() if isinstance(p, dict) else p))
    ]
    assert lookups
    if db_backend != "sqlite":
        return
    # Without statistics (none were gathered on this fresh file), SQLite must still search the item
    # index: a status term would send it down ix_processed_status_expiry over every processed row.
    await runtime.db.analyze()  # as retention does daily: a small ledger keeps no statistics
    conn = sqlite3.connect(runtime.db.path)
    try:
        for statement, params in lookups:
            plan = " / ".join(r[-1] for r in conn.execute("EXPLAIN QUERY PLAN " + statement, params))
            assert "sqlite_autoindex_datamachine_processed_items_1" in plan, plan
            assert "status" not in plan and "SCAN datamachine_processed_items" not in plan, plan
    finally:
        conn.close()
