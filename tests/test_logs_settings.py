"""Logs, settings and whoami (docs/storage.md, datamachine_logs; Settings; Secrets at rest)."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import text

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.abilities.registry import TOOLSETS
from datamachine_mcp.abilities.registry import load_all as load_abilities
from datamachine_mcp.storage.crypto import MASK
from datamachine_mcp.storage.models import LogEntry
from datamachine_mcp.storage.timeutil import iso, utcnow
from tests.conftest import (
    as_token,
    call,
    changed_tables,
    connect,
    count,
    fail,
    log_rows,
    table_rows,
)

pytestmark = pytest.mark.anyio

USER2 = Principal(user_id=2, transport="http")
USER3 = Principal(user_id=3, transport="http")
LEVELS = ["debug", "info", "warning", "error", "critical"]

SPEC_DEFAULTS = {
    "log_level": "info",
    "retention_completed_jobs_days": 30,
    "retention_failed_jobs_days": 30,
    "retention_logs_days": 30,
    "retention_processed_items_days": 30,
    "chat_session_ttl_hours": 24,
    "max_active_jobs": 500,
    "retry_max_attempts": 3,
    "retry_base_seconds": 60,
    "retry_transport_base_seconds": 15,
    "retry_max_delay_seconds": 3600,
    "lease_ttl_seconds": 120,
    "claim_ttl_seconds": 3600,
    "step_timeout_seconds": 900,
    "scheduler_tick_seconds": 5,
    "maintenance_interval_seconds": 30,
    "problem_flow_threshold": 3,
    "admin_user_ids": [1],
    "max_agents_per_user": 1,
    "http_rate_limit_per_minute": 120,
    "default_provider": "",
    "default_model": "",
    "ai_providers": {
        "openai": {"base_url": "https://api.openai.com/v1", "api_key": None},
        "anthropic": {"base_url": "https://api.anthropic.com", "api_key": None, "version": "2023-06-01"},
    },
    "ai_request_timeout_seconds": 120,
    "ai_max_concurrent_requests": 3,
    "http_timeout_seconds": 30,
    "http_max_response_bytes": 10485760,
    "outbound_allow_private_networks": True,
    "webhook_max_body_bytes": 1048576,
    "webhook_rate_limit": {"max": 60, "window": 60},
    "webhook_replay_window_seconds": 300,
    "webhook_gate_default_expiry_hours": 168,
}


async def _unchanged(runtime, client, tool, args, code):
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    assert await table_rows(runtime) == before
    return err


async def _one_denial(runtime, client, tool, args, code):
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    changed = changed_tables(before, await table_rows(runtime))
    assert list(changed) == ["datamachine_logs"] and len(changed["datamachine_logs"][1]) == 1
    assert (await log_rows(runtime))[-1]["message"] == f"{tool} denied: {code}"
    return err


@pytest.fixture
async def bot(owner):
    return await call(owner, "create-agent", {"agent_slug": "bot"})


# --- write-to-log ------------------------------------------------------------------------------


async def test_write_to_log_stores_one_attributed_entry(runtime, owner, bot):
    before = await table_rows(runtime)
    out = await call(
        owner,
        "write-to-log",
        {
            "level": "warning",
            "message": "Feed slow",
            "context": {"agent_id": bot["agent_id"], "job_id": 12, "flow_id": 3, "pipeline_id": "7", "extra": [1]},
        },
    )
    assert out == {"stored": True, "log_id": out["log_id"], "message": "Log entry written"}
    changed = changed_tables(before, await table_rows(runtime))
    assert list(changed) == ["datamachine_logs"] and len(changed["datamachine_logs"][1]) == 1  # no audit row
    row = (await log_rows(runtime))[-1]
    assert row["id"] == out["log_id"]
    assert (row["level"], row["message"], row["user_id"], row["agent_id"]) == (
        "warning",
        "Feed slow",
        1,
        bot["agent_id"],
    )
    # integer ids are promoted to columns; a non-integer one is not
    assert (row["job_id"], row["flow_id"], row["pipeline_id"]) == (12, 3, None)
    assert row["context"] == {
        "agent_id": bot["agent_id"],
        "job_id": 12,
        "flow_id": 3,
        "pipeline_id": "7",
        "extra": [1],
        "actor_user_id": 1,
        "actor_agent_id": None,
        "actor_token_id": None,
        "transport": "stdio",
    }


async def test_write_to_log_agent_comes_from_principal(runtime, owner, bot):
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "operator"})
    bound = await as_token(runtime, user_id=2, agent_slug="bot")
    async with connect(runtime, bound) as c:
        out = await call(c, "write-to-log", {"level": "info", "message": "hello"})
    row = (await log_rows(runtime, f"id={out['log_id']}"))[0]
    assert row["agent_id"] == bot["agent_id"] and row["user_id"] == 2
    assert row["context"]["actor_token_id"] == bound.token_id and row["context"]["transport"] == "http"
    async with connect(runtime, USER3) as c:  # an agent-less entry of one's own user needs no role
        out = await call(c, "write-to-log", {"level": "error", "message": "mine"})
    row = (await log_rows(runtime, f"id={out['log_id']}"))[0]
    assert row["agent_id"] is None and row["user_id"] == 3


@pytest.mark.parametrize("key", ["audit", "ability", "actor_user_id", "actor_agent_id", "actor_token_id", "transport"])
async def test_write_to_log_rejects_reserved_context_keys(runtime, owner, key):
    err = await _unchanged(
        runtime, owner, "write-to-log", {"level": "info", "message": "x", "context": {key: True}}, "invalid_input"
    )
    assert key in err["message"]
    assert err["data"]["errors"] == [{"field": f"context.{key}", "message": "reserved key"}]


async def test_write_to_log_errors(runtime, owner, bot):
    err = await _unchanged(runtime, owner, "write-to-log", {"level": "loud", "message": "x"}, "invalid_level")
    assert err["data"]["errors"][0]["field"] == "level" and "level" in err["message"]
    await _unchanged(runtime, owner, "write-to-log", {"message": "x"}, "invalid_input")  # missing: invalid_input
    await _unchanged(runtime, owner, "write-to-log", {"level": "info", "message": ""}, "invalid_input")
    await _unchanged(runtime, owner, "write-to-log", {"level": "info", "message": "x" * 4001}, "invalid_input")
    big = {"blob": "x" * (65 * 1024)}
    err = await _unchanged(
        runtime, owner, "write-to-log", {"level": "info", "message": "x", "context": big}, "invalid_input"
    )
    assert err["data"]["errors"][0]["field"] == "context"
    huge = {"blob": "x" * (1024 * 1024 + 10)}
    err = await _unchanged(
        runtime, owner, "write-to-log", {"level": "info", "message": "x", "context": huge}, "input_too_large"
    )
    assert err["data"]["field"] == "context" and err["data"]["bytes"] > 1024 * 1024
    await _unchanged(
        runtime,
        owner,
        "write-to-log",
        {"level": "info", "message": "x", "context": {"agent_id": 99}},
        "agent_not_found",
    )
    # operating an agent's log needs operator on it
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "viewer"})
    async with connect(runtime, USER2) as c:
        args = {"level": "info", "message": "x", "context": {"agent_id": bot["agent_id"]}}
        err = await _one_denial(runtime, c, "write-to-log", args, "agent_access_denied")
        assert err["data"]["required_role"] == "operator" and err["data"]["effective_role"] == "viewer"
        await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "operator"})
        assert (await call(c, "write-to-log", args))["stored"] is True


async def test_log_level_threshold_drops_entries_but_never_audit_rows(runtime, owner):
    await call(owner, "update-settings", {"settings": {"log_level": "error"}})
    before = await table_rows(runtime)
    out = await call(owner, "write-to-log", {"level": "warning", "message": "dropped"})
    assert out["stored"] is False and out["log_id"] is None
    assert await table_rows(runtime) == before
    assert (await call(owner, "write-to-log", {"level": "error", "message": "kept"}))["stored"] is True
    await call(owner, "update-settings", {"settings": {"log_level": "critical"}})
    n = await count(runtime, "datamachine_logs")
    await call(owner, "create-agent", {"agent_slug": "audited"})
    assert await count(runtime, "datamachine_logs") == n + 1  # info audit row despite log_level critical


# --- read-logs ---------------------------------------------------------------------------------


async def _seed_logs(runtime, rows):
    """Insert log rows directly (created_at controlled), returns their ids in order."""
    entries = [LogEntry(**{"context": None, **r}) for r in rows]
    async with runtime.db.write() as s:
        s.add_all(entries)
        await s.flush()
        return [e.id for e in entries]


async def test_read_logs_filters_order_and_paging(runtime, owner, bot):
    t0 = utcnow().replace(microsecond=0) - timedelta(hours=5)
    aid = bot["agent_id"]
    ids = await _seed_logs(
        runtime,
        [
            {"level": "debug", "message": "alpha 100%", "created_at": t0, "job_id": 12, "agent_id": aid},
            {"level": "info", "message": "Beta", "created_at": t0 + timedelta(hours=1), "job_id": 123, "flow_id": 4},
            {"level": "warning", "message": "gamma_x", "created_at": t0 + timedelta(hours=2), "pipeline_id": 9},
            {"level": "error", "message": "delta", "created_at": t0 + timedelta(hours=2), "agent_id": aid},
            {
                "level": "critical",
                "message": "audit-ish",
                "created_at": t0 + timedelta(hours=3),
                "context": {"audit": True},
            },
        ],
    )
    # the create-agent audit row also exists (newest); use search/time filters to isolate seeded rows
    window = {"since": iso(t0), "before": iso(t0 + timedelta(hours=3))}
    out = await call(owner, "read-logs", window)
    assert [i["id"] for i in out["items"]] == [ids[4], ids[3], ids[2], ids[1], ids[0]]  # created_at DESC, id DESC
    assert out["total"] == 5 and out["per_page"] == 50 and out["offset"] == 0
    item = out["items"][-1]
    assert set(item) == {
        "id",
        "agent_id",
        "user_id",
        "job_id",
        "flow_id",
        "pipeline_id",
        "level",
        "message",
        "context",
        "created_at",
    }
    assert item["created_at"] == iso(t0) and item["created_at"].endswith("Z")

    async def ids_for(**filters):
        return [i["id"] for i in (await call(owner, "read-logs", {**window, **filters}))["items"]]

    assert await ids_for(level="warning") == [ids[2]]
    assert await ids_for(min_level="error") == [ids[4], ids[3]]
    assert await ids_for(job_id=12) == [ids[0]]  # exact match, not 123
    assert await ids_for(flow_id=4) == [ids[1]]
    assert await ids_for(pipeline_id=9) == [ids[2]]
    assert await ids_for(agent_id=aid) == [ids[3], ids[0]]
    assert await ids_for(search="BETA") == [ids[1]]
    assert await ids_for(search="100%") == [ids[0]]
    assert await ids_for(search="a_x") == [ids[2]]  # _ is literal, not a wildcard
    assert await ids_for(audit_only=True) == [ids[4]]
    assert await ids_for(since=iso(t0 + timedelta(hours=2)), before=iso(t0 + timedelta(hours=2))) == [ids[3], ids[2]]
    assert await ids_for(
        since="2000-01-01 00:00:00", before=(t0 + timedelta(minutes=1)).strftime("%Y-%m-%d %H:%M:%S")
    ) == [ids[0]]
    page = await call(owner, "read-logs", {**window, "per_page": 2, "offset": 2})
    assert [i["id"] for i in page["items"]] == [ids[2], ids[1]] and page["total"] == 5
    # audit_only over everything includes the create-agent audit row
    audits = await call(owner, "read-logs", {"audit_only": True})
    assert {i["message"] for i in audits["items"]} == {"audit-ish", "create-agent: agent 'bot' created (owner 1)"}


async def test_read_logs_scoping(runtime, owner, bot):
    other = await call(owner, "create-agent", {"agent_slug": "other"})
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2})
    now = utcnow()
    ids = await _seed_logs(
        runtime,
        [
            {"level": "info", "message": "bot row", "created_at": now, "agent_id": bot["agent_id"]},
            {"level": "info", "message": "other row", "created_at": now, "agent_id": other["agent_id"]},
            {"level": "info", "message": "user2 own", "created_at": now, "user_id": 2},
            {"level": "info", "message": "user3 own", "created_at": now, "user_id": 3},
            {"level": "info", "message": "system", "created_at": now},
        ],
    )
    async with connect(runtime, USER2) as c:
        seen = await call(c, "read-logs", {})
        visible = {i["id"] for i in seen["items"]}
        assert ids[0] in visible and ids[2] in visible
        assert not visible & {ids[1], ids[3], ids[4]}
        assert seen["total"] == len(seen["items"])  # total counted over the readable rows
        # the grant's own audit row (agent bot) is readable by the agent's viewers
        assert any(i["message"].startswith("grant-agent-access") for i in seen["items"])
        meta = await call(c, "get-log-metadata", {})
        assert meta["total_entries"] == seen["total"]
        err = await _one_denial(runtime, c, "read-logs", {"agent_id": other["agent_id"]}, "agent_access_denied")
        assert err["data"]["required_role"] == "viewer"
        await _one_denial(runtime, c, "get-log-metadata", {"agent_id": other["agent_id"]}, "agent_access_denied")
        await _unchanged(runtime, c, "read-logs", {"agent_id": 999}, "agent_not_found")
    everything = await call(owner, "read-logs", {"per_page": 500})
    assert {ids[1], ids[3], ids[4]} <= {i["id"] for i in everything["items"]}


async def test_read_logs_of_a_deleted_agent_stay_readable_for_admins(runtime, owner, bot):
    aid = bot["agent_id"]
    await call(owner, "write-to-log", {"level": "info", "message": "before delete", "context": {"agent_id": aid}})
    await call(owner, "delete-agent", {"agent_id": aid})
    out = await call(owner, "read-logs", {"agent_id": aid})
    assert [i["message"] for i in out["items"]] == [
        "delete-agent: agent 'bot' deleted",
        "before delete",
        "create-agent: agent 'bot' created (owner 1)",
    ]
    assert (await call(owner, "get-log-metadata", {"agent_id": aid}))["total_entries"] == 3
    async with connect(runtime, USER2) as c:  # others still get a clear error
        await _unchanged(runtime, c, "read-logs", {"agent_id": aid}, "agent_not_found")


# --- get-log-metadata --------------------------------------------------------------------------


async def test_get_log_metadata(runtime, owner, bot):
    first = await call(owner, "get-log-metadata", {"agent_id": bot["agent_id"]})
    assert first["total_entries"] == 1  # the create-agent audit row
    t0 = utcnow().replace(microsecond=0) - timedelta(days=2)
    await _seed_logs(
        runtime,
        [
            {"level": "debug", "message": "a", "created_at": t0, "agent_id": bot["agent_id"]},
            {"level": "error", "message": "b", "created_at": t0 + timedelta(days=1), "agent_id": bot["agent_id"]},
            {"level": "error", "message": "c", "created_at": t0 - timedelta(days=1)},
        ],
    )
    meta = await call(owner, "get-log-metadata", {"agent_id": bot["agent_id"]})
    assert set(meta) == {"total_entries", "oldest", "newest", "level_counts"}
    assert meta["total_entries"] == 3
    assert meta["level_counts"] == {"debug": 1, "info": 1, "warning": 0, "error": 1, "critical": 0}
    assert meta["oldest"] == iso(t0)
    assert meta["newest"] > iso(t0 + timedelta(days=1))
    everything = await call(owner, "get-log-metadata", {})
    assert everything["total_entries"] == 4 and everything["oldest"] == iso(t0 - timedelta(days=1))
    async with connect(runtime, USER3) as c:
        none = await call(c, "get-log-metadata", {})
    assert none == {
        "total_entries": 0,
        "oldest": None,
        "newest": None,
        "level_counts": dict.fromkeys(LEVELS, 0),
    }


# --- clear-logs --------------------------------------------------------------------------------


async def test_clear_logs_for_one_agent_and_all(runtime, owner, bot):
    other = await call(owner, "create-agent", {"agent_slug": "other"})
    for aid in (bot["agent_id"], bot["agent_id"], other["agent_id"]):
        await call(owner, "write-to-log", {"level": "info", "message": "m", "context": {"agent_id": aid}})
    bot_rows = await count(runtime, "datamachine_logs", f"agent_id={bot['agent_id']}")
    total = await count(runtime, "datamachine_logs")
    out = await call(owner, "clear-logs", {"agent_id": bot["agent_id"]})
    assert out == {"deleted": bot_rows, "message": "Logs cleared successfully"}
    remaining = await log_rows(runtime, f"agent_id={bot['agent_id']}")
    assert len(remaining) == 1  # the clear's own audit row, written after the delete
    assert remaining[0]["context"]["ability"] == "clear-logs" and remaining[0]["context"]["deleted"] == bot_rows
    assert await count(runtime, "datamachine_logs") == total - bot_rows + 1

    n = await count(runtime, "datamachine_logs")
    out = await call(owner, "clear-logs", {})
    assert out["deleted"] == n
    rows = await log_rows(runtime)
    assert len(rows) == 1 and rows[0]["context"]["target"] == {"type": "logs", "id": "all"}


async def test_clear_logs_errors(runtime, owner, bot):
    await _unchanged(runtime, owner, "clear-logs", {"agent_id": 999}, "agent_not_found")
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "operator"})
    async with connect(runtime, USER2) as c:
        await _one_denial(runtime, c, "clear-logs", {}, "permission_denied")
        err = await _one_denial(runtime, c, "clear-logs", {"agent_id": bot["agent_id"]}, "agent_access_denied")
        assert err["data"]["required_role"] == "admin"
        await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "admin"})
        assert (await call(c, "clear-logs", {"agent_id": bot["agent_id"]}))["deleted"] >= 1


# --- get-settings / update-settings ------------------------------------------------------------


async def test_get_settings_lists_exactly_the_documented_keys(runtime, owner):
    out = await call(owner, "get-settings", {})
    assert set(out) == {"settings", "defaults", "updated_at"}
    roots = out["settings"].pop("files_allowed_roots")
    defaults_roots = out["defaults"].pop("files_allowed_roots")
    assert out["settings"] == SPEC_DEFAULTS
    assert out["defaults"] == SPEC_DEFAULTS
    assert roots == defaults_roots == [str(runtime.data_dir / "files")]
    assert out["updated_at"] == {}
    assert "maintenance_last_retention_at" not in out["settings"]
    await call(owner, "update-settings", {"settings": {"retention_logs_days": 7}})
    again = await call(owner, "get-settings", {})
    assert again["settings"]["retention_logs_days"] == 7 and again["defaults"]["retention_logs_days"] == 30
    assert list(again["updated_at"]) == ["retention_logs_days"] and again["updated_at"]["retention_logs_days"].endswith(
        "Z"
    )


async def test_update_settings_and_clamping(runtime, owner):
    out = await call(
        owner,
        "update-settings",
        {
            "settings": {
                "retry_max_attempts": 50,
                "lease_ttl_seconds": 1,
                "retention_logs_days": 7,
                "webhook_rate_limit": {"max": 100000},
                "default_provider": "anthropic",
            }
        },
    )
    assert set(out) == {"updated_keys", "adjusted", "settings", "message"}
    assert out["message"] == "Settings saved successfully."
    assert sorted(out["updated_keys"]) == sorted(
        ["retry_max_attempts", "lease_ttl_seconds", "retention_logs_days", "webhook_rate_limit", "default_provider"]
    )
    assert out["adjusted"] == {
        "retry_max_attempts": 10,
        "lease_ttl_seconds": 15,
        "webhook_rate_limit": {"max": 10000, "window": 60},
    }
    assert out["settings"]["retry_max_attempts"] == 10
    assert out["settings"]["webhook_rate_limit"] == {"max": 10000, "window": 60}  # merged key by key
    assert out["settings"] == (await call(owner, "get-settings", {}))["settings"]
    audit = (await log_rows(runtime))[-1]
    assert audit["context"]["ability"] == "update-settings"
    assert sorted(audit["context"]["changes"]) == sorted(out["updated_keys"])
    # the same values again change nothing and write nothing
    before = await table_rows(runtime)
    same = await call(owner, "update-settings", {"settings": {"retention_logs_days": 7}})
    assert same["updated_keys"] == [] and same["adjusted"] == {}
    assert await table_rows(runtime) == before


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"retention_log_days": 7}, "retention_log_days"),
        ({"maintenance_last_retention_at": "2020-01-01"}, "maintenance_last_retention_at"),
        ({"retention_logs_days": "7"}, "retention_logs_days"),
        ({"retention_logs_days": True}, "retention_logs_days"),
        ({"log_level": "verbose"}, "log_level"),
        ({"outbound_allow_private_networks": "no"}, "outbound_allow_private_networks"),
        ({"ai_providers": {"mistral": {"api_key": "k"}}}, "ai_providers"),
        ({"ai_providers": {"openai": {"base_url": "ftp://example.com"}}}, "ai_providers"),
        ({"ai_providers": {"openai": {"base_url": "not a url"}}}, "ai_providers"),
        ({"admin_user_ids": []}, "admin_user_ids"),
        ({"admin_user_ids": [0]}, "admin_user_ids"),
        ({"default_provider": "skynet"}, "default_provider"),
        ({"retention_logs_days": 7, "bogus": 1}, "bogus"),
    ],
)
async def test_update_settings_invalid_setting(runtime, owner, settings, key):
    err = await _unchanged(runtime, owner, "update-settings", {"settings": settings}, "invalid_setting")
    assert err["data"]["key"] == key
    assert err["data"]["message"] == err["message"]


async def test_api_key_is_write_only_masked_and_encrypted(runtime, owner):
    out = await call(owner, "update-settings", {"settings": {"ai_providers": {"openai": {"api_key": "sk-secret-123"}}}})
    assert out["updated_keys"] == ["ai_providers"]
    openai = out["settings"]["ai_providers"]["openai"]
    assert openai == {"base_url": "https://api.openai.com/v1", "api_key": MASK}  # base_url kept
    assert out["settings"]["ai_providers"]["anthropic"]["api_key"] is None

    async def stored():
        async with runtime.db.read() as s:
            row = (
                await s.execute(text("SELECT value, is_secret FROM datamachine_settings WHERE key = 'ai_providers'"))
            ).one()
        value = json.loads(row.value) if isinstance(row.value, str) else row.value
        return value, bool(row.is_secret)

    value, secret = await stored()
    envelope = value["openai"]["api_key"]
    assert set(envelope) == {"__encrypted__"} and envelope["__encrypted__"].startswith("v1:")
    assert secret is True
    assert "sk-secret-123" not in repr(await table_rows(runtime))  # not in settings, not in audit rows
    async with runtime.db.read() as s:
        live = await runtime.settings.snapshot(s, fresh=True)
    assert runtime.settings.decrypt_api_key(live, "openai") == "sk-secret-123"

    # writing the mask back (a client that read and re-submits) keeps the stored envelope
    before = await table_rows(runtime)
    same = await call(
        owner,
        "update-settings",
        {"settings": {"ai_providers": {"openai": {"api_key": MASK, "base_url": "https://api.openai.com/v1"}}}},
    )
    assert same["updated_keys"] == []
    assert await table_rows(runtime) == before
    assert (await stored())[0]["openai"]["api_key"] == envelope
    assert (await call(owner, "get-settings", {}))["settings"]["ai_providers"]["openai"]["api_key"] == MASK

    # other fields change independently; null removes a field (it reads as its default)
    moved = await call(
        owner, "update-settings", {"settings": {"ai_providers": {"openai": {"base_url": "http://127.0.0.1:8080/v1/"}}}}
    )
    assert moved["settings"]["ai_providers"]["openai"] == {"base_url": "http://127.0.0.1:8080/v1", "api_key": MASK}
    removed = await call(
        owner, "update-settings", {"settings": {"ai_providers": {"openai": {"api_key": None, "base_url": None}}}}
    )
    assert removed["settings"]["ai_providers"]["openai"] == {"base_url": "https://api.openai.com/v1", "api_key": None}
    assert (await stored())[1] is False


async def test_settings_need_a_global_admin(runtime, owner):
    await call(owner, "update-settings", {"settings": {"admin_user_ids": [1, 5]}})
    async with connect(runtime, USER2) as c:
        await _one_denial(runtime, c, "get-settings", {}, "permission_denied")
        await _one_denial(runtime, c, "update-settings", {"settings": {"log_level": "debug"}}, "permission_denied")
    # user 5 became a global administrator through the setting (tokens resolve is_admin from it)
    admin5 = await as_token(runtime, user_id=5)
    assert admin5.is_admin is True
    async with connect(runtime, admin5) as c:
        assert (await call(c, "get-settings", {}))["settings"]["admin_user_ids"] == [1, 5]
    # ... and a narrowed token of an administrator is not one
    narrowed = await as_token(runtime, user_id=5, capabilities=["manage"])
    async with connect(runtime, narrowed) as c:
        await _one_denial(runtime, c, "get-settings", {}, "permission_denied")


# --- whoami ------------------------------------------------------------------------------------


async def test_whoami(runtime, owner, bot):
    out = await call(owner, "whoami", {})
    assert out == {
        "user_id": 1,
        "agent_id": None,
        "agent_slug": None,
        "is_admin": True,
        "capabilities": None,
        "token_prefix": None,
        "transport": "stdio",
        "toolsets": [t for t in TOOLSETS if any(a.toolset == t for a in load_abilities().values())],
        "enabled": ["all"],
        "not_listed": [],
        "enable_hint": None,
        "read_only": False,
        "server_version": runtime.version,
    }
    token = await as_token(
        runtime, user_id=2, agent_slug="bot", capabilities=["toolset:agents", "read", "toolset:system"]
    )
    before = await table_rows(runtime)
    async with connect(runtime, token) as c:
        me = await call(c, "whoami", {})
    assert await table_rows(runtime) == before  # read-only: nothing written
    assert me["user_id"] == 2 and me["agent_id"] == bot["agent_id"] and me["agent_slug"] == "bot"
    assert me["is_admin"] is False and me["transport"] == "http"
    assert me["capabilities"] == ["read", "toolset:agents", "toolset:system"]
    assert me["token_prefix"] == token.token_prefix and me["token_prefix"].startswith("dm_bot_")
    assert me["toolsets"] == ["agents", "system"]
    async with connect(runtime, USER2) as c:
        toolsets = (await call(c, "whoami", {}))["toolsets"]
    assert "settings" not in toolsets and {"agents", "logs", "system"} <= set(toolsets)
