"""Chat toolset without send-chat-message (docs/storage.md, datamachine_chat_sessions)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta

import pytest
from mcp.shared.exceptions import MCPError
from sqlalchemy import select, update

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.engine.chat_cleanup import delete_expired_sessions
from datamachine_mcp.server.errors import RESOURCE_NOT_FOUND
from datamachine_mcp.storage.models import ChatSession
from datamachine_mcp.storage.timeutil import parse_datetime, utcnow
from tests.conftest import as_token, call, connect, count, fail, log_rows, table_rows

pytestmark = [pytest.mark.anyio, pytest.mark.backends]

USER2 = Principal(user_id=2, transport="http")
USER3 = Principal(user_id=3, transport="http")
SESSION_KEYS = {
    "session_id",
    "user_id",
    "agent_id",
    "title",
    "context",
    "provider",
    "model",
    "metadata",
    "last_read_at",
    "created_at",
    "updated_at",
    "expires_at",
}


async def unchanged(runtime, client, tool, args, code):
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    assert await table_rows(runtime) == before
    return err


def hours_between(a: str, b: str) -> float:
    return (parse_datetime(b) - parse_datetime(a)).total_seconds() / 3600


async def set_updated(runtime, session_id: str, **values) -> None:
    async with runtime.db.write() as s:
        await s.execute(update(ChatSession).where(ChatSession.session_id == session_id).values(**values))


# --- create-chat-session ------------------------------------------------------------------------


async def test_create_session_defaults_metadata_and_expiry(runtime, owner):
    out = await call(
        owner,
        "create-chat-session",
        {"metadata": {"topic": "x", "started_at": "forged", "message_count": 9}, "source": "mcp", "title": "  Hi  "},
    )
    assert set(out) == {"session_id", "session"}
    session = out["session"]
    assert set(session) == SESSION_KEYS
    assert str(uuid.UUID(out["session_id"], version=4)) == out["session_id"] == session["session_id"]
    assert session["user_id"] == 1 and session["agent_id"] is None and session["context"] == "chat"
    assert session["title"] == "Hi"
    meta = session["metadata"]
    assert meta["topic"] == "x" and meta["source"] == "mcp" and meta["message_count"] == 0
    assert meta["started_at"] == meta["last_activity"] == session["created_at"]
    assert session["last_read_at"] is None
    assert hours_between(session["updated_at"], session["expires_at"]) == 24
    audit = [r for r in await log_rows(runtime) if r["context"].get("ability") == "create-chat-session"]
    assert len(audit) == 1 and audit[0]["context"]["target"] == {"type": "chat_session", "id": out["session_id"]}

    await call(owner, "update-settings", {"settings": {"chat_session_ttl_hours": 0}})
    never = await call(owner, "create-chat-session", {"context": "pipeline", "provider": "openai", "model": "m"})
    assert never["session"]["expires_at"] is None
    assert (never["session"]["provider"], never["session"]["model"], never["session"]["context"]) == (
        "openai",
        "m",
        "pipeline",
    )


async def test_create_session_with_agents(runtime, owner):
    bot = await call(owner, "create-agent", {"agent_slug": "bot"})
    await call(owner, "create-agent", {"agent_slug": "other"})
    by_slug = await call(owner, "create-chat-session", {"agent_slug": "bot"})
    assert by_slug["session"]["agent_id"] == bot["agent_id"]
    await unchanged(runtime, owner, "create-chat-session", {"agent_slug": "ghost"}, "agent_not_found")
    await unchanged(runtime, owner, "create-chat-session", {"agent_id": 99}, "agent_not_found")
    await unchanged(
        runtime,
        owner,
        "create-chat-session",
        {"agent_id": bot["agent_id"], "agent_slug": "other"},
        "agent_identity_mismatch",
    )
    async with connect(runtime, USER2) as c:
        err = await fail(c, "create-chat-session", {"agent_slug": "bot"}, "agent_access_denied")
        assert err["data"]["required_role"] == "viewer"
        await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "viewer"})
        mine = await call(c, "create-chat-session", {"agent_slug": "bot"})
        assert mine["session"]["user_id"] == 2
    # an agent-bound principal creates sessions with its agent, and only with it
    bound = await as_token(runtime, user_id=2, agent_slug="bot", capabilities=["read"])
    async with connect(runtime, bound) as c:
        out = await call(c, "create-chat-session", {})
        assert out["session"]["agent_id"] == bot["agent_id"]
        await fail(c, "create-chat-session", {"agent_slug": "other"}, "agent_access_denied")
    await call(owner, "update-agent", {"agent_slug": "bot", "status": "inactive"})
    await unchanged(runtime, owner, "create-chat-session", {"agent_slug": "bot"}, "agent_inactive")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"title": "t" * 101}, "title"),
        ({"context": "email"}, "context"),
        ({"provider": "p" * 51}, "provider"),
        ({"agent_id": 0}, "agent_id"),
        ({"metadata": "x"}, "metadata"),
        ({"metadata": {"blob": "x" * 70000}}, "metadata"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_create_session_bad_input(runtime, owner, args, field):
    err = await unchanged(runtime, owner, "create-chat-session", args, "invalid_input")
    assert field in {e["field"] for e in err["data"]["errors"]}


# --- get / resource -----------------------------------------------------------------------------


async def test_get_session_is_private(runtime, owner):
    async with connect(runtime, USER2) as c:
        sid = (await call(c, "create-chat-session", {"title": "mine"}))["session_id"]
        await call(
            c, "update-chat-session", {"session_id": sid, "append_messages": [{"role": "user", "content": "hi"}]}
        )
        got = await call(c, "get-chat-session", {"session_id": f" {sid} "})
        assert set(got) == SESSION_KEYS | {"conversation"}
        assert [(m["role"], m["content"]) for m in got["conversation"]] == [("user", "hi")]
        assert got["conversation"][0]["metadata"]["timestamp"].endswith("Z")
        err = await fail(c, "get-chat-session", {"session_id": sid, "user_id": 1}, "permission_denied")
        assert err["data"]["required_role"] == "global_admin"
    async with connect(runtime, USER3) as c:
        err = await unchanged(runtime, c, "get-chat-session", {"session_id": sid}, "session_not_found")
        assert err["data"] == {"session_id": sid}
    # a global admin reads it only by naming its user
    await unchanged(runtime, owner, "get-chat-session", {"session_id": sid}, "session_not_found")
    assert (await call(owner, "get-chat-session", {"session_id": sid, "user_id": 2}))["title"] == "mine"
    await unchanged(runtime, owner, "get-chat-session", {"session_id": str(uuid.uuid4())}, "session_not_found")
    await unchanged(runtime, owner, "get-chat-session", {"session_id": sid, "user_id": "2.0"}, "invalid_input")
    await unchanged(runtime, owner, "get-chat-session", {}, "invalid_input")


async def test_chat_resource_is_the_get_twin(runtime, owner):
    sid = (await call(owner, "create-chat-session", {"title": "r"}))["session_id"]
    result = await owner.read_resource(f"datamachine://chat/{sid}", cache_mode="bypass")
    assert json.loads(result.contents[0].text) == await call(owner, "get-chat-session", {"session_id": sid})
    templates = {t.uri_template for t in (await owner.list_resource_templates()).resource_templates}
    assert "datamachine://chat/{session_id}" in templates
    async with connect(runtime, USER2) as c:
        with pytest.raises(MCPError) as exc:
            await c.read_resource(f"datamachine://chat/{sid}", cache_mode="bypass")
        assert exc.value.code == RESOURCE_NOT_FOUND


# --- list-chat-sessions -------------------------------------------------------------------------


async def test_list_sessions_order_unread_and_filters(runtime, owner):
    bot = await call(owner, "create-agent", {"agent_slug": "bot", "agent_name": "Bot"})
    a = (await call(owner, "create-chat-session", {"agent_slug": "bot"}))["session_id"]
    b = (await call(owner, "create-chat-session", {"context": "system"}))["session_id"]
    c = (await call(owner, "create-chat-session", {}))["session_id"]
    long_text = "word " * 40
    await call(
        owner,
        "update-chat-session",
        {
            "session_id": a,
            "append_messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": long_text},
                {"role": "assistant", "content": "one"},
                {"role": "assistant", "content": "call", "metadata": {"type": "tool_call"}},
                {"role": "tool", "content": "result", "metadata": {"type": "tool_result"}},
                {"role": "assistant", "content": "two"},
            ],
        },
    )
    base = utcnow()
    await set_updated(runtime, a, updated_at=base - timedelta(minutes=1))
    await set_updated(runtime, b, updated_at=base - timedelta(minutes=5))
    await set_updated(runtime, c, updated_at=base - timedelta(minutes=1))
    out = await call(owner, "list-chat-sessions", {})
    assert (out["total"], out["per_page"], out["offset"]) == (3, 20, 0)
    assert [s["session_id"] for s in out["sessions"]] == [*sorted([a, c]), b]  # ties by session id
    row = next(s for s in out["sessions"] if s["session_id"] == a)
    assert row["agent_slug"] == "bot" and row["agent_name"] == "Bot" and row["agent_id"] == bot["agent_id"]
    assert row["first_message"] == long_text[:100]
    assert row["message_count"] == 6 and row["unread_count"] == 2
    assert row["title"] == " ".join(long_text.split())[:97] + "..."
    empty = next(s for s in out["sessions"] if s["session_id"] == b)
    assert empty["first_message"] is None and empty["unread_count"] == 0 and empty["agent_slug"] is None
    page = await call(owner, "list-chat-sessions", {"per_page": 1, "offset": 2})
    assert [s["session_id"] for s in page["sessions"]] == [b] and page["total"] == 3
    assert [s["session_id"] for s in (await call(owner, "list-chat-sessions", {"agent_id": 1}))["sessions"]] == [a]
    assert [s["session_id"] for s in (await call(owner, "list-chat-sessions", {"context": "system"}))["sessions"]] == [
        b
    ]
    await fail(owner, "list-chat-sessions", {"per_page": 101}, "invalid_input")
    await fail(owner, "list-chat-sessions", {"context": "other"}, "invalid_input")
    async with connect(runtime, USER2) as c2:
        assert (await call(c2, "list-chat-sessions", {}))["total"] == 0
        await fail(c2, "list-chat-sessions", {"user_id": 1}, "permission_denied")
        assert (await call(c2, "list-chat-sessions", {"user_id": 2}))["total"] == 0
    assert (await call(owner, "list-chat-sessions", {"user_id": 2}))["total"] == 0


async def test_agent_bound_principals_see_only_their_agents_sessions(runtime, owner):
    await call(owner, "create-agent", {"agent_slug": "bot"})
    await call(owner, "create-agent", {"agent_slug": "other"})
    in_bot = (await call(owner, "create-chat-session", {"agent_slug": "bot"}))["session_id"]
    in_other = (await call(owner, "create-chat-session", {"agent_slug": "other"}))["session_id"]
    plain = (await call(owner, "create-chat-session", {}))["session_id"]
    bound = await as_token(runtime, user_id=1, agent_slug="bot")
    async with connect(runtime, bound) as c:
        listed = await call(c, "list-chat-sessions", {})
        assert [s["session_id"] for s in listed["sessions"]] == [in_bot]
        assert (await call(c, "get-chat-session", {"session_id": in_bot}))["session_id"] == in_bot
        for sid in (in_other, plain):
            await fail(c, "get-chat-session", {"session_id": sid}, "session_not_found")
            await fail(c, "delete-chat-session", {"session_id": sid}, "session_not_found")


# --- update-chat-session ------------------------------------------------------------------------


async def test_update_appends_and_slides_expiry(runtime, owner):
    created = (await call(owner, "create-chat-session", {"metadata": {"keep": 1, "drop": 2}}))["session"]
    sid = created["session_id"]
    await set_updated(runtime, sid, updated_at=utcnow() - timedelta(hours=3))
    out = await call(
        owner,
        "update-chat-session",
        {
            "session_id": sid,
            "append_messages": [
                {"role": "user", "content": "  Hello   there\nfriend  "},
                {"role": "assistant", "content": "Hi", "metadata": {"timestamp": "2030-01-01T00:00:00Z", "x": 1}},
            ],
            "metadata": {"drop": None, "new": "v"},
            "provider": "anthropic",
            "expected_message_count": 0,
        },
    )
    assert out["appended"] == 2 and out["message_count"] == 2
    assert out["updated_fields"] == ["metadata", "messages", "title", "provider"]
    assert hours_between(out["updated_at"], out["expires_at"]) == 24
    assert abs((parse_datetime(out["updated_at"]) - utcnow()).total_seconds()) < 60  # was 3 hours ago
    got = await call(owner, "get-chat-session", {"session_id": sid})
    assert got["title"] == "Hello there friend"
    assert got["provider"] == "anthropic"
    meta = got["metadata"]
    assert meta["keep"] == 1 and "drop" not in meta and meta["new"] == "v"
    assert meta["message_count"] == 2 and meta["last_activity"] == out["updated_at"]
    assert meta["started_at"] == created["metadata"]["started_at"]
    assert got["conversation"][1]["metadata"] == {"timestamp": "2030-01-01T00:00:00Z", "x": 1}
    audit = [r for r in await log_rows(runtime) if r["context"].get("ability") == "update-chat-session"]
    assert len(audit) == 1 and audit[0]["context"]["changes"] == out["updated_fields"]
    assert "Hello" not in json.dumps(audit[0])  # chat text never enters audit rows

    # title "" clears; a later user message does not retitle a session in the same call that clears it
    cleared = await call(owner, "update-chat-session", {"session_id": sid, "title": ""})
    assert cleared["updated_fields"] == ["title"]
    assert (await call(owner, "get-chat-session", {"session_id": sid}))["title"] is None
    # an unchanged value is a no-op: no audit row, timestamps kept
    before = await table_rows(runtime)
    same = await call(owner, "update-chat-session", {"session_id": sid, "provider": "anthropic"})
    assert same["updated_fields"] == [] and same["appended"] == 0
    assert await table_rows(runtime) == before


async def test_update_errors(runtime, owner):
    sid = (await call(owner, "create-chat-session", {}))["session_id"]
    await unchanged(runtime, owner, "update-chat-session", {"session_id": sid}, "invalid_session_update")
    await unchanged(
        runtime,
        owner,
        "update-chat-session",
        {"session_id": sid, "expected_message_count": 0},
        "invalid_session_update",
    )
    err = await unchanged(
        runtime,
        owner,
        "update-chat-session",
        {"session_id": sid, "title": "x", "expected_message_count": 3},
        "session_conflict",
    )
    assert err["data"] == {"message_count": 0}
    err = await unchanged(
        runtime, owner, "update-chat-session", {"session_id": sid, "metadata": {"message_count": 5}}, "invalid_input"
    )
    assert err["data"]["errors"] == [{"field": "metadata.message_count", "message": "maintained by the server"}]
    for bad in (
        {"append_messages": []},
        {"append_messages": [{"role": "user", "content": "x"}] * 101},
        {"append_messages": [{"role": "robot", "content": "x"}]},
        {"append_messages": [{"role": "user", "content": "x" * 100001}]},
        {"append_messages": [{"role": "user"}]},
        {"title": "t" * 101},
        {"expected_message_count": -1},
        {"model": "m" * 101},
    ):
        await unchanged(runtime, owner, "update-chat-session", {"session_id": sid, **bad}, "invalid_input")
    async with connect(runtime, USER2) as c:
        await unchanged(runtime, c, "update-chat-session", {"session_id": sid, "title": "mine"}, "session_not_found")
    await call(owner, "create-agent", {"agent_slug": "bot"})
    bot_sid = (await call(owner, "create-chat-session", {"agent_slug": "bot"}))["session_id"]
    await call(owner, "update-agent", {"agent_slug": "bot", "status": "inactive"})
    await unchanged(runtime, owner, "update-chat-session", {"session_id": bot_sid, "title": "x"}, "agent_inactive")
    await unchanged(runtime, owner, "mark-session-read", {"session_id": bot_sid}, "agent_inactive")
    await unchanged(runtime, owner, "delete-chat-session", {"session_id": bot_sid}, "agent_inactive")
    assert (await call(owner, "get-chat-session", {"session_id": bot_sid}))["agent_id"] is not None


# --- delete / mark read -------------------------------------------------------------------------


async def test_delete_session(runtime, owner):
    async with connect(runtime, USER2) as c:
        mine = (await call(c, "create-chat-session", {}))["session_id"]
        other = (await call(c, "create-chat-session", {}))["session_id"]
        await fail(c, "delete-chat-session", {"session_id": mine, "user_id": 3}, "permission_denied")
        assert await call(c, "delete-chat-session", {"session_id": mine}) == {"session_id": mine, "deleted": True}
        await unchanged(runtime, c, "delete-chat-session", {"session_id": mine}, "session_not_found")
    async with connect(runtime, USER3) as c:
        await unchanged(runtime, c, "delete-chat-session", {"session_id": other}, "session_not_found")
    await unchanged(runtime, owner, "delete-chat-session", {"session_id": other}, "session_not_found")
    assert (await call(owner, "delete-chat-session", {"session_id": other, "user_id": 2}))["deleted"] is True
    assert await count(runtime, "datamachine_chat_sessions") == 0
    audit = [r for r in await log_rows(runtime, "level='info'") if r["context"].get("ability") == "delete-chat-session"]
    assert [r["user_id"] for r in audit] == [2, 1]


async def test_mark_session_read_resets_unread(runtime, owner):
    created = (await call(owner, "create-chat-session", {}))["session"]
    sid = created["session_id"]
    reply = {"session_id": sid, "append_messages": [{"role": "assistant", "content": "a"}]}
    await call(owner, "update-chat-session", reply)
    updated = await call(owner, "get-chat-session", {"session_id": sid})

    async def unread() -> int:
        return (await call(owner, "list-chat-sessions", {}))["sessions"][0]["unread_count"]

    assert await unread() == 1
    out = await call(owner, "mark-session-read", {"session_id": sid})
    assert set(out) == {"session_id", "last_read_at"} and out["session_id"] == sid
    after = await call(owner, "get-chat-session", {"session_id": sid})
    assert after["last_read_at"] == out["last_read_at"]
    assert (after["updated_at"], after["expires_at"]) == (updated["updated_at"], updated["expires_at"])
    assert await unread() == 0
    # a reply stamped after the read time is unread again
    later = (utcnow() + timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    reply["append_messages"][0]["metadata"] = {"timestamp": later}
    await call(owner, "update-chat-session", reply)
    assert await unread() == 1
    async with connect(runtime, USER2) as c:
        await unchanged(runtime, c, "mark-session-read", {"session_id": sid}, "session_not_found")
    await unchanged(runtime, owner, "mark-session-read", {"session_id": sid, "user_id": 1}, "invalid_input")


# --- expiry cleanup -----------------------------------------------------------------------------


async def test_delete_expired_sessions_in_batches(runtime, owner):
    ids = [(await call(owner, "create-chat-session", {}))["session_id"] for _ in range(6)]
    now = utcnow()
    for sid in ids[:5]:
        await set_updated(runtime, sid, expires_at=now - timedelta(minutes=1))
    await set_updated(runtime, ids[5], expires_at=None)
    keeper = (await call(owner, "create-chat-session", {}))["session_id"]
    assert await delete_expired_sessions(runtime.db, batch=2) == 5
    async with runtime.db.read() as s:
        left = set((await s.execute(select(ChatSession.session_id))).scalars())
    assert left == {ids[5], keeper}
    assert await delete_expired_sessions(runtime.db) == 0
    # a session expires once its sliding window has passed
    assert await delete_expired_sessions(runtime.db, now=now + timedelta(hours=25)) == 1
