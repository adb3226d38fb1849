"""Dedup never forgets an item the source still offers: retention forgets a processed item only when a
later fetch of its flow step no longer saw it, not by when it was processed nor by the calendar alone
(a paused, manual or rarely scheduled flow keeps its whole history). On a real flow over a local feed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from datamachine_mcp.engine.retention import run_retention
from datamachine_mcp.storage.models import ProcessedItem
from datamachine_mcp.storage.timeutil import utcnow
from tests import jobs_support
from tests.conftest import call
from tests.feeds import ident, rss
from tests.jobs_support import approval_step, dirs, make_flow, publish_step, run, sql, wait_job

pytestmark = [pytest.mark.anyio, pytest.mark.backends]
engine = jobs_support.engine  # fixture


def feed_step(url: str, **config) -> dict:
    return {
        "step_type": "fetch",
        "handler_slugs": ["rss"],
        "handler_configs": {"rss": {"feed_url": url, "max_items": 0, **config}},
    }


async def back_date(runtime, days: int) -> None:
    """Every ledger row as if processed ``days`` ago and not touched since."""
    old = utcnow() - timedelta(days=days)
    await sql(runtime, "UPDATE datamachine_processed_items SET processed_timestamp = :old", old=old)
    if "last_seen_at" in ProcessedItem.__table__.c:
        await sql(runtime, "UPDATE datamachine_processed_items SET last_seen_at = :old", old=old)


async def published(outbox) -> int:
    return len(list(outbox.iterdir()))


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


async def test_a_flow_that_does_not_run_forgets_nothing(runtime, owner, engine):
    """Paused, manual or scheduled more rarely than the retention window: no fetch has seen the items
    go, so none is forgotten, however old."""
    inbox, outbox = dirs(runtime)
    feed = inbox / "feed.xml"
    feed.write_text(rss(("one", "One"), ("two", "Two")))
    flow = (await make_flow(owner, [feed_step(feed.as_uri()), publish_step(outbox)]))["flow_id"]
    assert (await run(owner, flow, wait=30))["job"]["status"] == "completed"
    assert await published(outbox) == 2

    await back_date(runtime, 40)  # the flow did not run for 40 days
    out = await run_retention(runtime.engine)
    assert out["deleted"]["processed_items"] == 0
    assert set(await ledger(runtime)) == {ident("one"), ident("two")}

    again = await run(owner, flow, wait=30)
    assert again["job"]["status"] == "completed_no_items", again["job"]
    assert await published(outbox) == 2


async def test_marking_an_item_by_hand_is_not_a_fetch(runtime, owner, engine):
    inbox, outbox = dirs(runtime)
    feed = inbox / "feed.xml"
    feed.write_text(rss(("one", "One")))
    made = await make_flow(owner, [feed_step(feed.as_uri()), publish_step(outbox)])
    assert (await run(owner, made["flow_id"], wait=30))["job"]["status"] == "completed"
    await back_date(runtime, 40)
    step = made["flow_step_ids"][0]
    mark = {"flow_step_id": step, "source_type": "rss", "item_identifier": ident("by-hand")}
    assert (await call(owner, "mark-processed", mark))["created"] is True

    assert (await run_retention(runtime.engine))["deleted"]["processed_items"] == 0
    assert (await run(owner, made["flow_id"], wait=30))["job"]["status"] == "completed_no_items"
    assert await published(outbox) == 1


async def test_an_item_the_filters_drop_is_still_offered_and_kept(runtime, owner, engine):
    inbox, outbox = dirs(runtime)
    feed = inbox / "feed.xml"
    feed.write_text(rss(("story", "Story")))
    flow = (await make_flow(owner, [feed_step(feed.as_uri(), exclude_keywords="updated"), publish_step(outbox)]))[
        "flow_id"
    ]
    assert (await run(owner, flow, wait=30))["job"]["status"] == "completed"

    # 40 days on, the source still lists the story (its title now excluded) and a new item.
    await back_date(runtime, 40)
    feed.write_text(rss(("story", "Story updated"), ("fresh", "Fresh")))
    assert (await run(owner, flow, wait=30))["job"]["status"] == "completed"
    assert await published(outbox) == 2
    assert (await run_retention(runtime.engine))["deleted"]["processed_items"] == 0

    feed.write_text(rss(("story", "Story"), ("fresh", "Fresh")))  # no longer excluded: still not new
    assert (await run(owner, flow, wait=30))["job"]["status"] == "completed_no_items"
    assert await published(outbox) == 2


async def test_an_item_held_by_a_parked_job_is_seen_by_later_fetches(runtime, owner, engine):
    """A claim settles long after its fetch (an approval waited 40 days): fetches in between saw the
    item, so it is not forgotten once processed."""
    inbox, outbox = dirs(runtime)
    feed = inbox / "feed.xml"
    feed.write_text(rss(("held", "Held")))
    steps = [feed_step(feed.as_uri()), approval_step(), publish_step(outbox)]
    flow = (await make_flow(owner, steps))["flow_id"]
    job_id = (await run(owner, flow))["job_id"]
    first = await wait_job(owner, job_id, seconds=30, stop_on_waiting=True)
    assert first["job"]["base_status"] == "waiting", first["job"]
    await back_date(runtime, 40)

    feed.write_text(rss(("held", "Held"), ("next", "Next")))  # the flow runs on meanwhile
    second = await wait_job(owner, (await run(owner, flow))["job_id"], seconds=30, stop_on_waiting=True)
    assert second["job"]["base_status"] == "waiting", second["job"]
    action = first["job"]["wait"]["action_id"]
    await call(owner, "resolve-pending-action", {"action_id": action, "decision": "accepted"})
    done = await wait_job(owner, job_id, seconds=30)
    assert done["job"]["status"] == "completed", done["job"]

    assert (await run_retention(runtime.engine))["deleted"]["processed_items"] == 0
    assert set(await ledger(runtime)) == {ident("held"), ident("next")}
