"""MCP over streamable HTTP (``serve --http``): a real uvicorn listener on 127.0.0.1 and the SDK's HTTP client,
in both protocol eras; bearer tokens verified on every request; listener hygiene (Origin, body limit,
timeouts, per-token rate limits)."""

from __future__ import annotations

import json
import socket
import time
from datetime import timedelta

import anyio
import httpx
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError
from mcp.shared.subscriptions import ResourceUpdated
from sqlalchemy import update

from datamachine_mcp.server.http_guards import HeadTimeoutH11
from datamachine_mcp.storage.models import AgentToken
from datamachine_mcp.storage.timeutil import utcnow
from tests.conftest import call, fail, log_rows, mint_token, table_rows, token_principal
from tests.http_support import INIT, MODERN, POST_HEADERS, listening, mcp_client, rpc
from tests.jobs_support import files_flow, run, settings
from tests.test_resources import Inbox

pytestmark = pytest.mark.anyio

ERAS = pytest.mark.parametrize("mode", ["legacy", MODERN], ids=["2025-11-25", "2026-07-28"])


async def _token(runtime, **kw) -> str:
    return (await mint_token(runtime, **kw))["raw_token"]


# --- the same server as stdio, in both eras -------------------------------------------------------


@ERAS
async def test_tools_and_resources_over_http(runtime, mode):
    token = await _token(runtime, user_id=1, label="remote")
    async with listening(runtime) as base, mcp_client(base, token, mode=mode) as client:
        if mode == "legacy":  # the handshake advertises what the server sends
            resources = client.server_capabilities.resources
            assert resources is not None and resources.subscribe and resources.list_changed
        tools = await client.list_tools()
        assert {"whoami", "run-flow", "get-jobs"} <= {t.name for t in tools.tools}
        result = await client.call_tool("whoami", {})
        assert not result.is_error
        me = result.structured_content
        assert me["user_id"] == 1 and me["transport"] == "http" and me["token_prefix"].startswith("dm_user-1_")
        read = await client.read_resource("datamachine://whoami")
        assert json.loads(read.contents[0].text)["transport"] == "http"
        with pytest.raises(MCPError) as missing:
            await client.read_resource("datamachine://flows/999")
        assert missing.value.error.code == -32002  # resource not found


async def test_a_job_update_reaches_a_handshake_session(runtime, owner):
    made = await files_flow(owner, runtime)
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    token = await _token(runtime, user_id=1)
    inbox = Inbox()
    async with listening(runtime) as base, mcp_client(base, token, message_handler=inbox) as client:
        await client.subscribe_resource(f"datamachine://jobs/{job_id}")
        await anyio.sleep(0.3)  # the client opens its GET stream for server messages
        await call(client, "fail-job", {"job_id": job_id})
        updated = await inbox.wait_for(types.ResourceUpdatedNotification)
    assert str(updated[0].params.uri) == f"datamachine://jobs/{job_id}"


async def test_a_job_update_reaches_a_2026_listen_stream(runtime, owner):
    made = await files_flow(owner, runtime)
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    token = await _token(runtime, user_id=1)
    uri = f"datamachine://jobs/{job_id}"
    async with (
        listening(runtime) as base,
        mcp_client(base, token, mode=MODERN) as client,
        client.listen(resource_subscriptions=[uri]) as sub,
    ):
        await call(owner, "fail-job", {"job_id": job_id})
        with anyio.fail_after(10):
            async for event in sub:
                if isinstance(event, ResourceUpdated) and event.uri == uri:
                    break


# --- bearer tokens --------------------------------------------------------------------------------


async def _expired(runtime) -> str:
    out = await mint_token(runtime, user_id=1, expires_in=60)
    async with runtime.db.write() as session:
        await session.execute(update(AgentToken).values(expires_at=utcnow() - timedelta(seconds=1)))
    return out["raw_token"]


async def _revoked(runtime) -> str:
    out = await mint_token(runtime, user_id=1)
    async with runtime.db.write() as session:
        await session.execute(update(AgentToken).values(revoked_at=utcnow()))
    return out["raw_token"]


async def _inactive_agent(runtime, owner) -> str:
    await call(owner, "create-agent", {"agent_slug": "sleepy"})
    raw = (await mint_token(runtime, user_id=1, agent_slug="sleepy"))["raw_token"]
    await call(owner, "update-agent", {"agent_slug": "sleepy", "status": "inactive"})
    return raw


UNKNOWN = "dm_user-1_" + "ab" * 32


@pytest.mark.parametrize(
    "case", ["missing", "not bearer", "malformed", "unknown", "expired", "revoked", "inactive agent"]
)
async def test_every_bad_token_gets_401_before_any_mcp_processing(runtime, owner, case):
    headers = {
        "missing": {},
        "not bearer": {"authorization": f"Basic {UNKNOWN}"},
        "malformed": {"authorization": "Bearer not-a-token"},
        "unknown": {"authorization": f"Bearer {UNKNOWN}"},
    }.get(case)
    if headers is None:
        make = {"expired": _expired, "revoked": _revoked}.get(case)
        raw = await make(runtime) if make else await _inactive_agent(runtime, owner)
        headers = {"authorization": f"Bearer {raw}"}
    before = await table_rows(runtime)
    async with listening(runtime) as base, httpx.AsyncClient() as http:
        for method, body in (("POST", INIT), ("POST", {"not": "json-rpc"}), ("GET", None), ("DELETE", None)):
            response = await http.request(
                method, f"{base}/mcp", json=body, headers={**POST_HEADERS, **headers, "mcp-session-id": "x"}
            )
            assert response.status_code == 401, (method, response.text)
            assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
            assert response.json() == {"error": "invalid_token"}
        # no OAuth discovery: nothing tells a client to start an authorization flow
        for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-authorization-server"):
            assert (await http.get(f"{base}{path}")).status_code == 404
    after = await table_rows(runtime)
    # a known token's rejection leaves its warning row; nothing else is written
    new_logs = [r for r in after["datamachine_logs"] if r not in before["datamachine_logs"]]
    assert {k: v for k, v in after.items() if k != "datamachine_logs"} == {
        k: v for k, v in before.items() if k != "datamachine_logs"
    }
    assert all("rejected" in str(r) for r in new_logs)


async def test_a_session_is_bound_to_the_token_that_opened_it(runtime):
    first, second = await _token(runtime, user_id=1), await _token(runtime, user_id=1)
    async with listening(runtime) as base, httpx.AsyncClient() as http:
        opened = await http.post(f"{base}/mcp", json=INIT, headers={**POST_HEADERS, "authorization": f"Bearer {first}"})
        assert opened.status_code == 200
        session = opened.headers["mcp-session-id"]
        common = {**POST_HEADERS, "mcp-session-id": session, "mcp-protocol-version": "2025-11-25"}
        ping = rpc("ping", id_=2)
        other = await http.post(f"{base}/mcp", json=ping, headers={**common, "authorization": f"Bearer {second}"})
        assert other.status_code == 404
        own = await http.post(f"{base}/mcp", json=ping, headers={**common, "authorization": f"Bearer {first}"})
        assert own.status_code == 200 and '"result":{}' in own.text


@ERAS
async def test_a_token_revoked_mid_session_is_refused_on_its_next_request(runtime, owner, mode):
    minted = await mint_token(runtime, user_id=1)
    async with listening(runtime) as base, mcp_client(base, minted["raw_token"], mode=mode) as client:
        assert not (await client.call_tool("whoami", {})).is_error
        await call(owner, "revoke-agent-token", {"token_id": minted["token_id"]})
        with pytest.raises(MCPError):  # the POST is answered 401
            await client.call_tool("whoami", {})


# --- listener hygiene -----------------------------------------------------------------------------


async def test_a_foreign_browser_origin_is_refused_and_allowed_origins_pass(runtime):
    token = await _token(runtime, user_id=1)
    auth = {**POST_HEADERS, "authorization": f"Bearer {token}"}
    async with listening(runtime, allow_origins=("https://app.example",)) as base, httpx.AsyncClient() as http:
        evil = await http.post(f"{base}/mcp", json=INIT, headers={**auth, "origin": "http://evil.example"})
        assert evil.status_code == 403
        # without a token the origin is refused first: a rebinding page learns nothing about tokens
        bare = await http.post(f"{base}/mcp", json=INIT, headers={**POST_HEADERS, "origin": "http://evil.example"})
        assert bare.status_code == 403
        rebound = await http.post(f"{base}/mcp", json=INIT, headers={**auth, "host": "evil.example"})
        assert rebound.status_code == 421
        for origin in ("https://app.example", base, "http://localhost:6274"):
            ok = await http.post(f"{base}/mcp", json=INIT, headers={**auth, "origin": origin})
            assert ok.status_code == 200, origin


async def test_an_oversized_body_is_refused_with_413_and_nothing_written(runtime):
    token = await _token(runtime, user_id=1)
    await token_principal(runtime, token)  # its first use is recorded now (then at most once a minute)
    before = await table_rows(runtime)
    big = rpc("tools/call", {"name": "create-pipeline", "arguments": {"pipeline_name": "x" * (5 * 1024 * 1024)}})
    async with listening(runtime) as base, httpx.AsyncClient() as http:
        response = await http.post(
            f"{base}/mcp", json=big, headers={**POST_HEADERS, "authorization": f"Bearer {token}"}
        )
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["message"].startswith("input_too_large: ") and error["data"]["code"] == "input_too_large"
    assert await table_rows(runtime) == before


async def test_a_client_that_never_finishes_its_request_head_is_disconnected(runtime, monkeypatch):
    monkeypatch.setattr(HeadTimeoutH11, "head_timeout", 0.5)
    async with listening(runtime, body_timeout_seconds=0.5) as base:
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
            slow.settimeout(5)
            started = time.monotonic()
            assert await anyio.to_thread.run_sync(slow.recv, 1024) == b""  # closed by the server
            assert time.monotonic() - started < 4
        token = await _token(runtime, user_id=1)
        with socket.create_connection(("127.0.0.1", port)) as trickle:
            head = (
                f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
                "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
            trickle.sendall(head.encode())  # the head, then one byte of a 1000-byte body
            trickle.settimeout(5)
            answer = await anyio.to_thread.run_sync(trickle.recv, 4096)
            assert answer.startswith(b"HTTP/1.1 408")


async def test_calls_over_the_token_rate_limit_are_refused_with_retry_after(runtime, owner):
    await settings(owner, http_rate_limit_per_minute=2)
    minted = await mint_token(runtime, user_id=1)
    async with listening(runtime) as base, mcp_client(base, minted["raw_token"]) as client:
        for _ in range(2):
            assert not (await client.call_tool("whoami", {})).is_error
        err = await fail(client, "whoami", {}, "rate_limited")
        assert err["message"].startswith("rate limit of 2 calls per minute exceeded; retry in ")
        assert err["data"]["retry_after"] >= 1 and err["data"]["limit"] == 2 and err["data"]["window_seconds"] == 60
        with pytest.raises(MCPError) as refused:
            await client.read_resource("datamachine://whoami")
        assert refused.value.error.message.startswith("rate_limited: ")
        assert (await client.list_tools()).tools  # listing is free
    rows = [r for r in await log_rows(runtime) if "rate limited" in r["message"]]
    assert len(rows) == 1 and rows[0]["level"] == "warning" and rows[0]["context"]["token_id"] == minted["token_id"]


async def test_health_needs_no_token(runtime):
    async with listening(runtime) as base, httpx.AsyncClient() as http:
        response = await http.get(f"{base}/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_session_lifecycle_and_header_validation(runtime):
    token = await _token(runtime, user_id=1)
    auth = {**POST_HEADERS, "authorization": f"Bearer {token}"}
    async with listening(runtime) as base, httpx.AsyncClient() as http:
        # headers the transport requires
        assert (
            await http.post(f"{base}/mcp", json=INIT, headers={**auth, "content-type": "text/plain"})
        ).status_code == 400
        assert (await http.post(f"{base}/mcp", json=INIT, headers={**auth, "accept": "text/html"})).status_code == 406
        opened = await http.post(f"{base}/mcp", json=INIT, headers=auth)
        session = {**auth, "mcp-session-id": opened.headers["mcp-session-id"]}
        wrong_version = await http.post(
            f"{base}/mcp", json=rpc("ping", id_=2), headers={**session, "mcp-protocol-version": "1999-01-01"}
        )
        assert wrong_version.status_code == 400
        ping = await http.post(
            f"{base}/mcp", json=rpc("ping", id_=3), headers={**session, "mcp-protocol-version": "2025-11-25"}
        )
        assert ping.status_code == 200
        assert (await http.delete(f"{base}/mcp", headers=session)).status_code == 200
        ended = await http.post(
            f"{base}/mcp", json=rpc("ping", id_=4), headers={**session, "mcp-protocol-version": "2025-11-25"}
        )
        assert ended.status_code == 404  # a closed session is gone
