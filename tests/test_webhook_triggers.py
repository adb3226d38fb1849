"""Webhook triggers: enable, disable, status, rotate-secret (docs/storage.md, scheduling_config).

The HTTP endpoint that verifies requests is not part of these tools; here we check what they store and show.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta

import pytest

from datamachine_mcp.storage.crypto import MASK
from datamachine_mcp.storage.timeutil import parse_datetime, utcnow
from tests.conftest import call, connect, log_rows, table_rows
from tests.test_flows import (
    USER2,
    audits,
    denied,
    flow_row,
    invalid_fields,
    make_agent,
    make_flow,
    make_pipeline,
    unchanged,
)

pytestmark = pytest.mark.anyio
HEX64 = re.compile(r"^[0-9a-f]{64}$")
KIND = "webhook_trigger_secret"


async def _flow(runtime, owner, **args) -> int:
    pid, _ = await make_pipeline(runtime)
    return (await make_flow(owner, pid, **args))["flow_id"]


async def _hook(runtime, fid: int) -> dict:
    row = await flow_row(runtime, fid)
    return row.scheduling_config.get("webhook")


async def test_bearer_token_is_shown_once_and_stored_hashed(runtime, owner):
    fid = await _flow(runtime, owner)
    out = await call(owner, "webhook-trigger-enable", {"flow_id": fid})
    token = out["token"]
    assert HEX64.match(token) and out["token_prefix"] == token[:8]
    assert (out["auth_mode"], out["webhook_url"], out["secret_ids"]) == ("bearer", None, [])
    assert out["rate_limit"] == {"max": 60, "window": 60}
    assert (out["tolerance_seconds"], out["max_body_bytes"]) == (300, 1048576)
    assert len(out["warnings"]) == 1 and "DATAMACHINE_PUBLIC_URL" in out["warnings"][0]
    hook = await _hook(runtime, fid)
    assert hook["token_hash"] == hashlib.sha256(token.encode()).hexdigest()
    assert (hook["enabled"], hook["auth_mode"], hook["token_prefix"], hook["secrets"]) == (
        True,
        "bearer",
        token[:8],
        [],
    )
    assert token not in json.dumps(await table_rows(runtime), default=str)  # only the hash is stored, nothing logs it
    # every read masks the hash
    flow = (await call(owner, "get-flows", {"flow_id": fid}))["flows"][0]
    assert flow["webhook_enabled"] is True
    assert flow["scheduling_config"]["webhook"]["token_hash"] == MASK
    status = await call(owner, "webhook-trigger-status", {"flow_id": fid})
    assert status == {
        "flow_id": fid,
        "flow_name": "Flow",
        "webhook_enabled": True,
        "webhook_url": None,
        "created_at": hook["created_at"],
        "auth_mode": "bearer",
        "token_prefix": token[:8],
        "rate_limit": {"max": 60, "window": 60},
        "tolerance_seconds": 300,
        "max_body_bytes": 1048576,
    }
    # enabling again cannot show the token again (it is stored hashed) and changes nothing
    before = await table_rows(runtime)
    again = await call(owner, "webhook-trigger-enable", {"flow_id": fid})
    assert "token" not in again and again["token_prefix"] == token[:8]
    assert "already enabled; rotate to get a new token" in again["message"]
    assert await table_rows(runtime) == before
    assert len(await audits(runtime, "webhook-trigger-enable")) == 1


async def test_webhook_url_and_limits(runtime, owner):
    fid = await _flow(runtime, owner)
    await call(
        owner, "update-settings", {"settings": {"webhook_rate_limit": {"max": 5}, "webhook_max_body_bytes": 4096}}
    )
    runtime.public_base_url = "https://dm.example/"
    out = await call(owner, "webhook-trigger-enable", {"flow_id": fid, "tolerance_seconds": 120})
    assert out["webhook_url"] == f"https://dm.example/webhooks/flows/{fid}" and out["warnings"] == []
    assert (out["rate_limit"], out["tolerance_seconds"], out["max_body_bytes"]) == ({"max": 5, "window": 60}, 120, 4096)
    out = await call(owner, "webhook-trigger-enable", {"flow_id": fid, "rate_limit_max": 0, "rate_limit_window": 10})
    assert out["rate_limit"] == {"max": 0, "window": 10} and out["tolerance_seconds"] == 120  # other limits kept
    status = await call(owner, "webhook-trigger-status", {"flow_id": fid})
    assert status["webhook_url"] == f"https://dm.example/webhooks/flows/{fid}"
    assert status["rate_limit"] == {"max": 0, "window": 10}
    for args, field in [
        ({"rate_limit_max": 10001}, "rate_limit_max"),
        ({"rate_limit_window": 0}, "rate_limit_window"),
        ({"tolerance_seconds": 29}, "tolerance_seconds"),
        ({"max_body_bytes": 1023}, "max_body_bytes"),
        ({"auth_mode": "basic"}, "auth_mode"),
        ({"auth_mode": "hmac", "secret": "too-short"}, "secret"),
    ]:
        err = await unchanged(runtime, owner, "webhook-trigger-enable", {"flow_id": fid, **args}, "invalid_input")
        assert invalid_fields(err) == [field]


async def test_hmac_secrets_are_encrypted_and_modes_replace_each_other(runtime, owner):
    fid = await _flow(runtime, owner)
    bearer = await call(owner, "webhook-trigger-enable", {"flow_id": fid})
    out = await call(owner, "webhook-trigger-enable", {"flow_id": fid, "auth_mode": "hmac"})
    secret = out["secret"]  # none existed: generated and shown once
    assert HEX64.match(secret) and out["secret_ids"] == [{"id": "current", "expires_at": None}]
    assert "token" not in out and "token_prefix" not in out
    hook = await _hook(runtime, fid)
    assert (hook["token_hash"], hook["token_prefix"]) == (None, None)  # the bearer token is gone
    assert runtime.box.decrypt(hook["secrets"][0]["value"], KIND) == secret
    assert secret not in json.dumps(await table_rows(runtime), default=str)
    shown = (await call(owner, "get-flows", {"flow_id": fid}))["flows"][0]["scheduling_config"]["webhook"]
    assert shown["secrets"] == [{"id": "current", "value": MASK, "expires_at": None}]
    status = await call(owner, "webhook-trigger-status", {"flow_id": fid})
    assert status["secret_ids"] == [{"id": "current", "expires_at": None}] and "token_prefix" not in status
    # re-enabling keeps the secret; an explicit one replaces it and is never echoed
    kept = await call(owner, "webhook-trigger-enable", {"flow_id": fid})
    assert kept["auth_mode"] == "hmac" and "secret" not in kept
    assert (await _hook(runtime, fid))["secrets"] == hook["secrets"]
    given = "sender-provided-secret-123"
    out = await call(owner, "webhook-trigger-enable", {"flow_id": fid, "secret": given})
    assert "secret" not in out
    assert runtime.box.decrypt((await _hook(runtime, fid))["secrets"][0]["value"], KIND) == given
    out = await call(owner, "webhook-trigger-enable", {"flow_id": fid, "generate_secret": True})
    assert HEX64.match(out["secret"]) and out["secret"] != secret
    # back to bearer: secrets destroyed, a new token
    out = await call(owner, "webhook-trigger-enable", {"flow_id": fid, "auth_mode": "bearer"})
    assert HEX64.match(out["token"]) and out["token"] != bearer["token"]
    assert (await _hook(runtime, fid))["secrets"] == []
    for args in ({"secret": "x" * 20}, {"generate_secret": True}):
        await unchanged(runtime, owner, "webhook-trigger-enable", {"flow_id": fid, **args}, "invalid_webhook_config")
    logged = json.dumps(await log_rows(runtime))
    assert given not in logged and secret not in logged


async def test_rotate_hmac_keeps_previous_until_expiry(runtime, owner):
    fid = await _flow(runtime, owner)
    first = (await call(owner, "webhook-trigger-enable", {"flow_id": fid, "auth_mode": "hmac"}))["secret"]
    err = await unchanged(runtime, owner, "webhook-trigger-rotate-secret", {"flow_id": fid}, "webhook_secret_required")
    assert "generate" in err["message"]
    start = utcnow().replace(microsecond=0)
    out = await call(owner, "webhook-trigger-rotate-secret", {"flow_id": fid, "generate": True})
    second = out["new_secret"]
    assert HEX64.match(second) and second != first and out["auth_mode"] == "hmac"
    expires = parse_datetime(out["previous_expires_at"])
    assert start + timedelta(days=7) <= expires <= utcnow() + timedelta(days=7)
    assert out["secret_ids"] == [
        {"id": "current", "expires_at": None},
        {"id": "previous", "expires_at": out["previous_expires_at"]},
    ]
    secrets = (await _hook(runtime, fid))["secrets"]
    assert [runtime.box.decrypt(s["value"], KIND) for s in secrets] == [second, first]
    # a caller-provided secret is not echoed; the older previous is dropped
    out = await call(
        owner,
        "webhook-trigger-rotate-secret",
        {"flow_id": fid, "secret": "third-secret-value!", "previous_ttl_seconds": 60},
    )
    assert "new_secret" not in out
    secrets = (await _hook(runtime, fid))["secrets"]
    assert [runtime.box.decrypt(s["value"], KIND) for s in secrets] == ["third-secret-value!", second]
    assert parse_datetime(secrets[1]["expires_at"]) <= utcnow() + timedelta(seconds=60)
    # a TTL of 0 revokes the old secret at once
    out = await call(
        owner, "webhook-trigger-rotate-secret", {"flow_id": fid, "generate": True, "previous_ttl_seconds": 0}
    )
    assert out["previous_expires_at"] is None and out["secret_ids"] == [{"id": "current", "expires_at": None}]
    assert len(await audits(runtime, "webhook-trigger-rotate-secret")) == 3
    err = await unchanged(
        runtime,
        owner,
        "webhook-trigger-rotate-secret",
        {"flow_id": fid, "previous_ttl_seconds": 2592001},
        "invalid_input",
    )
    assert invalid_fields(err) == ["previous_ttl_seconds"]


async def test_rotate_bearer_replaces_the_token_at_once(runtime, owner):
    fid = await _flow(runtime, owner)
    await unchanged(runtime, owner, "webhook-trigger-rotate-secret", {"flow_id": fid}, "webhook_not_enabled")
    old = (await call(owner, "webhook-trigger-enable", {"flow_id": fid}))["token"]
    out = await call(owner, "webhook-trigger-rotate-secret", {"flow_id": fid})
    assert HEX64.match(out["new_token"]) and out["new_token"] != old
    assert (out["token_prefix"], out["previous_expires_at"], out["secret_ids"]) == (out["new_token"][:8], None, [])
    hook = await _hook(runtime, fid)
    assert hook["token_hash"] == hashlib.sha256(out["new_token"].encode()).hexdigest()
    for args in ({"generate": True}, {"secret": "x" * 16}, {"previous_ttl_seconds": 60}):
        err = await unchanged(
            runtime, owner, "webhook-trigger-rotate-secret", {"flow_id": fid, **args}, "invalid_webhook_config"
        )
        assert err["data"]["fields"] == list(args)


async def test_disable_destroys_credentials_and_schedule_changes_keep_the_trigger(runtime, owner):
    fid = await _flow(runtime, owner, scheduling_config={"interval": "hourly"})
    await call(owner, "webhook-trigger-enable", {"flow_id": fid, "auth_mode": "hmac"})
    await call(owner, "update-flow", {"flow_id": fid, "scheduling_config": {"interval": "daily"}})
    await call(owner, "pause-flow", {"flow_id": fid})
    await call(owner, "schedule-flow", {"flow_id": fid, "interval_or_timestamp": "weekly"})
    assert (await call(owner, "webhook-trigger-status", {"flow_id": fid}))["auth_mode"] == "hmac"
    out = await call(owner, "webhook-trigger-disable", {"flow_id": fid})
    assert out["was_enabled"] is True
    row = await flow_row(runtime, fid)
    assert "webhook" not in row.scheduling_config and row.scheduling_config["interval"] == "weekly"
    status = await call(owner, "webhook-trigger-status", {"flow_id": fid})
    assert status == {"flow_id": fid, "flow_name": "Flow", "webhook_enabled": False}
    before = await table_rows(runtime)
    again = await call(owner, "webhook-trigger-disable", {"flow_id": fid})
    assert again["was_enabled"] is False and await table_rows(runtime) == before
    assert len(await audits(runtime, "webhook-trigger-disable")) == 1


async def test_webhook_tools_not_found_and_roles(runtime, owner):
    for tool in (
        "webhook-trigger-enable",
        "webhook-trigger-disable",
        "webhook-trigger-status",
        "webhook-trigger-rotate-secret",
    ):
        err = await unchanged(runtime, owner, tool, {"flow_id": 404}, "flow_not_found")
        assert err["data"] == {"flow_id": 404}
        await unchanged(runtime, owner, tool, {}, "invalid_input")
    bot = await make_agent(owner, "bot", (2, "viewer"))
    pid, _ = await make_pipeline(runtime, agent_id=bot)
    fid = (await make_flow(owner, pid))["flow_id"]
    await call(owner, "webhook-trigger-enable", {"flow_id": fid})
    async with connect(runtime, USER2) as c:
        status = await call(c, "webhook-trigger-status", {"flow_id": fid})
        assert status["webhook_enabled"] is True and "token_hash" not in status
        for tool in ("webhook-trigger-enable", "webhook-trigger-disable", "webhook-trigger-rotate-secret"):
            await denied(runtime, c, tool, {"flow_id": fid})
