"""test-handler: a dry run of a fetch handler against local fake servers and files."""

from __future__ import annotations

import pytest

from datamachine_mcp.abilities.access import Principal
from tests.conftest import call, connect, count, fail, table_rows
from tests.fake_servers import FakeResponse, serve
from tests.feeds import RSS_HEADERS, ident, rss
from tests.jobs_support import denied, dirs, grant, make_agent, make_flow, publish_step, settings, write_items

pytestmark = pytest.mark.anyio

USER2 = Principal(user_id=2, transport="http")
LONG = "word " * 100


@pytest.fixture
def fake():
    with serve() as server:
        yield server


def feed(fake, *items, path="/feed.xml"):
    return fake.script(path, FakeResponse(200, rss(*items), RSS_HEADERS))


async def test_compact_preview_of_a_feed_writes_nothing(runtime, owner, fake):
    url = feed(fake, ("a", "Alpha", f"<p>{LONG}</p>"), ("b", "Beta"), ("c", "Gamma"))
    before = await table_rows(runtime)
    out = await call(
        owner, "test-handler", {"handler_slug": "rss", "config": {"feed_url": url, "max_items": 0}, "limit": 2}
    )
    assert await table_rows(runtime) == before
    assert out["handler_slug"] == "rss" and out["handler_label"] and out["output_mode"] == "compact"
    assert out["packet_count"] == 3
    assert "Showing 2 of 3 packets." in out["warnings"]
    assert [p["title"] for p in out["packets"]] == ["Alpha", "Beta"]
    first = out["packets"][0]
    assert first["content_preview"] == LONG.strip()[:200] + "..."
    assert first["source_url"] == "https://example.test/a"
    assert first["metadata"]["item_identifier"] == ident("a") and first["metadata"]["source_type"] == "rss"
    assert not any(k.startswith("_") for k in first["metadata"])
    assert out["packets"][1]["content_preview"] == "Body of Beta."
    assert out["config_used"]["feed_url"] == url and out["config_used"]["max_items"] == 0
    assert out["config_used"]["timeframe_limit"] == "all_time"
    assert isinstance(out["execution_time_ms"], int) and "truncation" not in out
    assert len(fake.to("/feed.xml")) == 1


async def test_max_items_and_filters_apply_as_in_a_run(owner, fake):
    url = feed(fake, ("a", "Alpha news"), ("b", "Beta news"), ("c", "Gamma sport"))
    out = await call(owner, "test-handler", {"handler_slug": "rss", "config": {"feed_url": url}})
    assert out["packet_count"] == 1 and [p["title"] for p in out["packets"]] == ["Alpha news"]
    assert any("max_items 1" in w for w in out["warnings"])
    out = await call(
        owner,
        "test-handler",
        {
            "handler_slug": "rss",
            "config": {"feed_url": url, "max_items": 0, "search": "news", "exclude_keywords": "beta"},
        },
    )
    assert [p["title"] for p in out["packets"]] == ["Alpha news"]
    assert any("removed by" in w for w in out["warnings"])


async def test_raw_mode_full_packets_caps_max_items_and_bytes(owner, fake):
    big = "x" * 1500
    url = feed(fake, *[(f"id{i}", f"Item {i}", big) for i in range(6)])
    out = await call(
        owner,
        "test-handler",
        {"handler_slug": "rss", "config": {"feed_url": url, "max_items": 0}, "output_mode": "raw", "limit": 4},
    )
    assert out["config_used"]["max_items"] == 4  # raw mode caps max_items at limit
    assert out["packet_count"] == 4 and len(out["packets"]) == 4
    packet = out["packets"][0]
    assert packet["type"] == "fetch" and packet["data"]["body"] == big and packet["data"]["title"] == "Item 0"
    assert packet["metadata"]["item_identifier"] == ident("id0") and packet["metadata"]["handler"] == "rss"
    assert out["truncation"] == {
        "truncated": False,
        "reasons": [],
        "returned_packet_count": 4,
        "omitted_packet_count": 0,
        "returned_bytes": out["truncation"]["returned_bytes"],
    }
    small = await call(
        owner,
        "test-handler",
        {
            "handler_slug": "rss",
            "config": {"feed_url": url, "max_items": 0},
            "output_mode": "raw",
            "limit": 0,
            "byte_limit": 4096,
        },
    )
    trunc = small["truncation"]
    assert small["packet_count"] == 6 and len(small["packets"]) == 1
    assert trunc["truncated"] and trunc["reasons"] == ["byte_limit"]
    assert trunc["returned_packet_count"] == 1 and trunc["omitted_packet_count"] == 5
    assert 3000 < trunc["returned_bytes"] <= 4096
    huge = feed(fake, ("h", "Huge", "y" * 5000), path="/huge.xml")
    none = await call(
        owner,
        "test-handler",
        {"handler_slug": "rss", "config": {"feed_url": huge}, "output_mode": "raw", "byte_limit": 4096},
    )
    assert none["packet_count"] == 1 and none["packets"] == []
    assert none["truncation"]["reasons"] == ["byte_limit"] and none["truncation"]["omitted_packet_count"] == 1
    assert "Showing 1 of 6 packets." in small["warnings"]


async def test_flow_config_is_used_and_overridden_key_by_key_without_dedup(runtime, owner):
    inbox, outbox = dirs(runtime)
    write_items(inbox, "one", "two")
    (inbox / "notes.txt").write_text("plain text note")
    flow = await make_flow(
        owner,
        [
            {
                "step_type": "fetch",
                "handler_slugs": ["files"],
                "handler_configs": {"files": {"directory": str(inbox), "pattern": "*.md", "max_items": 0}},
            },
            publish_step(outbox),
        ],
    )
    fsid = flow["flow_step_ids"][0]
    out = await call(owner, "test-handler", {"flow_id": flow["flow_id"]})
    assert out["handler_slug"] == "files" and out["packet_count"] == 2
    assert sorted(p["title"] for p in out["packets"]) == ["One", "Two"]
    assert out["packets"][0]["metadata"]["flow_id"] == flow["flow_id"]
    assert out["packets"][0]["metadata"]["flow_step_id"] == fsid
    # Processed items are not read: an item marked processed still shows; and none are written.
    ident = out["packets"][0]["metadata"]["item_identifier"]
    await call(owner, "mark-processed", {"flow_step_id": fsid, "source_type": "files", "item_identifier": ident})
    rows = await count(runtime, "datamachine_processed_items")
    again = await call(owner, "test-handler", {"flow_id": flow["flow_id"], "handler_slug": "files"})
    assert again["packet_count"] == 2
    assert await count(runtime, "datamachine_processed_items") == rows
    assert await count(runtime, "datamachine_jobs") == 0
    # config overrides key by key: pattern replaced, directory kept; null removes a key (default back).
    txt = await call(owner, "test-handler", {"flow_id": flow["flow_id"], "config": {"pattern": "*.txt"}})
    assert [p["title"] for p in txt["packets"]] == ["notes"] and txt["config_used"]["directory"] == str(inbox)
    default = await call(owner, "test-handler", {"flow_id": flow["flow_id"], "config": {"max_items": None}})
    assert default["config_used"]["max_items"] == 1 and default["packet_count"] == 1


async def test_secret_fields_are_decrypted_for_the_request_and_masked_in_the_output(owner, fake):
    url = fake.script("/api", FakeResponse(200, [{"id": 1, "title": "T", "body": "B"}]))
    flow = await make_flow(
        owner,
        [
            {
                "step_type": "fetch",
                "handler_slugs": ["http_json"],
                "handler_configs": {"http_json": {"url": url, "headers": {"X-Api-Key": "sekret"}}},
            },
            {"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {}}},
        ],
    )
    out = await call(owner, "test-handler", {"flow_id": flow["flow_id"]})
    assert out["packet_count"] == 1 and out["config_used"]["headers"] == "********"
    assert fake.to("/api")[-1].headers["x-api-key"] == "sekret"
    # "********" in the override keeps the stored secret
    await call(owner, "test-handler", {"flow_id": flow["flow_id"], "config": {"headers": "********"}})
    assert fake.to("/api")[-1].headers["x-api-key"] == "sekret"


async def test_webhook_payload_has_no_payload_here(owner):
    out = await call(owner, "test-handler", {"handler_slug": "webhook_payload", "config": {"title_path": "title"}})
    assert out["packet_count"] == 0 and out["packets"] == []


async def test_argument_and_config_errors(runtime, owner):
    before = await table_rows(runtime)
    await fail(owner, "test-handler", {}, "handler_slug_required")
    await fail(owner, "test-handler", {"handler_slug": "  "}, "handler_slug_required")
    err = await fail(owner, "test-handler", {"handler_slug": "nope"}, "handler_not_found")
    assert err["data"]["handler_slug"] == "nope"
    err = await fail(owner, "test-handler", {"handler_slug": "wordpress"}, "invalid_handler")
    assert err["message"].startswith("test-handler supports fetch handlers only")
    err = await fail(owner, "test-handler", {"handler_slug": "rss", "config": {}}, "invalid_handler_config")
    assert err["data"]["missing_fields"] == ["feed_url"]
    err = await fail(
        owner,
        "test-handler",
        {"handler_slug": "rss", "config": {"feed_url": "http://x", "bogus": 1}},
        "invalid_handler_config",
    )
    assert err["data"]["unknown_fields"] == ["bogus"]
    err = await fail(owner, "test-handler", {"handler_slug": "files", "config": {"directory": "/etc"}})
    assert err["code"] == "invalid_handler_config" and err["data"]["field_errors"][0]["field"] == "directory"
    await fail(owner, "test-handler", {"flow_id": 999}, "handler_flow_invalid")
    for bad, field in (
        ({"limit": 101}, "limit"),
        ({"output_mode": "full"}, "output_mode"),
        ({"byte_limit": 100}, "byte_limit"),
        ({"flow_id": "1.0"}, "flow_id"),
        ({"extra": 1}, "extra"),
    ):
        err = await fail(owner, "test-handler", {"handler_slug": "rss", **bad}, "invalid_input")
        assert err["data"]["errors"][0]["field"] == field
    assert await table_rows(runtime) == before


async def test_flow_without_fetch_step_or_with_another_handler(runtime, owner):
    inbox, outbox = dirs(runtime)
    no_fetch = await make_flow(
        owner, [{"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {}}}], name="E"
    )
    err = await fail(owner, "test-handler", {"flow_id": no_fetch["flow_id"]}, "handler_flow_invalid")
    assert err["data"]["flow_id"] == no_fetch["flow_id"]
    files = await make_flow(
        owner,
        [
            {"step_type": "fetch", "handler_slugs": ["files"], "handler_configs": {"files": {"directory": str(inbox)}}},
            publish_step(outbox),
        ],
    )
    err = await fail(
        owner, "test-handler", {"flow_id": files["flow_id"], "handler_slug": "rss"}, "handler_flow_invalid"
    )
    assert err["data"]["handler_slug"] == "files"


async def test_handler_errors_carry_message_and_time(runtime, owner, fake):
    missing = fake.script("/gone", FakeResponse(404, "no"))
    err = await fail(owner, "test-handler", {"handler_slug": "rss", "config": {"feed_url": missing}}, "http_not_found")
    assert set(err["data"]) == {"message", "execution_time_ms"} and err["data"]["message"] == err["message"]
    html = fake.script("/html", FakeResponse(200, "<html><body>not a feed</body></html>"))
    await fail(owner, "test-handler", {"handler_slug": "rss", "config": {"feed_url": html}}, "invalid_response")
    inbox, _ = dirs(runtime)
    await fail(
        owner,
        "test-handler",
        {"handler_slug": "files", "config": {"directory": str(inbox / "absent")}},
        "file_not_found",
    )
    await settings(owner, outbound_allow_private_networks=False)
    before = await table_rows(runtime)
    ok = feed(fake, ("a", "A"))
    err = await fail(owner, "test-handler", {"handler_slug": "rss", "config": {"feed_url": ok}}, "url_not_allowed")
    assert err["data"]["execution_time_ms"] >= 0
    assert await table_rows(runtime) == before


async def test_roles(runtime, owner, fake):
    url = feed(fake, ("a", "A"))
    args = {"handler_slug": "rss", "config": {"feed_url": url}}
    agent = await make_agent(owner, "news")
    _, outbox = dirs(runtime)
    flow = await make_flow(
        owner,
        [
            {"step_type": "fetch", "handler_slugs": ["rss"], "handler_configs": {"rss": {"feed_url": url}}},
            publish_step(outbox),
        ],
        agent_id=agent,
    )
    async with connect(runtime, USER2) as user2:
        # no agents at all: refused without flow_id
        await denied(runtime, user2, "test-handler", args, "permission_denied")
        await denied(runtime, user2, "test-handler", {"flow_id": flow["flow_id"]})
        await grant(owner, agent, 2, "viewer")
        await denied(runtime, user2, "test-handler", args, "permission_denied")
        await denied(runtime, user2, "test-handler", {"flow_id": flow["flow_id"]})
        await grant(owner, agent, 2, "operator")
        assert (await call(user2, "test-handler", args))["packet_count"] == 1
        assert (await call(user2, "test-handler", {"flow_id": flow["flow_id"]}))["packet_count"] == 1
