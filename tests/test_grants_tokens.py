"""Grants and bearer tokens: grant/revoke/list access, create/list/revoke tokens, verification.

See docs/access.md, Tokens and Roles.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.abilities.token_auth import TokenRejected, hash_secret
from datamachine_mcp.storage.timeutil import utcnow
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
USER3 = Principal(user_id=3, transport="http")
TOKEN_INFO_KEYS = {
    "token_id",
    "agent_id",
    "user_id",
    "label",
    "token_prefix",
    "capabilities",
    "created_at",
    "expires_at",
    "revoked_at",
    "last_used_at",
}


async def _unchanged(runtime, client, tool, args, code):
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    assert await table_rows(runtime) == before
    return err


async def _one_denial(runtime, client, tool, args, code="agent_access_denied"):
    """The call is refused and writes exactly one warning row, nothing else."""
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    changed = changed_tables(before, await table_rows(runtime))
    assert list(changed) == ["datamachine_logs"]
    assert changed["datamachine_logs"][0] == [] and len(changed["datamachine_logs"][1]) == 1
    row = (await log_rows(runtime))[-1]
    assert row["level"] == "warning" and row["message"] == f"{tool} denied: {code}"
    return err


@pytest.fixture
async def bot(owner):
    return await call(owner, "create-agent", {"agent_slug": "bot"})


# --- grant-agent-access ------------------------------------------------------------------------


async def test_grant_insert_change_and_repeat(runtime, owner, bot):
    out = await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2})
    assert set(out) == {"grant", "created", "changed", "previous_role"}
    assert out["created"] is True and out["changed"] is True and out["previous_role"] is None
    assert out["grant"]["role"] == "viewer"  # default role
    assert out["grant"]["is_owner"] is False and out["grant"]["user_id"] == 2
    audit = (await log_rows(runtime))[-1]
    assert audit["context"]["ability"] == "grant-agent-access"
    assert audit["context"]["role"] == {"from": None, "to": "viewer"}

    before = await table_rows(runtime)
    same = await call(owner, "grant-agent-access", {"agent_id": bot["agent_id"], "user_id": 2, "role": "viewer"})
    assert same["created"] is False and same["changed"] is False and same["previous_role"] == "viewer"
    assert await table_rows(runtime) == before  # upsert with the same role changes nothing, no audit

    up = await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "operator"})
    assert up["created"] is False and up["changed"] is True and up["previous_role"] == "viewer"
    assert up["grant"]["role"] == "operator"
    assert up["grant"]["granted_at"] >= out["grant"]["granted_at"]
    assert await count(runtime, "datamachine_agent_access", f"agent_id={bot['agent_id']} AND user_id=2") == 1


async def test_grant_errors(runtime, owner, bot):
    err = await _unchanged(
        runtime,
        owner,
        "grant-agent-access",
        {"agent_slug": "bot", "user_id": 1, "role": "operator"},
        "cannot_revoke_owner",
    )
    assert err["data"]["user_id"] == 1
    # granting the owner admin again is a harmless no-op
    same = await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 1, "role": "admin"})
    assert same["changed"] is False and same["grant"]["is_owner"] is True
    await _unchanged(runtime, owner, "grant-agent-access", {"user_id": 2}, "agent_identity_required")
    await _unchanged(runtime, owner, "grant-agent-access", {"agent_slug": "nope", "user_id": 2}, "agent_not_found")
    await call(owner, "create-agent", {"agent_slug": "other"})
    await _unchanged(
        runtime,
        owner,
        "grant-agent-access",
        {"agent_id": bot["agent_id"], "agent_slug": "other", "user_id": 2},
        "agent_identity_mismatch",
    )


# --- revoke-agent-access -----------------------------------------------------------------------


async def test_revoke_access_and_live_effect_on_tokens(runtime, owner, bot):
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "operator"})
    bound = await as_token(runtime, user_id=2, agent_slug="bot")
    async with connect(runtime, bound) as c:
        assert (await call(c, "get-agent", {"agent_slug": "bot"}))["agent"]["caller_role"] == "operator"
        out = await call(owner, "revoke-agent-access", {"agent_slug": "bot", "user_id": 2})
        assert out["agent_id"] == bot["agent_id"] and out["user_id"] == 2 and out["previous_role"] == "operator"
        assert set(out) == {"agent_id", "user_id", "previous_role", "message"}
        # roles are evaluated live: the token loses access on its next call
        await _one_denial(runtime, c, "get-agent", {"agent_slug": "bot"})
    audit = [r for r in await log_rows(runtime) if r["context"].get("ability") == "revoke-agent-access"]
    assert len(audit) == 1 and audit[0]["context"]["role"] == {"from": "operator", "to": None}


async def test_revoke_access_errors(runtime, owner, bot):
    err = await _unchanged(
        runtime, owner, "revoke-agent-access", {"agent_slug": "bot", "user_id": 5}, "grant_not_found"
    )
    assert err["message"] == "No access grant found for this user."
    await _unchanged(runtime, owner, "revoke-agent-access", {"agent_slug": "bot", "user_id": 1}, "cannot_revoke_owner")
    await _unchanged(runtime, owner, "revoke-agent-access", {"user_id": 2}, "agent_identity_required")
    await _unchanged(runtime, owner, "revoke-agent-access", {"agent_id": 77, "user_id": 2}, "agent_not_found")


# --- list-agent-access -------------------------------------------------------------------------


async def test_list_agent_access_order_filter_paging(runtime, owner, bot):
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 5, "role": "operator"})
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 3})
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 4, "role": "admin"})
    out = await call(owner, "list-agent-access", {"agent_slug": "bot"})
    assert out["agent_id"] == bot["agent_id"]
    assert [(g["user_id"], g["role"]) for g in out["grants"]] == [
        (1, "admin"),
        (5, "operator"),
        (3, "viewer"),
        (4, "admin"),
    ]
    assert out["total"] == 4 and out["per_page"] == 50 and out["offset"] == 0
    assert all(set(g) == {"agent_id", "user_id", "role", "granted_at", "is_owner"} for g in out["grants"])
    admins = await call(owner, "list-agent-access", {"agent_slug": "bot", "role": "admin"})
    assert [g["user_id"] for g in admins["grants"]] == [1, 4] and admins["total"] == 2
    page = await call(owner, "list-agent-access", {"agent_slug": "bot", "per_page": 2, "offset": 1})
    assert [g["user_id"] for g in page["grants"]] == [5, 3] and page["total"] == 4

    await _unchanged(runtime, owner, "list-agent-access", {}, "agent_identity_required")
    await _unchanged(runtime, owner, "list-agent-access", {"agent_slug": "nope"}, "agent_not_found")
    async with connect(runtime, Principal(user_id=5, transport="http")) as c:  # operator, not admin
        err = await _one_denial(runtime, c, "list-agent-access", {"agent_slug": "bot"})
    assert err["data"]["required_role"] == "admin" and err["data"]["effective_role"] == "operator"


# --- create-agent-token ------------------------------------------------------------------------


async def test_create_agent_and_user_tokens(runtime, owner, bot):
    out = await call(
        owner,
        "create-agent-token",
        {"agent_slug": "bot", "label": "  ci-pipeline ", "capabilities": ["toolset:logs", "run"], "expires_in": 3600},
    )
    assert set(out) == {
        "token_id",
        "raw_token",
        "token_prefix",
        "agent_id",
        "user_id",
        "label",
        "capabilities",
        "expires_at",
        "message",
    }
    raw = out["raw_token"]
    match = re.fullmatch(r"dm_bot_([0-9a-f]{64})", raw)
    assert match is not None
    secret = match.group(1)
    assert out["token_prefix"] == f"dm_bot_{secret[:8]}"
    assert out["agent_id"] == bot["agent_id"] and out["user_id"] == 1
    assert out["label"] == "ci-pipeline"
    assert out["capabilities"] == ["run", "toolset:logs"]
    assert out["message"] == "Store this token now; it cannot be shown again."
    expires = datetime.fromisoformat(out["expires_at"].replace("Z", "+00:00"))
    assert abs((expires - utcnow()) - timedelta(seconds=3600)) < timedelta(seconds=30)

    # only a salted hash is stored; the raw token and secret appear nowhere in the database
    async with runtime.db.read() as s:
        row = (
            await s.execute(text("SELECT lookup_key, salt, token_hash, token_prefix FROM datamachine_agent_tokens"))
        ).one()
    assert row.lookup_key == secret[:12] and len(row.salt) == 32
    assert row.token_hash == hash_secret(row.salt, secret)
    assert secret not in repr(await table_rows(runtime))
    audit = (await log_rows(runtime))[-1]
    assert audit["context"]["ability"] == "create-agent-token" and secret[8:] not in repr(audit)

    user = await call(owner, "create-agent-token", {"user_id": 2})
    assert re.fullmatch(r"dm_user-2_[0-9a-f]{64}", user["raw_token"])
    assert user["agent_id"] is None and user["user_id"] == 2 and user["capabilities"] is None
    assert user["expires_at"] is None and user["label"] is None


async def test_create_token_invalid_capabilities(runtime, owner, bot):
    err = await _unchanged(
        runtime, owner, "create-agent-token", {"capabilities": ["read", "fly", "toolset:nope"]}, "invalid_capabilities"
    )
    assert err["data"]["unknown"] == ["fly", "toolset:nope"]
    await _unchanged(runtime, owner, "create-agent-token", {"capabilities": ["toolset:logs"]}, "invalid_capabilities")
    await _unchanged(runtime, owner, "create-agent-token", {"capabilities": []}, "invalid_capabilities")
    # admin scope only for tokens of global administrators
    await _unchanged(
        runtime, owner, "create-agent-token", {"user_id": 2, "capabilities": ["admin"]}, "invalid_capabilities"
    )
    # a read token cannot mint a run token, nor an unnarrowed one, nor leave its toolsets
    reader = await as_token(runtime, user_id=2, capabilities=["read", "toolset:agents"])
    async with connect(runtime, reader) as c:
        await _unchanged(
            runtime, c, "create-agent-token", {"capabilities": ["run", "toolset:agents"]}, "invalid_capabilities"
        )
        await _unchanged(runtime, c, "create-agent-token", {}, "invalid_capabilities")
        await _unchanged(runtime, c, "create-agent-token", {"capabilities": ["read"]}, "invalid_capabilities")
        await _unchanged(
            runtime, c, "create-agent-token", {"capabilities": ["read", "toolset:logs"]}, "invalid_capabilities"
        )
        narrower = await call(c, "create-agent-token", {"capabilities": ["read", "toolset:agents"]})
    assert narrower["user_id"] == 2 and narrower["capabilities"] == ["read", "toolset:agents"]


async def test_create_token_permissions(runtime, owner, bot):
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "operator"})
    async with connect(runtime, USER2) as c:
        # a user token for themselves needs no role
        mine = await call(c, "create-agent-token", {"label": "laptop"})
        assert mine["user_id"] == 2 and mine["agent_id"] is None
        # an agent token needs admin on the agent
        err = await _one_denial(runtime, c, "create-agent-token", {"agent_slug": "bot"})
        assert err["data"]["required_role"] == "admin" and err["data"]["effective_role"] == "operator"
        # a token for another user needs a global administrator
        await _one_denial(runtime, c, "create-agent-token", {"user_id": 3}, "permission_denied")
        await _unchanged(runtime, c, "create-agent-token", {"agent_slug": "nope"}, "agent_not_found")
    # an agent-bound session cannot mint user tokens
    bound = await as_token(runtime, user_id=1, agent_slug="bot")
    async with connect(runtime, bound) as c:
        await _one_denial(runtime, c, "create-agent-token", {}, "permission_denied")
        agent_token = await call(c, "create-agent-token", {"agent_slug": "bot"})
    assert agent_token["agent_id"] == bot["agent_id"]
    await call(owner, "create-agent", {"agent_slug": "other"})
    await _unchanged(
        runtime,
        owner,
        "create-agent-token",
        {"agent_id": bot["agent_id"], "agent_slug": "other"},
        "agent_identity_mismatch",
    )


# --- verification ------------------------------------------------------------------------------


async def test_verify_token_principal_fields(runtime, owner, bot):
    agent_tok = await mint_token(runtime, user_id=1, agent_slug="bot")
    p = await token_principal(runtime, agent_tok["raw_token"])
    assert (p.user_id, p.agent_id, p.is_admin, p.capabilities) == (1, bot["agent_id"], True, None)
    assert p.token_id == agent_tok["token_id"] and p.token_prefix == agent_tok["token_prefix"]
    assert p.agent_slug == "bot" and p.transport == "http"
    # a token can drop administrator rights, never add them
    narrowed = await as_token(runtime, user_id=1, capabilities=["manage"])
    assert narrowed.is_admin is False and narrowed.capabilities == frozenset({"manage"})
    admin_scoped = await as_token(runtime, user_id=1, capabilities=["admin"])
    assert admin_scoped.is_admin is True
    user2 = await as_token(runtime, user_id=2)
    assert user2.is_admin is False and user2.agent_id is None
    # last use is recorded
    assert (
        await count(
            runtime, "datamachine_agent_tokens", f"token_id={agent_tok['token_id']} AND last_used_at IS NOT NULL"
        )
        == 1
    )


async def test_verify_token_rejections(runtime, owner, bot):
    good = await mint_token(runtime, user_id=2)
    raw = good["raw_token"]
    before = await table_rows(runtime)
    for garbage in ("", "nonsense", "dm_bot_" + "0" * 64, raw[:-1] + ("0" if raw[-1] != "0" else "1"), raw.upper()):
        with pytest.raises(TokenRejected):
            await token_principal(runtime, garbage)
    assert await table_rows(runtime) == before  # unknown or malformed tokens are not logged as rows

    # expired
    async with runtime.db.write() as s:
        await s.execute(
            text("UPDATE datamachine_agent_tokens SET expires_at = :t WHERE token_id = :id"),
            {"t": (utcnow() - timedelta(seconds=5)).replace(tzinfo=None), "id": good["token_id"]},
        )
    with pytest.raises(TokenRejected) as exc:
        await token_principal(runtime, raw)
    assert exc.value.reason == "expired"
    row = (await log_rows(runtime))[-1]
    assert row["level"] == "warning" and row["context"]["token_id"] == good["token_id"]
    assert row["context"]["reason_code"] == "expired"

    # revoked
    other = await mint_token(runtime, user_id=2)
    await call(owner, "revoke-agent-token", {"token_id": other["token_id"]})
    with pytest.raises(TokenRejected) as exc:
        await token_principal(runtime, other["raw_token"])
    assert exc.value.reason == "revoked"
    assert (await log_rows(runtime))[-1]["context"]["reason_code"] == "revoked"


# --- list-agent-tokens -------------------------------------------------------------------------


async def test_list_agent_tokens(runtime, owner, bot):
    t1 = await mint_token(runtime, user_id=1, agent_slug="bot", label="one")
    t2 = await mint_token(runtime, user_id=2, agent_slug="bot", capabilities=["read"])
    t3 = await mint_token(runtime, user_id=1, agent_slug="bot", label="three")
    await call(owner, "revoke-agent-token", {"token_id": t3["token_id"]})
    await mint_token(runtime, user_id=2)  # a user token: not an agent token

    out = await call(owner, "list-agent-tokens", {"agent_slug": "bot"})
    assert [t["token_id"] for t in out["tokens"]] == [t2["token_id"], t1["token_id"]]  # newest first
    assert out["total"] == 2 and out["per_page"] == 50 and out["offset"] == 0
    assert all(set(t) == TOKEN_INFO_KEYS for t in out["tokens"])
    assert out["tokens"][0]["capabilities"] == ["read"] and out["tokens"][1]["label"] == "one"
    assert t1["raw_token"] not in repr(out) and t1["raw_token"][-64:] not in repr(out)
    every = await call(owner, "list-agent-tokens", {"agent_id": bot["agent_id"], "include_inactive": True})
    assert [t["token_id"] for t in every["tokens"]] == [t3["token_id"], t2["token_id"], t1["token_id"]]
    assert every["tokens"][0]["revoked_at"] is not None
    page = await call(owner, "list-agent-tokens", {"agent_slug": "bot", "per_page": 1, "offset": 1})
    assert [t["token_id"] for t in page["tokens"]] == [t1["token_id"]] and page["total"] == 2

    # without an agent: the caller's own user tokens; another user's need a global administrator
    assert (await call(owner, "list-agent-tokens", {}))["tokens"] == []
    for_two = await call(owner, "list-agent-tokens", {"user_id": 2})
    assert [t["user_id"] for t in for_two["tokens"]] == [2] and for_two["tokens"][0]["agent_id"] is None
    async with connect(runtime, USER2) as c:
        assert (await call(c, "list-agent-tokens", {}))["total"] == 1
        await _one_denial(runtime, c, "list-agent-tokens", {"user_id": 1}, "permission_denied")
        await _one_denial(runtime, c, "list-agent-tokens", {"agent_slug": "bot"})
        await _unchanged(runtime, c, "list-agent-tokens", {"agent_slug": "nope"}, "agent_not_found")
    bound = await token_principal(runtime, t1["raw_token"])
    async with connect(runtime, bound) as c:
        await _one_denial(runtime, c, "list-agent-tokens", {}, "permission_denied")


# --- revoke-agent-token ------------------------------------------------------------------------


async def test_revoke_token_own_repeat_and_current_call(runtime, owner, bot):
    tok = await mint_token(runtime, user_id=2, capabilities=["read"])
    p = await token_principal(runtime, tok["raw_token"])
    async with connect(runtime, p) as c:
        # any user may revoke their own token, even with a read-only token, even the one in use
        out = await call(c, "revoke-agent-token", {"token_id": tok["token_id"]})
    assert out["token_id"] == tok["token_id"] and out["agent_id"] is None and out["changed"] is True
    assert out["revoked_at"].endswith("Z")
    assert set(out) == {"token_id", "agent_id", "revoked_at", "changed", "message"}
    audit = (await log_rows(runtime))[-1]
    assert audit["context"]["ability"] == "revoke-agent-token" and audit["context"]["changes"] == ["revoked_at"]
    with pytest.raises(TokenRejected):
        await token_principal(runtime, tok["raw_token"])

    before = await table_rows(runtime)
    again = await call(owner, "revoke-agent-token", {"token_id": tok["token_id"]})
    assert again["changed"] is False and again["revoked_at"] == out["revoked_at"]
    assert await table_rows(runtime) == before


async def test_revoke_token_not_found_does_not_disclose(runtime, owner, bot):
    await call(owner, "create-agent", {"agent_slug": "other"})
    foreign_user_token = await mint_token(runtime, user_id=3)
    foreign_agent_token = await mint_token(runtime, user_id=1, agent_slug="bot")
    other_agent_token = await mint_token(runtime, user_id=1, agent_slug="other")
    unknown_id = 999

    def shape(err, token_id):
        return err["code"], err["message"].replace(str(token_id), "N"), sorted(err["data"])

    async with connect(runtime, USER2) as c:
        reference = shape(
            await _unchanged(runtime, c, "revoke-agent-token", {"token_id": unknown_id}, "token_not_found"), unknown_id
        )
        for tok in (foreign_user_token, foreign_agent_token):
            err = await _unchanged(runtime, c, "revoke-agent-token", {"token_id": tok["token_id"]}, "token_not_found")
            assert shape(err, tok["token_id"]) == reference
        # an agent selector must not reveal whether the id exists either
        ref_sel = await fail(c, "revoke-agent-token", {"token_id": unknown_id, "agent_slug": "nope"})
        sel = await fail(c, "revoke-agent-token", {"token_id": foreign_user_token["token_id"], "agent_slug": "nope"})
        assert sel["code"] == ref_sel["code"]
    # the token must belong to the named agent
    await _unchanged(
        runtime,
        owner,
        "revoke-agent-token",
        {"token_id": other_agent_token["token_id"], "agent_slug": "bot"},
        "token_not_found",
    )
    # an admin of the agent may revoke other users' tokens of that agent
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 2, "role": "admin"})
    async with connect(runtime, USER2) as c:
        out = await call(c, "revoke-agent-token", {"token_id": foreign_agent_token["token_id"], "agent_slug": "bot"})
        assert out["changed"] is True and out["agent_id"] == bot["agent_id"]
        await _unchanged(
            runtime, c, "revoke-agent-token", {"token_id": foreign_user_token["token_id"]}, "token_not_found"
        )
    # a global administrator may revoke anyone's user token
    async with connect(runtime, OWNER) as c:
        assert (await call(c, "revoke-agent-token", {"token_id": foreign_user_token["token_id"]}))["changed"] is True
