"""Dedup never forgets an item the source still offers: retention expires processed items by when a
fetch last saw them, not by when they were processed. Both halves, on a real flow over a local feed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from datamachine_mcp.engine.retention import run_retention
from datamachine_mcp.storage.models import ProcessedItem
from datamachine_mcp.storage.timeutil import utcnow
from tests import jobs_support
from tests.feeds import ident, rss
from tests.jobs_support import dirs, make_flow, publish_step, run, sql

pytestmark = [pytest.mark.anyio, pytest.mark.backends]
engine = jobs_support.engine  # fixture


def feed_step(url: str) -> dict:
    return {
        "step_type": "fetch",
        "handler_slugs": ["rss"],
        "handler_configs": {"rss": {"feed_url": url, "max_items": 0}},
    }


async def back_date(runtime, days: int) -> None:
    """Every ledger row as if processed ``days`` ago and not touched since."""
    old = utcnow() - timedelta(days=days)
    await sql(runtime, "UPDATE datamachine_processed_items SET processed_timestamp = :old", old=old)
    if "last_seen_at" in ProcessedItem.__table__.c:
        await sql(runtime, "UPDATE datamachine_processed_items SET last_seen_at = :old", old=old)


async def ledger(runtime) -> dict[str, ProcessedItem]:
    async with runtime.db.read() as s:
        return {r.item_identifier: r for r in (await s.execute(select(ProcessedItem))).scalars()}


async def test_an_item_still_in_the_feed_is_never_taken_twice_and_a_gone_one_is_forgotten(runtime, owner, engine):
    inbox, outbox = dirs(runtime)
    feed = inbox / "feed.xml"
    feed.write_text(rss(("live", "Still listed"), ("gone", "Dropped later")))
    flow = (await make_flow(owner, [feed_step(feed.as_uri()), publish_step(outbox)]))["flow_id"]
    first = await run(owner, flow, wait=30)
    assert first["job"]["status"] == "completed", first["job"]
    assert len(list(outbox.iterdir())) == 2

    # 40 days later (retention keeps 30 by default): the feed still lists "live", "gone" left it.
    feed.write_text(rss(("live", "Still listed")))
    await back_date(runtime, 40)
    scheduled = await run(owner, flow, wait=30)  # the flow's regular run sees "live" again
    assert scheduled["job"]["status"] == "completed_no_items", scheduled["job"]

    out = await run_retention(runtime.engine)
    assert out["deleted"]["processed_items"] == 1
    assert set(await ledger(runtime)) == {ident("live")}

    again = await run(owner, flow, wait=30)
    assert again["job"]["status"] == "completed_no_items", again["job"]
    assert len(list(outbox.iterdir())) == 2  # "live" was not published a second time

    # The forgotten item is new again if the source offers it once more.
    feed.write_text(rss(("gone", "Dropped later"), ("live", "Still listed")))
    back = await run(owner, flow, wait=30)
    assert back["job"]["status"] == "completed", back["job"]
    assert len(list(outbox.iterdir())) == 3


async def test_a_fetch_refreshes_last_seen_at_at_most_daily_and_a_dry_run_not_at_all(runtime, owner, engine):
    inbox, outbox = dirs(runtime)
    feed = inbox / "feed.xml"
    feed.write_text(rss(("a", "A")))
    flow = (await make_flow(owner, [feed_step(feed.as_uri()), publish_step(outbox)]))["flow_id"]
    await run(owner, flow, wait=30)
    await back_date(runtime, 10)
    dry = await run(owner, flow, wait=30, dry_run=True)
    assert dry["job"]["status"] == "completed_no_items"
    assert utcnow() - (await ledger(runtime))[ident("a")].last_seen_at > timedelta(days=9)
    await run(owner, flow, wait=30)
    row = (await ledger(runtime))[ident("a")]
    seen = row.last_seen_at
    assert utcnow() - seen < timedelta(minutes=5)
    assert utcnow() - row.processed_timestamp > timedelta(days=9)  # still when it was taken
    await run(owner, flow, wait=30)  # seen again within the day: no write
    assert (await ledger(runtime))[ident("a")].last_seen_at == seen
