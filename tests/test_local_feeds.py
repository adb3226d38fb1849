"""The rss handler on a local feed file (``file:///…``): read like the files handler reads, inside
files_allowed_roots only, with no network and no outbound rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.handlers import FETCHERS
from datamachine_mcp.engine.http import Outbound
from tests import jobs_support
from tests.conftest import call, fail, table_rows
from tests.fake_servers import make_context, make_snapshot
from tests.feeds import ident, rss
from tests.jobs_support import dirs, make_flow, publish_step, run

pytestmark = pytest.mark.anyio
engine = jobs_support.engine  # fixture


def feed_step(url: str, max_items: int = 0) -> dict:
    return {
        "step_type": "fetch",
        "handler_slugs": ["rss"],
        "handler_configs": {"rss": {"feed_url": url, "max_items": max_items}},
    }


async def fetch(tmp_path: Path, url: str, **settings) -> list:
    snap = make_snapshot(tmp_path, **settings)
    async with Outbound(snap, "1") as outbound:
        return list(await FETCHERS["rss"].fetch({"feed_url": url}, make_context(snap, outbound)))


async def refused(tmp_path: Path, url: str, code: str, **settings) -> None:
    with pytest.raises(StepError) as info:
        await fetch(tmp_path, url, **settings)
    assert info.value.code == code, info.value


async def test_a_feed_file_inside_the_roots_gives_its_items_in_feed_order(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    feed = root / "news feed.xml"  # a space: the URL is percent-encoded
    feed.write_text(rss(("a", "First"), ("b", "Second")))
    first, second = await fetch(tmp_path, feed.as_uri())
    assert (first.title, first.identifier) == ("First", ident("a"))
    assert (second.title, second.identifier) == ("Second", ident("b"))
    assert first.source_url == "https://example.test/a"
    # file://localhost/… names the same file
    assert len(await fetch(tmp_path, "file://localhost" + feed.as_uri().removeprefix("file://"))) == 2


async def test_a_local_feeds_relative_links_resolve_to_file_urls_and_its_guids_stay_as_written(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    feed = root / "feed.xml"
    feed.write_text(
        '<?xml version="1.0"?><rss version="2.0"><channel><title>T</title>'
        "<item><title>A</title><guid>item-1</guid></item>"
        '<item><title>B</title><link>pages/b.html</link><guid isPermaLink="false">b</guid></item>'
        "<item><title>C</title><link>https://example.test/c</link></item>"
        "</channel></rss>"
    )
    a, b, c = await fetch(tmp_path, feed.as_uri())
    assert (a.identifier, a.source_url) == ("item-1", (root / "item-1").as_uri())
    assert (b.identifier, b.source_url) == ("b", (root / "pages" / "b.html").as_uri())
    assert c.source_url == "https://example.test/c"
    for item in (a, b):
        assert item.source_url.startswith("file:///")  # not file://tmp/… (a host named after the top directory)


async def test_a_feed_file_is_checked_like_a_files_path(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    outside = tmp_path / "outside.xml"
    outside.write_text(rss(("x", "Secret")))
    (root / "link.xml").symlink_to(outside)
    await refused(tmp_path, outside.as_uri(), "path_not_allowed")
    await refused(tmp_path, (root / "link.xml").as_uri(), "path_not_allowed")  # a link out of the roots
    await refused(tmp_path, (root / "missing.xml").as_uri(), "file_not_found")
    await refused(tmp_path, "file://elsewhere.example/feed.xml", "url_not_allowed")
    (root / "big.xml").write_text(rss(*[(str(i), f"Item {i}") for i in range(50)]))
    await refused(tmp_path, (root / "big.xml").as_uri(), "response_too_large", http_max_response_bytes=1024)
    (root / "notes.txt").write_text("not a feed")
    await refused(tmp_path, (root / "notes.txt").as_uri(), "invalid_response")


async def test_a_flow_runs_from_a_local_feed_file_and_takes_each_item_once(runtime, owner, engine):
    inbox, outbox = dirs(runtime)
    feed = inbox / "feed.xml"
    feed.write_text(rss(("a", "First"), ("b", "Second")))
    made = await make_flow(owner, [feed_step(feed.as_uri()), publish_step(outbox)])
    done = await run(owner, made["flow_id"], wait=30)
    assert done["job"]["status"] == "completed", done["job"]
    assert len(list(outbox.iterdir())) == 2
    feed.write_text(rss(("c", "Third"), ("a", "First"), ("b", "Second")))
    again = await run(owner, made["flow_id"], wait=30)
    assert again["job"]["status"] == "completed", again["job"]
    assert len(list(outbox.iterdir())) == 3  # only the new item was published


@pytest.mark.parametrize("url", ["file:///etc/hosts", "file://elsewhere.example/feed.xml", "file:relative.xml"])
async def test_a_feed_file_outside_the_roots_is_refused_when_saved(runtime, owner, url):
    inbox, outbox = dirs(runtime)
    feed = inbox / "feed.xml"
    feed.write_text(rss(("a", "First")))
    made = await make_flow(owner, [feed_step(feed.as_uri()), publish_step(outbox)])
    before = await table_rows(runtime)
    update = {"flow_step_id": made["flow_step_ids"][0], "handler_config": {"feed_url": url}}
    err = await fail(owner, "update-flow-step", update, "invalid_handler_config")
    assert err["data"]["field_errors"][0]["field"] == "feed_url"
    assert await table_rows(runtime) == before
    # an http(s) URL or a feed file inside the roots is accepted
    other = inbox / "other.xml"
    other.write_text(rss(("b", "Second")))
    await call(owner, "update-flow-step", {**update, "handler_config": {"feed_url": other.as_uri()}})
