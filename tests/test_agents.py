"""Agents toolset: create, get, list, update, rename and delete agents (docs/access.md, New resources)."""

from __future__ import annotations

import pytest

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.abilities.tokens import TokenRejected
from datamachine_mcp.storage.models import ChatSession, Flow, Job, Pipeline
from datamachine_mcp.storage.timeutil import utcnow
from tests.conftest import (
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
USER3 = Principal(user_id=3, transport="http")


async def _unchanged(runtime, client, tool, args, code):
    """The call fails with ``code`` and writes nothing at all."""
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    assert await table_rows(runtime) == before
    return err


# --- create-agent ------------------------------------------------------------------------------


async def test_create_agent_sanitises_slug_and_bootstraps_owner_grant(runtime, owner):
    out = await call(
        owner,
        "create-agent",
        {
            "agent_slug": "  <b>Héllo</b> Wörld.v2  ",
            "agent_config": {"provider": "openai", "model": "gpt-4o-mini", "description": "Digest", "x": 1},
        },
    )
    assert out["agent_slug"] == "hello-world-v2"
    assert out["agent_name"] == "hello-world-v2"  # defaults to the slug
    assert out["owner_id"] == 1
    assert out["status"] == "active"
    assert out["agent_config"] == {
        "default_provider": "openai",
        "default_model": "gpt-4o-mini",
        "description": "Digest",
        "x": 1,
    }
    assert set(out) == {"agent_id", "agent_slug", "agent_name", "owner_id", "status", "agent_config", "message"}
    grants = await call(owner, "list-agent-access", {"agent_id": out["agent_id"]})
    assert [(g["user_id"], g["role"], g["is_owner"]) for g in grants["grants"]] == [(1, "admin", True)]
    audit = await log_rows(runtime)
    assert len(audit) == 1
    assert audit[0]["context"]["ability"] == "create-agent"
    assert audit[0]["agent_id"] == out["agent_id"]


async def test_create_agent_trims_name(owner):
    out = await call(owner, "create-agent", {"agent_slug": "bot", "agent_name": "  News Bot  "})
    assert out["agent_name"] == "News Bot"


@pytest.mark.parametrize(
    ("slug", "fragment"),
    [
        ("", "Agent slug is required."),
        ("   ", "Agent slug is required."),
        ("!!!", "Agent slug is required."),
        ("_hidden", "start with a letter or digit"),
        ("a" * 201, "1-200 characters"),
    ],
)
async def test_create_agent_invalid_slug(runtime, owner, slug, fragment):
    err = await _unchanged(runtime, owner, "create-agent", {"agent_slug": slug}, "invalid_agent_slug")
    assert fragment in err["message"]


async def test_create_agent_slug_conflict(runtime, owner):
    first = await call(owner, "create-agent", {"agent_slug": "news-bot"})
    err = await _unchanged(runtime, owner, "create-agent", {"agent_slug": "News Bot"}, "agent_slug_conflict")
    assert err["message"] == f'Agent with slug "news-bot" already exists (ID: {first["agent_id"]}).'
    assert err["data"]["existing_agent_id"] == first["agent_id"]


async def test_global_admin_may_set_owner(runtime, owner):
    out = await call(owner, "create-agent", {"agent_slug": "for-seven", "owner_id": 7})
    assert out["owner_id"] == 7
    assert await count(runtime, "datamachine_agent_access", f"agent_id={out['agent_id']} AND user_id=7") == 1
    assert await count(runtime, "datamachine_agent_access", f"agent_id={out['agent_id']} AND user_id=1") == 0


async def test_non_admin_owner_id_is_replaced_by_own_user(runtime):
    async with connect(runtime, USER2) as c:
        out = await call(c, "create-agent", {"agent_slug": "mine", "owner_id": 9})
    assert out["owner_id"] == 2
    assert await count(runtime, "datamachine_agent_access", "user_id=2 AND role='admin'") == 1
    assert await count(runtime, "datamachine_agent_access", "user_id=9") == 0


async def test_agent_limit_reached_for_non_admins(runtime, owner):
    async with connect(runtime, USER2) as c:
        await call(c, "create-agent", {"agent_slug": "first", "agent_name": "First Bot"})
        err = await _unchanged(runtime, c, "create-agent", {"agent_slug": "second"}, "agent_limit_reached")
        assert err["message"] == 'You already have an agent ("First Bot"). Non-admin users are limited to 1 agent.'

        await call(owner, "update-settings", {"settings": {"max_agents_per_user": 2}})
        await call(c, "create-agent", {"agent_slug": "second"})
        err = await _unchanged(runtime, c, "create-agent", {"agent_slug": "third"}, "agent_limit_reached")
        assert "You already have 2 agent(s)" in err["message"]

    # 0 disables self-service entirely
    await call(owner, "update-settings", {"settings": {"max_agents_per_user": 0}})
    async with connect(runtime, USER3) as c:
        err = await _unchanged(runtime, c, "create-agent", {"agent_slug": "x"}, "agent_limit_reached")
        assert "max_agents_per_user" in err["message"]

    # global administrators are not limited
    for i in range(3):
        await call(owner, "create-agent", {"agent_slug": f"admin-{i}"})


async def test_agent_bound_principal_cannot_create_agents(runtime, owner):
    await call(owner, "create-agent", {"agent_slug": "bot"})
    bound = await as_token(runtime, user_id=1, agent_slug="bot")
    before = await table_rows(runtime)
    async with connect(runtime, bound) as c:
        err = await fail(c, "create-agent", {"agent_slug": "another"}, "permission_denied")
    assert err["data"]["required_role"] == "admin"
    changed = changed_tables(before, await table_rows(runtime))
    assert list(changed) == ["datamachine_logs"]
    warning = (await log_rows(runtime))[-1]
    assert warning["level"] == "warning"
    assert warning["message"] == "create-agent denied: permission_denied"


# --- get-agent ---------------------------------------------------------------------------------


async def test_get_agent_selectors(runtime, owner):
    a = await call(owner, "create-agent", {"agent_slug": "alpha"})
    b = await call(owner, "create-agent", {"agent_slug": "beta"})
    by_id = await call(owner, "get-agent", {"agent_id": a["agent_id"]})
    by_slug = await call(owner, "get-agent", {"agent_slug": "alpha"})
    both = await call(owner, "get-agent", {"agent_id": a["agent_id"], "agent_slug": "Alpha"})
    assert by_id == by_slug == both
    assert set(by_id) == {"agent"}
    agent = by_id["agent"]
    assert agent["agent_slug"] == "alpha"
    assert agent["resource_counts"] == {"pipelines": 0, "flows": 0, "active_jobs": 0, "chat_sessions": 0}
    assert agent["caller_role"] == "admin"
    assert [g["user_id"] for g in agent["access"]] == [1]

    err = await _unchanged(runtime, owner, "get-agent", {}, "agent_identity_required")
    assert err["message"] == "Agent identity required: provide agent_id or agent_slug"
    await _unchanged(
        runtime, owner, "get-agent", {"agent_id": a["agent_id"], "agent_slug": "beta"}, "agent_identity_mismatch"
    )
    err = await _unchanged(runtime, owner, "get-agent", {"agent_id": 999}, "agent_not_found")
    assert err["data"] == {"agent_id": 999}
    err = await _unchanged(runtime, owner, "get-agent", {"agent_slug": "gamma"}, "agent_not_found")
    assert "gamma" in err["message"]
    assert b["agent_id"] != a["agent_id"]


async def test_get_agent_access_list_only_for_admins(runtime, owner):
    a = await call(owner, "create-agent", {"agent_slug": "bot"})
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 3, "role": "operator"})
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "viewer"})
    async with connect(runtime, USER2) as c:
        viewer = (await call(c, "get-agent", {"agent_slug": "bot"}))["agent"]
    assert viewer["caller_role"] == "viewer"
    assert viewer["access"] is None
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "admin"})
    async with connect(runtime, USER2) as c:
        admin = (await call(c, "get-agent", {"agent_id": a["agent_id"]}))["agent"]
    assert admin["caller_role"] == "admin"
    # owner first, then by granted_at (user 3 was granted before user 2 became admin)
    assert [(g["user_id"], g["role"], g["is_owner"]) for g in admin["access"]] == [
        (1, "admin", True),
        (3, "operator", False),
        (2, "admin", False),
    ]
    # a read-only token of that admin is capped at viewer and does not see the grants
    read_only = await as_token(runtime, user_id=2, capabilities=["read"])
    async with connect(runtime, read_only) as c:
        capped = (await call(c, "get-agent", {"agent_slug": "bot"}))["agent"]
    assert capped["caller_role"] == "viewer"
    assert capped["access"] is None


async def test_get_agent_denied_without_role(runtime, owner):
    await call(owner, "create-agent", {"agent_slug": "secret"})
    async with connect(runtime, USER2) as c:
        err = await fail(c, "get-agent", {"agent_slug": "secret"}, "agent_access_denied")
    assert err["data"]["required_role"] == "viewer"
    assert err["data"]["effective_role"] is None
    assert err["data"]["agent"] == "secret"


async def test_get_agent_resource_counts(runtime, owner):
    a = await call(owner, "create-agent", {"agent_slug": "bot"})
    aid = a["agent_id"]
    await _insert_resources(runtime, aid, jobs=("pending", "processing", "completed"))
    agent = (await call(owner, "get-agent", {"agent_id": aid}))["agent"]
    assert agent["resource_counts"] == {"pipelines": 1, "flows": 1, "active_jobs": 2, "chat_sessions": 1}


# --- list-agents -------------------------------------------------------------------------------


async def test_list_agents_mine_all_and_roles(runtime, owner):
    await call(owner, "create-agent", {"agent_slug": "one", "agent_config": {"description": "First"}})
    await call(owner, "create-agent", {"agent_slug": "two"})
    await call(owner, "create-agent", {"agent_slug": "three", "owner_id": 2})
    await call(owner, "grant-agent-access", {"agent_slug": "one", "user_id": 2, "role": "operator"})
    await call(owner, "update-agent", {"agent_slug": "two", "status": "inactive"})

    async with connect(runtime, USER2) as c:
        mine = await call(c, "list-agents", {"include_role": True})
        assert [(a["agent_slug"], a["is_owner"], a["user_role"]) for a in mine["agents"]] == [
            ("one", False, "operator"),
            ("three", True, "admin"),
        ]
        assert mine["total"] == 2 and mine["per_page"] == 50 and mine["offset"] == 0
        assert mine["agents"][0]["description"] == "First"
        assert mine["agents"][1]["description"] == ""
        plain = await call(c, "list-agents", {})
        assert all("user_role" not in a for a in plain["agents"])
        # three owned + granted (dedup): only one row per agent
        await call(owner, "grant-agent-access", {"agent_slug": "three", "user_id": 2, "role": "admin"})
        assert (await call(c, "list-agents", {}))["total"] == 2
        await _unchanged(runtime, c, "list-agents", {"scope": "all"}, "agent_scope_forbidden")
        await _unchanged(runtime, c, "list-agents", {"user_id": 1}, "agent_user_scope_forbidden")
        own = await call(c, "list-agents", {"user_id": 2})
        assert own["total"] == 2

    # global admins default to "mine" too
    mine = await call(owner, "list-agents", {})
    assert [a["agent_slug"] for a in mine["agents"]] == ["one", "two"]
    everything = await call(owner, "list-agents", {"scope": "all"})
    assert [a["agent_slug"] for a in everything["agents"]] == ["one", "two", "three"]
    for_two = await call(owner, "list-agents", {"user_id": 2, "include_role": True})
    assert [(a["agent_slug"], a["user_role"]) for a in for_two["agents"]] == [("one", "operator"), ("three", "admin")]
    inactive = await call(owner, "list-agents", {"scope": "all", "status": "inactive"})
    assert [a["agent_slug"] for a in inactive["agents"]] == ["two"]
    page = await call(owner, "list-agents", {"scope": "all", "per_page": 1, "offset": 1})
    assert page["total"] == 3 and [a["agent_slug"] for a in page["agents"]] == ["two"]


async def test_list_agents_agent_bound_sees_only_its_agent_while_granted(runtime, owner):
    await call(owner, "create-agent", {"agent_slug": "one"})
    await call(owner, "create-agent", {"agent_slug": "two"})
    await call(owner, "grant-agent-access", {"agent_slug": "one", "user_id": 2, "role": "viewer"})
    await call(owner, "grant-agent-access", {"agent_slug": "two", "user_id": 2, "role": "viewer"})
    bound = await as_token(runtime, user_id=2, agent_slug="one")
    async with connect(runtime, bound) as c:
        assert [a["agent_slug"] for a in (await call(c, "list-agents", {}))["agents"]] == ["one"]
        await call(owner, "revoke-agent-access", {"agent_slug": "one", "user_id": 2})
        assert (await call(c, "list-agents", {}))["agents"] == []


# --- update-agent ------------------------------------------------------------------------------


async def test_update_agent_fields_and_noop(runtime, owner):
    a = await call(owner, "create-agent", {"agent_slug": "bot", "agent_config": {"description": "old", "keep": 1}})
    out = await call(
        owner,
        "update-agent",
        {"agent_slug": "bot", "agent_name": "  Bot  ", "agent_config": {"model": "m"}, "status": "inactive"},
    )
    assert set(out) == {"agent", "updated_fields", "message"}
    assert out["updated_fields"] == ["agent_name", "agent_config", "status"]
    agent = out["agent"]
    assert agent["agent_name"] == "Bot"
    assert agent["agent_config"] == {"default_model": "m"}  # replaced entirely, legacy key renamed
    assert agent["status"] == "inactive"
    assert agent["caller_role"] == "admin" and agent["resource_counts"]["flows"] == 0
    assert out["agent"] == (await call(owner, "get-agent", {"agent_id": a["agent_id"]}))["agent"]
    audit = (await log_rows(runtime))[-1]
    assert audit["context"]["changes"] == ["agent_name", "agent_config", "status"]
    assert audit["context"]["status"] == {"from": "active", "to": "inactive"}

    before = await table_rows(runtime)
    same = await call(owner, "update-agent", {"agent_slug": "bot", "agent_name": "Bot", "status": "inactive"})
    assert same["updated_fields"] == []
    assert await table_rows(runtime) == before  # a no-op writes no audit row


async def test_update_agent_errors(runtime, owner):
    await call(owner, "create-agent", {"agent_slug": "bot"})
    err = await _unchanged(runtime, owner, "update-agent", {"agent_slug": "bot"}, "invalid_agent_update")
    assert err["message"] == "No fields to update. Provide agent_name, agent_config, status or owner_id."
    await _unchanged(runtime, owner, "update-agent", {"agent_slug": "bot", "agent_name": "   "}, "invalid_agent_name")
    await _unchanged(runtime, owner, "update-agent", {"agent_name": "x"}, "agent_identity_required")
    await _unchanged(runtime, owner, "update-agent", {"agent_slug": "nope", "agent_name": "x"}, "agent_not_found")
    await _unchanged(
        runtime, owner, "update-agent", {"agent_id": 1, "agent_slug": "nope", "agent_name": "x"}, "agent_not_found"
    )
    await call(owner, "create-agent", {"agent_slug": "other"})
    await _unchanged(
        runtime,
        owner,
        "update-agent",
        {"agent_id": 1, "agent_slug": "other", "agent_name": "x"},
        "agent_identity_mismatch",
    )


async def test_transfer_needs_global_admin_and_keeps_old_owner_admin(runtime, owner):
    a = await call(owner, "create-agent", {"agent_slug": "bot", "owner_id": 2})
    async with connect(runtime, USER2) as c:
        before = await table_rows(runtime)
        err = await fail(c, "update-agent", {"agent_slug": "bot", "owner_id": 3}, "permission_denied")
        assert err["data"]["required_role"] == "global_admin"
        changed = changed_tables(before, await table_rows(runtime))
        assert list(changed) == ["datamachine_logs"] and len(changed["datamachine_logs"][1]) == 1
    out = await call(owner, "update-agent", {"agent_id": a["agent_id"], "owner_id": 3})
    assert out["updated_fields"] == ["owner_id"]
    assert out["agent"]["owner_id"] == 3
    assert [(g["user_id"], g["role"], g["is_owner"]) for g in out["agent"]["access"]] == [
        (3, "admin", True),
        (2, "admin", False),
    ]


# --- rename-agent ------------------------------------------------------------------------------


async def test_rename_agent_keeps_ids_grants_and_tokens(runtime, owner):
    a = await call(owner, "create-agent", {"agent_slug": "old-name"})
    await call(owner, "grant-agent-access", {"agent_slug": "old-name", "user_id": 2})
    token = await mint_token(runtime, user_id=1, agent_slug="old-name")
    out = await call(owner, "rename-agent", {"old_slug": "old-name", "new_slug": "New Name"})
    assert out == {
        "agent_id": a["agent_id"],
        "old_slug": "old-name",
        "new_slug": "new-name",
        "message": out["message"],
    }
    assert "new-name" in out["message"]
    agent = (await call(owner, "get-agent", {"agent_slug": "new-name"}))["agent"]
    assert agent["agent_id"] == a["agent_id"]
    assert len(agent["access"]) == 2
    await fail(owner, "get-agent", {"agent_slug": "old-name"}, "agent_not_found")
    principal = await token_principal(runtime, token["raw_token"])  # slug part is informational
    assert principal.agent_id == a["agent_id"] and principal.agent_slug == "new-name"
    audit = (await log_rows(runtime))[-1]
    assert audit["context"]["ability"] == "rename-agent" and audit["context"]["changes"] == ["agent_slug"]


async def test_rename_agent_errors(runtime, owner):
    await call(owner, "create-agent", {"agent_slug": "one"})
    await call(owner, "create-agent", {"agent_slug": "two"})
    await _unchanged(runtime, owner, "rename-agent", {"old_slug": "one", "new_slug": ""}, "invalid_agent_slug")
    await _unchanged(runtime, owner, "rename-agent", {"old_slug": "one", "new_slug": "-_-"}, "invalid_agent_slug")
    await _unchanged(runtime, owner, "rename-agent", {"old_slug": "one", "new_slug": "One"}, "invalid_agent_slug")
    await _unchanged(runtime, owner, "rename-agent", {"old_slug": "", "new_slug": "x"}, "invalid_agent_slug")
    await _unchanged(runtime, owner, "rename-agent", {"old_slug": "zero", "new_slug": "x"}, "agent_not_found")
    err = await _unchanged(
        runtime, owner, "rename-agent", {"old_slug": "one", "new_slug": "two"}, "agent_slug_conflict"
    )
    assert err["data"]["existing_agent_id"] == 2


# --- delete-agent ------------------------------------------------------------------------------


async def _insert_resources(runtime, agent_id, *, jobs=("pending",)):
    """Rows of the agent in the four tables whose agent_id is SET NULL on agent delete."""
    now = utcnow()
    async with runtime.db.write() as s:
        pipeline = Pipeline(
            user_id=2, agent_id=agent_id, pipeline_name="p", pipeline_config={}, created_at=now, updated_at=now
        )
        s.add(pipeline)
        await s.flush()
        flow = Flow(
            pipeline_id=pipeline.pipeline_id,
            user_id=2,
            agent_id=agent_id,
            flow_name="f",
            flow_config={},
            scheduling_config={"interval": "manual"},
            created_at=now,
            updated_at=now,
        )
        s.add(flow)
        await s.flush()
        for status in jobs:
            s.add(
                Job(
                    user_id=2,
                    agent_id=agent_id,
                    pipeline_id=str(pipeline.pipeline_id),
                    flow_id=str(flow.flow_id),
                    pipeline_key=pipeline.pipeline_id,
                    flow_key=flow.flow_id,
                    status=status,
                    created_at=now,
                    run_at=now,
                    updated_at=now,
                )
            )
        s.add(ChatSession(session_id=f"s-{agent_id}", user_id=2, agent_id=agent_id, created_at=now, updated_at=now))


async def test_delete_agent_cascades_and_detaches(runtime, owner):
    a = await call(owner, "create-agent", {"agent_slug": "doomed"})
    keep = await call(owner, "create-agent", {"agent_slug": "keeper"})
    aid = a["agent_id"]
    await call(owner, "grant-agent-access", {"agent_slug": "doomed", "user_id": 2, "role": "operator"})
    await call(owner, "grant-agent-access", {"agent_slug": "doomed", "user_id": 3})
    raw = (await mint_token(runtime, user_id=1, agent_slug="doomed"))["raw_token"]
    await mint_token(runtime, user_id=2, agent_slug="doomed")
    await mint_token(runtime, user_id=1, agent_slug="keeper")
    async with connect(runtime) as c:
        await call(c, "write-to-log", {"level": "info", "message": "about doomed", "context": {"agent_id": aid}})
    await _insert_resources(runtime, aid, jobs=("pending", "completed"))
    await _insert_resources(runtime, keep["agent_id"])
    logs_before = await count(runtime, "datamachine_logs", f"agent_id={aid}")

    out = await call(owner, "delete-agent", {"agent_slug": "doomed"})
    assert out["agent_id"] == aid and out["agent_slug"] == "doomed"
    assert out["deleted"] == {"access_grants": 3, "tokens": 2}
    assert out["detached"] == {"pipelines": 1, "flows": 1, "jobs": 2, "chat_sessions": 1}
    for table in ("datamachine_agent_access", "datamachine_agent_tokens"):
        assert await count(runtime, table, f"agent_id={aid}") == 0
    for table in ("datamachine_pipelines", "datamachine_flows", "datamachine_jobs", "datamachine_chat_sessions"):
        assert await count(runtime, table, f"agent_id={aid}") == 0
    assert await count(runtime, "datamachine_pipelines", "agent_id IS NULL") == 1
    assert await count(runtime, "datamachine_flows", "agent_id IS NULL") == 1
    assert await count(runtime, "datamachine_jobs", "agent_id IS NULL") == 2
    assert await count(runtime, "datamachine_chat_sessions", "agent_id IS NULL") == 1
    # the other agent's rows are untouched
    assert await count(runtime, "datamachine_jobs", f"agent_id={keep['agent_id']}") == 1
    assert await count(runtime, "datamachine_agent_tokens", f"agent_id={keep['agent_id']}") == 1
    # log rows keep their agent_id (plus the delete's own audit row)
    assert await count(runtime, "datamachine_logs", f"agent_id={aid}") == logs_before + 1
    audit = (await log_rows(runtime))[-1]
    assert audit["context"]["ability"] == "delete-agent" and audit["agent_id"] == aid
    # tokens of the deleted agent no longer authenticate
    with pytest.raises(TokenRejected):
        await token_principal(runtime, raw)
    # repeating is "idempotent": the agent is gone
    await _unchanged(runtime, owner, "delete-agent", {"agent_id": aid}, "agent_not_found")
    await _unchanged(runtime, owner, "delete-agent", {}, "agent_identity_required")
    await _unchanged(
        runtime, owner, "delete-agent", {"agent_id": keep["agent_id"], "agent_slug": "nope"}, "agent_not_found"
    )
