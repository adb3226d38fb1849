"""Fetch handlers against local servers and directories."""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.handlers import FETCHERS, prepare_config, run_fetch, source_type_for, with_defaults
from datamachine_mcp.engine.http import Outbound
from datamachine_mcp.engine.items import Item, apply_filters, html_to_text, item_to_packet, normalise_identifier
from datamachine_mcp.storage.crypto import SecretBox
from tests.fake_servers import FakeResponse, make_context, make_snapshot, serve

pytestmark = pytest.mark.anyio

RSS20 = b"""<?xml version="1.0" encoding="UTF-8"?>
<rss version="2.0" xmlns:content="http://purl.org/rss/1.0/modules/content/"
     xmlns:dc="http://purl.org/dc/elements/1.1/">
<channel>
  <title>Example News</title>
  <link>https://news.example/</link>
  <item>
    <title>Newest story</title>
    <link>https://news.example/newest</link>
    <guid isPermaLink="false">story-3</guid>
    <pubDate>Fri, 01 May 2026 10:00:00 GMT</pubDate>
    <dc:creator>Ada</dc:creator>
    <category>Science</category>
    <description>Short summary</description>
    <content:encoded><![CDATA[<p>Full <b>body</b> &amp; more</p><script>x()</script>]]></content:encoded>
  </item>
  <item>
    <title>Middle story</title>
    <link>https://news.example/middle</link>
    <pubDate>Thu, 30 Apr 2026 10:00:00 GMT</pubDate>
    <description>&lt;p&gt;Middle &lt;i&gt;summary&lt;/i&gt;&lt;/p&gt;</description>
  </item>
  <item>
    <title>Oldest story</title>
    <pubDate>Wed, 01 Apr 2026 10:00:00 GMT</pubDate>
    <description>No link, no guid</description>
  </item>
</channel>
</rss>"""

ATOM = b"""<?xml version="1.0" encoding="utf-8"?>
<feed xmlns="http://www.w3.org/2005/Atom">
  <title>Atom Example</title>
  <id>urn:uuid:feed</id>
  <updated>2026-05-01T12:00:00Z</updated>
  <entry>
    <title>Atom entry one</title>
    <id>urn:uuid:entry-1</id>
    <link href="https://atom.example/one"/>
    <published>2026-05-01T09:30:00+02:00</published>
    <updated>2026-05-01T11:00:00Z</updated>
    <author><name>Grace</name></author>
    <summary>Summary one</summary>
    <content type="html">&lt;h1&gt;Content&lt;/h1&gt;&lt;p&gt;one&lt;/p&gt;</content>
  </entry>
  <entry>
    <title>Atom entry two</title>
    <id>urn:uuid:entry-2</id>
    <link href="https://atom.example/two"/>
    <updated>2026-04-30T08:00:00Z</updated>
    <summary>Only a summary</summary>
  </entry>
</feed>"""

RDF = b"""<?xml version="1.0"?>
<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" xmlns="http://purl.org/rss/1.0/"
         xmlns:dc="http://purl.org/dc/elements/1.1/">
  <channel rdf:about="https://rdf.example/">
    <title>RDF Example</title>
    <link>https://rdf.example/</link>
    <description>d</description>
  </channel>
  <item rdf:about="https://rdf.example/a">
    <title>RDF item</title>
    <link>https://rdf.example/a</link>
    <description>RDF body</description>
    <dc:date>2026-04-29T10:00:00Z</dc:date>
  </item>
</rdf:RDF>"""

EMPTY_RSS = b"""<?xml version="1.0"?><rss version="2.0"><channel><title>Empty</title></channel></rss>"""


@pytest.fixture
def server():
    with serve() as s:
        yield s


@pytest.fixture
async def out(tmp_path):
    async with Outbound(make_snapshot(tmp_path), "9.9.9-test") as outbound:
        yield outbound


def ctx_for(tmp_path, out, **kwargs):
    return make_context(make_snapshot(tmp_path), out, **kwargs)


async def fail(code, coro) -> StepError:
    with pytest.raises(StepError) as info:
        await coro
    assert info.value.code == code, info.value
    return info.value


# -- rss ---------------------------------------------------------------------------------------


async def test_rss20_items_in_feed_order_with_identifier_fallbacks(server, out, tmp_path):
    url = server.script("/feed.xml", FakeResponse(200, RSS20, {"Content-Type": "application/rss+xml"}))
    items = await FETCHERS["rss"].fetch({"feed_url": url}, ctx_for(tmp_path, out))
    assert [i.title for i in items] == ["Newest story", "Middle story", "Oldest story"]
    first, middle, oldest = items
    assert first.identifier == "story-3"  # guid
    assert first.body.startswith("<p>Full <b>body</b>")  # content:encoded preferred, HTML kept
    assert first.content_string == "Full body & more"  # script dropped, entities decoded
    assert first.source_url == "https://news.example/newest"
    assert first.published_at == datetime(2026, 5, 1, 10, 0, tzinfo=UTC)
    assert first.author == "Ada"
    assert first.metadata == {"feed_title": "Example News", "categories": ["Science"]}
    assert middle.identifier == "https://news.example/middle"  # no guid → link
    assert middle.content_string == "Middle summary"
    expected = "sha256:" + hashlib.sha256(b"Oldest storyWed, 01 Apr 2026 10:00:00 GMT").hexdigest()
    assert oldest.identifier == expected  # neither → sha256 of title + published
    assert oldest.source_url is None
    assert server.requests[0].headers["user-agent"] == "datamachine-mcp/9.9.9-test"


async def test_atom_entries(server, out, tmp_path):
    url = server.script("/atom", FakeResponse(200, ATOM, {"Content-Type": "application/atom+xml"}))
    one, two = await FETCHERS["rss"].fetch({"feed_url": url}, ctx_for(tmp_path, out))
    assert one.identifier == "urn:uuid:entry-1"
    assert one.body == "<h1>Content</h1><p>one</p>"  # content before summary
    assert one.content_string == "Content\n\none"
    assert one.published_at == datetime(2026, 5, 1, 7, 30, tzinfo=UTC)  # published, in UTC
    assert one.author == "Grace"
    assert one.source_url == "https://atom.example/one"
    assert two.body == "Only a summary"
    assert two.published_at == datetime(2026, 4, 30, 8, 0, tzinfo=UTC)  # updated when no published


async def test_rss10_rdf(server, out, tmp_path):
    url = server.script("/rdf", FakeResponse(200, RDF, {"Content-Type": "application/rdf+xml"}))
    (item,) = await FETCHERS["rss"].fetch({"feed_url": url}, ctx_for(tmp_path, out))
    assert (item.title, item.body, item.identifier) == ("RDF item", "RDF body", "https://rdf.example/a")
    assert item.published_at == datetime(2026, 4, 29, 10, 0, tzinfo=UTC)


async def test_valid_empty_feed_gives_no_items_and_garbage_is_invalid(server, out, tmp_path):
    empty = server.script("/empty", FakeResponse(200, EMPTY_RSS))
    html = server.script("/html", FakeResponse(200, "<html><body>Not a feed</body></html>"))
    broken = server.script(
        "/broken", FakeResponse(200, b'<?xml version="1.0"?><rss version="2.0"><channel><title>x</title><<&&')
    )
    salvage = server.script("/salvage", FakeResponse(200, b"<rss><channel><item><title>Kept</title></item><ite"))
    json_body = server.script("/json", FakeResponse(200, {"json": True}))
    ctx = ctx_for(tmp_path, out)
    assert list(await FETCHERS["rss"].fetch({"feed_url": empty}, ctx)) == []
    err = await fail("invalid_response", FETCHERS["rss"].fetch({"feed_url": html}, ctx))
    assert err.diagnostics["body"].startswith("<html>")
    err = await fail("invalid_response", FETCHERS["rss"].fetch({"feed_url": broken}, ctx))
    assert "not well-formed" in err.message
    await fail("invalid_response", FETCHERS["rss"].fetch({"feed_url": json_body}, ctx))
    # A parser error with entries keeps them (only "error and no entries" is invalid).
    assert [i.title for i in await FETCHERS["rss"].fetch({"feed_url": salvage}, ctx)] == ["Kept"]


async def test_feed_content_that_looks_like_a_path_is_not_opened(server, out, tmp_path):
    secret = tmp_path / "local.xml"
    secret.write_bytes(RSS20)
    url = server.script("/path", FakeResponse(200, str(secret)))
    await fail("invalid_response", FETCHERS["rss"].fetch({"feed_url": url}, ctx_for(tmp_path, out)))


async def test_rss_http_errors_and_ssrf(server, tmp_path):
    url = server.script("/gone", FakeResponse(404, "nope"))
    async with Outbound(make_snapshot(tmp_path), "1") as o:
        await fail("http_not_found", FETCHERS["rss"].fetch({"feed_url": url}, ctx_for(tmp_path, o)))
    snap = make_snapshot(tmp_path, outbound_allow_private_networks=False)
    async with Outbound(snap, "1") as o:
        ctx = make_context(snap, o)
        await fail("url_not_allowed", FETCHERS["rss"].fetch({"feed_url": server.url("/feed")}, ctx))
        # a file: URL reads only feed files inside files_allowed_roots (tests/test_local_feeds.py)
        await fail("path_not_allowed", FETCHERS["rss"].fetch({"feed_url": "file:///etc/passwd"}, ctx))


# -- common filters and run_fetch --------------------------------------------------------------


async def test_run_fetch_applies_filters_in_order(server, out, tmp_path):
    url = server.script("/feed.xml", FakeResponse(200, RSS20))
    ctx = ctx_for(tmp_path, out)
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    recent = await run_fetch("rss", {"feed_url": url, "timeframe_limit": "72_hours"}, ctx, now=now)
    assert [i.title for i in recent] == ["Newest story", "Middle story"]
    assert (recent.source_count, recent.filtered_out, recent.source_type) == (3, 1, "rss")
    searched = await run_fetch("rss", {"feed_url": url, "search": " MIDDLE , oldest"}, ctx, now=now)
    assert [i.title for i in searched] == ["Middle story", "Oldest story"]
    excluded = await run_fetch("rss", {"feed_url": url, "exclude_keywords": "science, summary"}, ctx, now=now)
    assert [i.title for i in excluded] == ["Newest story", "Oldest story"]  # body text matches, not metadata


def test_filters_are_pure_and_keep_undated_items():
    now = datetime(2026, 5, 1, tzinfo=UTC)
    items = [
        Item("a", "Alpha", "x", "x", published_at=now - timedelta(days=40)),
        Item("b", "Beta", "Rust news", "Rust news", published_at=None),
        Item("c", "Gamma", "<p>python</p>", "python", published_at=now - timedelta(hours=1)),
    ]
    assert [i.identifier for i in apply_filters(items, {"timeframe_limit": "30_days"}, now)] == ["b", "c"]
    assert [i.identifier for i in apply_filters(items, {"timeframe_limit": "all_time"}, now)] == ["a", "b", "c"]
    assert [i.identifier for i in apply_filters(items, {"search": "RUST,python"}, now)] == ["b", "c"]
    assert [i.identifier for i in apply_filters(items, {"search": " , "}, now)] == ["a", "b", "c"]
    assert [i.identifier for i in apply_filters(items, {"exclude_keywords": "alpha"}, now)] == ["b", "c"]
    assert [i.identifier for i in items] == ["a", "b", "c"]  # input untouched


def test_identifier_normalisation_and_html_to_text():
    long = "x" * 256
    assert normalise_identifier(long) == "sha256:" + hashlib.sha256(long.encode()).hexdigest()
    assert normalise_identifier("x" * 255) == "x" * 255
    assert normalise_identifier(None) is None
    assert html_to_text("<p>One&nbsp;two</p><p>Three<br>four</p><style>p{}</style>") == "One two\n\nThree\nfour"
    assert html_to_text("plain") == "plain"


async def test_run_fetch_normalises_long_identifiers(server, out, tmp_path):
    long_id = "https://example.com/" + "a" * 300
    url = server.script("/api", FakeResponse(200, [{"id": long_id, "title": "t"}]))
    (item,) = await run_fetch("http_json", {"url": url}, ctx_for(tmp_path, out))
    assert item.identifier == "sha256:" + hashlib.sha256(long_id.encode()).hexdigest()


def test_item_to_packet_shape_and_truncation():
    item = Item(
        "id-1",
        "Title",
        "B" * (2 * 1024 * 1024),
        "C" * 10,
        source_url="https://x/1",
        published_at=datetime(2026, 5, 1, tzinfo=UTC),
        author="Ada",
    )
    packet = item_to_packet(item, handler="rss", source_type="rss", flow_step_id="2_u_7", pipeline_id=2, flow_id=7)
    assert packet["type"] == "fetch"
    assert len(json.dumps(packet, separators=(",", ":")).encode()) <= 1024 * 1024
    assert packet["metadata"]["truncated"] is True
    meta = packet["metadata"]
    assert meta["item_identifier"] == "id-1" and meta["source_url"] == "https://x/1"
    assert meta["published_at"] == "2026-05-01T00:00:00Z"
    assert meta["_engine_data"] == {"source_type": "rss", "item_identifier": "id-1", "source_url": "https://x/1"}
    small = item_to_packet(
        Item("i", "t", "b", "b"), handler="files", source_type="files", flow_step_id=None, pipeline_id=1, flow_id=1
    )
    assert "truncated" not in small["metadata"]


# -- http_json ---------------------------------------------------------------------------------


async def test_http_json_maps_nested_paths_and_renders_non_strings(server, out, tmp_path):
    document = {
        "data": {
            "pages": [
                {
                    "entries": [
                        {
                            "id": 17,
                            "meta": {"headline": "First"},
                            "text": "<b>Hi</b>",
                            "url": "https://j/1",
                            "when": "2026-05-01T08:00:00Z",
                        },
                        "not an object",
                        {"meta": {"headline": {"nested": [1, 2]}}, "text": 42, "when": 1777622400},
                        ["also", "not"],
                        {"id": "", "meta": {"headline": "No id"}, "text": None, "url": 5, "when": "garbage"},
                    ]
                }
            ]
        }
    }
    url = server.script("/api", FakeResponse(200, document))
    cfg = {
        "url": url + "?key=1",
        "headers": {"X-Api-Key": "k-123", "X-Num": 5},
        "items_path": "data.pages.0.entries",
        "title_field": "meta.headline",
        "body_field": "text",
        "date_field": "when",
    }
    items = await FETCHERS["http_json"].fetch(cfg, ctx_for(tmp_path, out))
    assert items.skipped == {"non_object": 2}
    assert [i.title for i in items] == ["First", '{"nested":[1,2]}', "No id"]
    first, second, third = items
    assert first.identifier == "17" and first.body == "<b>Hi</b>" and first.content_string == "Hi"
    assert first.source_url == "https://j/1"
    assert first.published_at == datetime(2026, 5, 1, 8, 0, tzinfo=UTC)
    assert second.body == "42"
    assert second.published_at == datetime.fromtimestamp(1777622400, UTC)
    element = {"meta": {"headline": {"nested": [1, 2]}}, "text": 42, "when": 1777622400}
    canonical = json.dumps(element, sort_keys=True, separators=(",", ":"))
    assert second.identifier == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    assert third.identifier.startswith("sha256:") and third.body == "" and third.source_url is None
    assert third.published_at is None
    (request,) = server.requests
    assert request.headers["x-api-key"] == "k-123" and request.headers["x-num"] == "5"
    assert request.path == "/api?key=1"


async def test_http_json_root_array_and_defaults(server, out, tmp_path):
    url = server.script("/root", FakeResponse(200, [{"id": "a", "title": "A", "body": "b", "url": "https://a"}]))
    (item,) = await FETCHERS["http_json"].fetch({"url": url}, ctx_for(tmp_path, out))
    assert (item.identifier, item.title, item.body, item.source_url) == ("a", "A", "b", "https://a")


async def test_http_json_invalid_responses(server, out, tmp_path):
    ctx = ctx_for(tmp_path, out)
    not_json = server.script("/html", FakeResponse(200, "<html>"))
    obj = server.script("/obj", FakeResponse(200, {"data": {"items": {"a": 1}}}))
    err = await fail("invalid_response", FETCHERS["http_json"].fetch({"url": not_json}, ctx))
    assert err.diagnostics["body"] == "<html>"
    err = await fail("invalid_response", FETCHERS["http_json"].fetch({"url": obj, "items_path": "data.items"}, ctx))
    assert "data.items" in err.message
    await fail("invalid_response", FETCHERS["http_json"].fetch({"url": obj, "items_path": "data.missing"}, ctx))
    await fail("invalid_response", FETCHERS["http_json"].fetch({"url": obj}, ctx))  # root is an object


# -- files fetch -------------------------------------------------------------------------------


def _touch(path: Path, text: str | bytes, mtime: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, "utf-8")
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def files_root(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    return root


async def test_files_fetch_newest_first_with_front_matter_and_identifiers(files_root, out, tmp_path):
    inbox = files_root / "inbox"
    base = 1_777_000_000
    _touch(inbox / "old.txt", "old text", base)
    note = _touch(
        inbox / "note.md", '---\ntitle: "Front \\"matter\\" title"\nsource_url: https://s/1\n---\n\nBody\n', base + 20
    )
    _touch(inbox / "page.html", "<p>Hello <b>there</b></p>", base + 10)
    _touch(inbox / ".hidden.txt", "hidden", base + 30)
    _touch(inbox / "sub" / "deep.txt", "deep", base + 40)
    items = await FETCHERS["files"].fetch({"directory": str(inbox)}, ctx_for(tmp_path, out))
    assert [i.file_info["path"] for i in items] == ["note.md", "page.html", "old.txt"]
    md, page, old = items
    assert md.title == 'Front "matter" title' and md.body == "Body\n" and md.source_url == "https://s/1"
    st = note.stat()
    digest = hashlib.sha256(f"{st.st_mtime_ns}:{st.st_size}".encode()).hexdigest()[:16]
    assert md.identifier == f"note.md:{digest}"
    assert md.file_info == {
        "path": "note.md",
        "size": st.st_size,
        "mtime": datetime.fromtimestamp(base + 20, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mime_type": "text/markdown",
    }
    assert md.published_at == datetime.fromtimestamp(base + 20, UTC)
    assert page.title == "page" and page.content_string == "Hello there"
    assert old.title == "old" and old.body == "old text"
    deep = await FETCHERS["files"].fetch(
        {"directory": str(inbox), "recursive": True, "pattern": "*.txt"}, ctx_for(tmp_path, out)
    )
    assert [i.file_info["path"] for i in deep] == ["sub/deep.txt", "old.txt"]


async def test_files_changed_file_is_a_new_item(files_root, out, tmp_path):
    path = _touch(files_root / "a.txt", "one", 1_777_000_000)
    (first,) = await FETCHERS["files"].fetch({"directory": str(files_root)}, ctx_for(tmp_path, out))
    _touch(path, "one, changed", 1_777_000_100)
    (second,) = await FETCHERS["files"].fetch({"directory": str(files_root)}, ctx_for(tmp_path, out))
    assert first.identifier != second.identifier and second.identifier.startswith("a.txt:")


async def test_files_fetch_skips_oversized_undecodable_and_outside_symlinks(files_root, out, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    _touch(files_root / "ok.txt", "fine", 1_777_000_000)
    _touch(files_root / "big.txt", "x" * 200, 1_777_000_001)
    _touch(files_root / "latin.txt", "caf\xe9".encode("latin-1"), 1_777_000_002)
    _touch(files_root / "target.txt", "inside target", 1_777_000_003)
    os.symlink(outside / "secret.txt", files_root / "leak.txt")
    os.symlink(files_root / "target.txt", files_root / "alias.txt")
    os.symlink(outside, files_root / "linkdir")
    cfg = {"directory": str(files_root), "max_file_bytes": 100, "recursive": True}
    items = await FETCHERS["files"].fetch(cfg, ctx_for(tmp_path, out))
    assert sorted(i.file_info["path"] for i in items) == ["alias.txt", "ok.txt", "target.txt"]
    assert all("secret" not in i.body for i in items)
    assert items.skipped == {"oversized": 1, "undecodable": 1, "outside_symlink": 1}
    assert any("oversized" not in w and "symlinks" in w for w in items.warnings())
    latin = await FETCHERS["files"].fetch(
        {"directory": str(files_root), "pattern": "latin.*", "encoding": "latin-1"}, ctx_for(tmp_path, out)
    )
    assert [i.body for i in latin] == ["café"]


async def test_files_fetch_path_checks(files_root, out, tmp_path):
    ctx = ctx_for(tmp_path, out)
    err = await fail("file_not_found", FETCHERS["files"].fetch({"directory": str(files_root / "nope")}, ctx))
    assert "nope" in err.message
    await fail("path_not_allowed", FETCHERS["files"].fetch({"directory": str(tmp_path)}, ctx))
    await fail("path_not_allowed", FETCHERS["files"].fetch({"directory": str(files_root / ".." / "x")}, ctx))
    os.symlink(tmp_path, files_root / "escape")
    await fail("path_not_allowed", FETCHERS["files"].fetch({"directory": str(files_root / "escape")}, ctx))
    await fail("path_not_allowed", FETCHERS["files"].fetch({"directory": "relative/dir"}, ctx))
    await fail(
        "handler_config_invalid",
        FETCHERS["files"].fetch({"directory": str(files_root), "encoding": "no-such-codec"}, ctx),
    )


# -- webhook_payload ---------------------------------------------------------------------------


def payload_ctx(tmp_path, out, payload):
    data = {} if payload is None else {"webhook_trigger": {"payload": payload, "received_at": "2026-05-01T00:00:00Z"}}
    return ctx_for(tmp_path, out, engine_data=data)


async def test_webhook_payload_without_payload_gives_no_items(out, tmp_path):
    cfg = {"title_path": "title"}
    assert list(await FETCHERS["webhook_payload"].fetch(cfg, payload_ctx(tmp_path, out, None))) == []


async def test_webhook_payload_single_item_with_template(out, tmp_path):
    payload = {"event": {"id": 99}, "action": "opened", "issue": {"title": "Bug", "body": "<p>Broken</p>", "n": 5}}
    cfg = {
        "title_path": "issue.title",
        "body_path": "issue.body",
        "item_identifier_template": "{event.id}-{action}",
        "metadata": {"number": "issue.n", "event": "event"},
    }
    (item,) = await FETCHERS["webhook_payload"].fetch(cfg, payload_ctx(tmp_path, out, payload))
    assert (item.identifier, item.title, item.body, item.content_string) == (
        "99-opened",
        "Bug",
        "<p>Broken</p>",
        "Broken",
    )
    assert item.metadata == {"number": 5, "event": {"id": 99}}


async def test_webhook_payload_items_path_identifier_path_and_hash(out, tmp_path):
    payload = {"repo": {"id": 3}, "commits": [{"sha": "abc", "message": "one"}, {"message": "two"}]}
    ctx = payload_ctx(tmp_path, out, payload)
    by_path = {"items_path": "commits", "body_path": "message", "identifier_path": "sha", "ignore_missing_paths": True}
    items = await FETCHERS["webhook_payload"].fetch(by_path, ctx)
    assert [(i.identifier, i.body) for i in items] == [("abc", "one")]
    assert items.skipped == {"missing_path": 1}
    hashed = await FETCHERS["webhook_payload"].fetch({"items_path": "commits", "body_path": "message"}, ctx)
    canonical = json.dumps({"message": "two"}, sort_keys=True, separators=(",", ":"))
    assert hashed[1].identifier == "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()
    templated = await FETCHERS["webhook_payload"].fetch(
        {"items_path": "commits", "body_path": "message", "item_identifier_template": "{repo.id}:{message}"}, ctx
    )
    assert [i.identifier for i in templated] == ["3:one", "3:two"]  # falls back to the payload root


async def test_webhook_payload_missing_paths(out, tmp_path):
    ctx = payload_ctx(tmp_path, out, {"a": {"b": 1}})
    err = await fail("payload_path_missing", FETCHERS["webhook_payload"].fetch({"title_path": "a.c"}, ctx))
    assert err.diagnostics == {"path": "a.c"}
    from datamachine_mcp.engine.errors import classify

    assert classify(err) == (False, None)
    await fail("payload_path_missing", FETCHERS["webhook_payload"].fetch({"title_path": "a.b", "items_path": "x"}, ctx))
    await fail(
        "payload_path_missing",
        FETCHERS["webhook_payload"].fetch({"title_path": "a.b", "item_identifier_template": "{nope}"}, ctx),
    )
    ignored = await FETCHERS["webhook_payload"].fetch({"title_path": "a.c", "ignore_missing_paths": True}, ctx)
    assert list(ignored) == []


async def test_webhook_payload_source_type(out, tmp_path):
    ctx = payload_ctx(tmp_path, out, {"t": "x"})
    result = await run_fetch("webhook_payload", {"title_path": "t", "source_type": "github"}, ctx)
    assert result.source_type == "github" and [i.title for i in result] == ["x"]
    assert source_type_for("webhook_payload", {}) == "webhook_payload"
    assert source_type_for("rss", {"source_type": "x"}) == "rss"


# -- config preparation ------------------------------------------------------------------------


def test_with_defaults_applies_defaults_and_validates():
    cfg = with_defaults("http_json", "fetch", {"url": "https://x/api"})
    assert cfg["items_path"] == "" and cfg["title_field"] == "title" and cfg["max_items"] == 1
    assert cfg["timeframe_limit"] == "all_time" and cfg["headers"] is None
    with pytest.raises(StepError) as info:
        with_defaults("http_json", "fetch", {"url": "https://x", "bogus": 1})
    assert info.value.code == "handler_config_invalid" and "bogus" in info.value.message
    with pytest.raises(StepError) as info:
        with_defaults("rss", "fetch", {})
    assert info.value.code == "handler_config_invalid" and "feed_url" in info.value.message
    with pytest.raises(StepError) as info:
        with_defaults("rss", "fetch", {"feed_url": "https://x", "max_items": 500})
    assert info.value.code == "handler_config_invalid"
    with pytest.raises(StepError) as info:
        with_defaults("webhook_payload", "fetch", {"identifier_path": "id"})
    assert info.value.code == "handler_config_invalid"
    with pytest.raises(StepError) as info:
        with_defaults("webhook", "publish", {"url": "https://x", "secret": {"__encrypted__": "v1:abc"}})
    assert info.value.code == "secret_unavailable"
    # Safety of paths and URLs is judged by the handlers (path_not_allowed / url_not_allowed).
    assert with_defaults("files", "publish", {"directory": "/a", "filename_template": "../x"})["overwrite"] is False
    assert with_defaults("webhook", "publish", {"url": "ftp://x"})["url"] == "ftp://x"


def test_prepare_config_decrypts_secrets():
    box = SecretBox(b"k" * 32)
    sealed = {"url": "https://x", "headers": box.encrypt({"X-Key": "s3cret"}, "handler:http_json.headers")}
    cfg = prepare_config("http_json", "fetch", sealed, box)
    assert cfg["headers"] == {"X-Key": "s3cret"}
    wrong = {"url": "https://x", "headers": SecretBox(b"z" * 32).encrypt({"a": 1}, "handler:http_json.headers")}
    with pytest.raises(StepError) as info:
        prepare_config("http_json", "fetch", wrong, box)
    assert info.value.code == "secret_unavailable"
