"""Role enforcement with real tokens, inactive agents, denial and audit rows (docs/access.md)."""

from __future__ import annotations

import pytest
from mcp import Client

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.abilities.registry import load_all as load_abilities
from datamachine_mcp.abilities.tokens import TokenRejected
from datamachine_mcp.resources.registry import load_all as load_resources
from datamachine_mcp.server.app import DataMachineServer
from datamachine_mcp.server.bootstrap import ProcessConfig, StartupError, stdio_identity
from tests.conftest import (
    OWNER,
    as_token,
    call,
    changed_tables,
    connect,
    count,
    fail,
    log_rows,
    mint_token,
    table_rows,
    token_principal,
)

pytestmark = pytest.mark.anyio

USER2 = Principal(user_id=2, transport="http")
AUDIT_KEYS = {"audit", "ability", "actor_user_id", "actor_agent_id", "actor_token_id", "transport", "target"}
DENIAL_KEYS = {"audit", "ability", "reason_code", "required_role", "effective_role"}


async def _denied(runtime, client, tool, args, code):
    """Refused: exactly one warning row (its own transaction), nothing else written."""
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    changed = changed_tables(before, await table_rows(runtime))
    assert list(changed) == ["datamachine_logs"], changed
    removed, added = changed["datamachine_logs"]
    assert removed == [] and len(added) == 1
    row = (await log_rows(runtime))[-1]
    assert row["level"] == "warning"
    assert row["message"] == f"{tool} denied: {code}"
    ctx = row["context"]
    assert set(ctx) >= DENIAL_KEYS
    assert ctx["audit"] is True and ctx["ability"] == tool and ctx["reason_code"] == code
    assert ctx["required_role"] == err["data"]["required_role"]
    assert ctx["effective_role"] == err["data"]["effective_role"]
    return err, row


async def _nothing_written(runtime, client, tool, args, code):
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    assert await table_rows(runtime) == before
    return err


@pytest.fixture
async def bot(owner):
    return await call(owner, "create-agent", {"agent_slug": "bot"})


async def _token_for_role(runtime, owner, user_id, role, **kwargs):
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": user_id, "role": role})
    return await as_token(runtime, user_id=user_id, agent_slug="bot", **kwargs)


# --- roles with real tokens --------------------------------------------------------------------


async def test_viewer_token_cannot_grant(runtime, owner, bot):
    viewer = await _token_for_role(runtime, owner, 2, "viewer")
    async with connect(runtime, viewer) as c:
        assert (await call(c, "get-agent", {"agent_slug": "bot"}))["agent"]["caller_role"] == "viewer"
        err, row = await _denied(
            runtime, c, "grant-agent-access", {"agent_slug": "bot", "user_id": 9}, "agent_access_denied"
        )
    assert err["data"] == {"required_role": "admin", "effective_role": "viewer", "agent": "bot"}
    assert "admin" in err["message"] and "viewer" in err["message"]
    ctx = row["context"]
    assert ctx["actor_user_id"] == 2 and ctx["actor_agent_id"] == bot["agent_id"]
    assert ctx["actor_token_id"] == viewer.token_id and ctx["transport"] == "http"
    assert ctx["target"] == {"type": "agent", "id": bot["agent_id"]}
    assert row["agent_id"] == bot["agent_id"] and row["user_id"] == 2


async def test_operator_token_cannot_delete_but_admin_can(runtime, owner, bot):
    operator = await _token_for_role(runtime, owner, 2, "operator")
    async with connect(runtime, operator) as c:
        err, _ = await _denied(runtime, c, "delete-agent", {"agent_slug": "bot"}, "agent_access_denied")
        assert err["data"]["effective_role"] == "operator"
        # operators may write to the agent's log
        assert (await call(c, "write-to-log", {"level": "info", "message": "ran"}))["stored"] is True
    admin = await _token_for_role(runtime, owner, 3, "admin")
    async with connect(runtime, admin) as c:
        granted = await call(c, "grant-agent-access", {"agent_slug": "bot", "user_id": 4, "role": "operator"})
        assert granted["created"] is True
        assert (await call(c, "delete-agent", {"agent_slug": "bot"}))["agent_id"] == bot["agent_id"]


async def test_read_scope_token_gets_permission_denied(runtime, owner, bot):
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "admin"})
    reader = await as_token(runtime, user_id=2, capabilities=["read"])
    async with connect(runtime, reader) as c:
        err, row = await _denied(
            runtime, c, "update-agent", {"agent_slug": "bot", "agent_name": "x"}, "permission_denied"
        )
        assert "whoami" in err["message"]
        assert row["context"]["actor_token_id"] == reader.token_id
        # reads stay allowed, capped at viewer
        assert (await call(c, "get-agent", {"agent_slug": "bot"}))["agent"]["caller_role"] == "viewer"


async def test_ceiling_is_checked_before_role(runtime, owner, bot):
    """A read token without any role on the agent gets permission_denied, not agent_access_denied."""
    reader = await as_token(runtime, user_id=2, capabilities=["read"])
    async with connect(runtime, reader) as c:
        await _denied(runtime, c, "delete-agent", {"agent_slug": "bot"}, "permission_denied")
        await _denied(runtime, c, "get-agent", {"agent_slug": "bot"}, "agent_access_denied")


async def test_agent_bound_tokens_are_confined_even_for_admins(runtime, owner, bot):
    await call(owner, "create-agent", {"agent_slug": "other"})
    bound_admin = await as_token(runtime, user_id=1, agent_slug="bot")
    assert bound_admin.is_admin is True
    async with connect(runtime, bound_admin) as c:
        assert (await call(c, "get-agent", {"agent_slug": "bot"}))["agent"]["caller_role"] == "admin"
        err, _ = await _denied(runtime, c, "get-agent", {"agent_slug": "other"}, "agent_access_denied")
        assert err["data"]["effective_role"] is None
        await _denied(runtime, c, "update-agent", {"agent_slug": "other", "agent_name": "x"}, "agent_access_denied")


# --- inactive agents ---------------------------------------------------------------------------


async def test_inactive_agent_is_frozen_except_update_by_global_admin(runtime, owner, bot):
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "admin"})
    bot_token = await mint_token(runtime, user_id=2, agent_slug="bot")
    aid = bot["agent_id"]
    # an admin of the agent may deactivate it
    async with connect(runtime, USER2) as c:
        out = await call(c, "update-agent", {"agent_slug": "bot", "status": "inactive"})
    assert out["agent"]["status"] == "inactive"

    changes = [
        ("update-agent", {"agent_slug": "bot", "agent_name": "x"}),
        ("rename-agent", {"old_slug": "bot", "new_slug": "bot2"}),
        ("delete-agent", {"agent_slug": "bot"}),
        ("grant-agent-access", {"agent_slug": "bot", "user_id": 5}),
        ("revoke-agent-access", {"agent_slug": "bot", "user_id": 2}),
        ("create-agent-token", {"agent_slug": "bot"}),
        ("write-to-log", {"level": "info", "message": "x", "context": {"agent_id": aid}}),
        ("clear-logs", {"agent_id": aid}),
    ]
    async with connect(runtime, USER2) as c:
        for tool, args in changes:
            err = await _nothing_written(runtime, c, tool, args, "agent_inactive")
            assert err["data"]["agent_id"] == aid
        # reads stay possible
        assert (await call(c, "get-agent", {"agent_slug": "bot"}))["agent"]["status"] == "inactive"
        assert (await call(c, "list-agent-access", {"agent_slug": "bot"}))["total"] == 2
        assert (await call(c, "read-logs", {"agent_id": aid}))["total"] >= 1
    async with connect(runtime, OWNER) as c:  # global administrators included ...
        for tool, args in changes[1:]:
            await _nothing_written(runtime, c, tool, args, "agent_inactive")

    # its tokens are rejected, with a warning row naming the token
    with pytest.raises(TokenRejected) as exc:
        await token_principal(runtime, bot_token["raw_token"])
    assert exc.value.reason == "agent_inactive"
    row = (await log_rows(runtime))[-1]
    assert row["level"] == "warning" and row["context"]["token_id"] == bot_token["token_id"]

    # ... except update-agent by a global administrator, which can reactivate it
    async with connect(runtime, OWNER) as c:
        renamed = await call(c, "update-agent", {"agent_slug": "bot", "agent_name": "Frozen bot"})
        assert renamed["updated_fields"] == ["agent_name"]
        back = await call(c, "update-agent", {"agent_slug": "bot", "status": "active"})
    assert back["agent"]["status"] == "active"
    assert (await token_principal(runtime, bot_token["raw_token"])).agent_id == aid
    async with connect(runtime, USER2) as c:
        assert (await call(c, "grant-agent-access", {"agent_slug": "bot", "user_id": 5}))["created"] is True


async def test_role_check_precedes_inactive_check(runtime, owner, bot):
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "viewer"})
    await call(owner, "update-agent", {"agent_slug": "bot", "status": "inactive"})
    async with connect(runtime, USER2) as c:
        await _denied(runtime, c, "delete-agent", {"agent_slug": "bot"}, "agent_access_denied")


async def test_revoking_a_token_of_an_inactive_agent_stays_possible(runtime, owner, bot):
    """Revocation is the kill switch: it must not require reactivating (and so reviving) the agent's tokens."""
    tok = await mint_token(runtime, user_id=1, agent_slug="bot")
    await call(owner, "update-agent", {"agent_slug": "bot", "status": "inactive"})
    out = await call(owner, "revoke-agent-token", {"token_id": tok["token_id"]})
    assert out["changed"] is True
    await call(owner, "update-agent", {"agent_slug": "bot", "status": "active"})
    with pytest.raises(TokenRejected):
        await token_principal(runtime, tok["raw_token"])


# --- audit rows ----------------------------------------------------------------------------------


MUTATIONS = [
    ("create-agent", {"agent_slug": "fresh"}, ("agent", 2), 2),
    ("update-agent", {"agent_slug": "bot", "agent_name": "Bot"}, ("agent", 1), 1),
    ("rename-agent", {"old_slug": "bot", "new_slug": "bot-two"}, ("agent", 1), 1),
    ("delete-agent", {"agent_slug": "bot"}, ("agent", 1), 1),
    ("grant-agent-access", {"agent_slug": "bot", "user_id": 7}, ("agent_access", "1:7"), 1),
    ("revoke-agent-access", {"agent_slug": "bot", "user_id": 2}, ("agent_access", "1:2"), 1),
    ("create-agent-token", {"agent_slug": "bot"}, ("agent_token", 3), 1),
    ("revoke-agent-token", {"token_id": 1}, ("agent_token", 1), 1),
    ("clear-logs", {"agent_id": 1}, ("agent", 1), 1),
    ("clear-logs", {}, ("logs", "all"), None),
    ("update-settings", {"settings": {"retention_logs_days": 9}}, ("settings", "global"), None),
]


@pytest.mark.parametrize(
    ("tool", "args", "target", "agent_id"), MUTATIONS, ids=[m[0] + str(i) for i, m in enumerate(MUTATIONS)]
)
async def test_each_successful_mutation_writes_exactly_one_audit_row(runtime, owner, bot, tool, args, target, agent_id):
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2})
    await mint_token(runtime, user_id=1, agent_slug="bot")
    caller = await as_token(runtime, user_id=1)  # a user token: actor_token_id is recorded
    async with connect(runtime, caller) as c:
        ids_before = {r["id"] for r in await log_rows(runtime)}
        await call(c, tool, args)
    new = [r for r in await log_rows(runtime) if r["id"] not in ids_before]
    assert len(new) == 1, new
    row = new[0]
    assert row["level"] == "info" and row["message"].startswith(f"{tool}: ")
    assert row["user_id"] == 1 and row["agent_id"] == agent_id
    ctx = row["context"]
    assert set(ctx) >= AUDIT_KEYS
    assert ctx["audit"] is True and ctx["ability"] == tool
    assert (ctx["actor_user_id"], ctx["actor_agent_id"], ctx["actor_token_id"], ctx["transport"]) == (
        1,
        None,
        caller.token_id,
        "http",
    )
    assert ctx["target"] == {"type": target[0], "id": target[1]}
    assert "request_id" in ctx


async def test_read_only_calls_write_nothing(runtime, owner, bot):
    await mint_token(runtime, user_id=1, agent_slug="bot")
    reads = [
        ("get-agent", {"agent_slug": "bot"}),
        ("list-agents", {"scope": "all", "include_role": True}),
        ("list-agent-access", {"agent_slug": "bot"}),
        ("list-agent-tokens", {"agent_slug": "bot", "include_inactive": True}),
        ("read-logs", {"audit_only": True}),
        ("get-log-metadata", {}),
        ("get-settings", {}),
        ("whoami", {}),
    ]
    before = await table_rows(runtime)
    for tool, args in reads:
        await call(owner, tool, args)
    assert await table_rows(runtime) == before


async def test_write_to_log_writes_only_its_own_entry(runtime, owner):
    before = await count(runtime, "datamachine_logs")
    out = await call(owner, "write-to-log", {"level": "info", "message": "just me"})
    assert await count(runtime, "datamachine_logs") == before + 1
    row = (await log_rows(runtime))[-1]
    assert row["id"] == out["log_id"] and "audit" not in row["context"]
    assert {k: row["context"][k] for k in ("actor_user_id", "actor_agent_id", "actor_token_id", "transport")} == {
        "actor_user_id": 1,
        "actor_agent_id": None,
        "actor_token_id": None,
        "transport": "stdio",
    }


async def test_failed_business_checks_write_nothing(runtime, owner, bot):
    await _nothing_written(runtime, owner, "create-agent", {"agent_slug": "bot"}, "agent_slug_conflict")
    await _nothing_written(runtime, owner, "update-agent", {"agent_slug": "bot"}, "invalid_agent_update")
    await _nothing_written(
        runtime, owner, "revoke-agent-access", {"agent_slug": "bot", "user_id": 9}, "grant_not_found"
    )


# --- stdio identity ----------------------------------------------------------------------------


def _server(runtime, resolver):
    return DataMachineServer(runtime, load_abilities(), load_resources(), resolver)


async def test_stdio_token_is_reverified_on_every_call(runtime, owner, bot, tmp_path):
    tok = await mint_token(runtime, user_id=2, agent_slug="bot")
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "admin"})
    cfg = ProcessConfig(db=str(tmp_path / "dm.db"), data_dir=tmp_path, token=tok["raw_token"])
    app = _server(runtime, await stdio_identity(runtime, cfg))
    async with Client(app.server, mode="legacy") as c:
        me = await call(c, "whoami", {})
        assert (me["user_id"], me["agent_slug"], me["transport"]) == (2, "bot", "stdio")
        await call(owner, "revoke-agent-token", {"token_id": tok["token_id"]})
        err = await fail(c, "whoami", {}, "unauthenticated")
    assert err["message"] == "token revoked or expired"


async def test_stdio_identity_startup_errors(runtime, owner, bot, tmp_path):
    base = {"db": str(tmp_path / "dm.db"), "data_dir": tmp_path}
    with pytest.raises(StartupError, match="names no agent"):
        await stdio_identity(runtime, ProcessConfig(**base, agent="ghost"))
    tok = await mint_token(runtime, user_id=1)
    with pytest.raises(StartupError, match="--agent cannot be combined with --token"):
        await stdio_identity(runtime, ProcessConfig(**base, agent="bot", token=tok["raw_token"]))
    with pytest.raises(StartupError, match="rejected"):
        await stdio_identity(runtime, ProcessConfig(**base, token="dm_bot_" + "0" * 64))
    resolve = await stdio_identity(runtime, ProcessConfig(**base, agent="bot", local_user=4))
    p = await resolve(None)
    assert (p.user_id, p.agent_id, p.agent_slug, p.is_admin, p.transport) == (4, bot["agent_id"], "bot", True, "stdio")
