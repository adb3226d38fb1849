"""Asking the user: confirmations of destructive tools and the decision of an approval, with a real client.

Over stdio (a server subprocess) in both protocol eras: the handshake era answers an ``elicitation/create``
request during the call; the 2026 era gets an ``input_required`` result and retries with the answer (the
SDK ``Client`` does both). Declined or cancelled questions write nothing.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters

from datamachine_mcp.abilities.registry import load_all as load_abilities
from tests.conftest import call, fail
from tests.jobs_support import approval_step, echo_step, fetch_step, make_flow

pytestmark = pytest.mark.anyio

ERAS = ["legacy", "2026-07-28"]


class User:
    """The person behind the client: answers each question as told, and remembers what was asked."""

    def __init__(self, action: str = "accept", content: dict[str, Any] | None = None) -> None:
        self.action = action
        self.content = content
        self.asked: list[types.ElicitRequestFormParams] = []

    async def __call__(self, context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        assert isinstance(params, types.ElicitRequestFormParams)
        self.asked.append(params)
        content = self.content if self.action == "accept" else None
        return types.ElicitResult(action=self.action, content=content)


def _params(tmp_path: Path) -> StdioServerParameters:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMACHINE_")}
    env |= {"XDG_DATA_HOME": str(tmp_path / "xdg"), "DATAMACHINE_DATA_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "datamachine_mcp.server.cli", "--db", str(tmp_path / "dm.db"), "--toolsets", "all"],
        env=env,
    )


@asynccontextmanager
async def client(tmp_path: Path, mode: str, user: User | None):
    kwargs: dict[str, Any] = {"mode": mode}
    if user is not None:
        kwargs["elicitation_callback"] = user
    async with Client(_params(tmp_path), **kwargs) as c:
        yield c


def rows(tmp_path: Path, sql: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(f"file:{tmp_path / 'dm.db'}?mode=ro", uri=True, timeout=10)) as conn:
        return conn.execute(sql).fetchall()


def test_destructive_tools_declare_a_confirmation():
    abilities = load_abilities()
    confirmed = {slug for slug, a in abilities.items() if a.ask is not None and a.ask.kind == "confirmation"}
    assert confirmed == {"delete-pipeline", "delete-flow", "delete-jobs", "clear-processed-items", "clear-logs"}
    for slug in confirmed:
        assert abilities[slug].input_schema["properties"]["confirm"]["type"] == "boolean"
    assert abilities["resolve-pending-action"].ask.kind == "decision"
    assert "decision" not in abilities["resolve-pending-action"].input_schema["required"]


@pytest.mark.parametrize("mode", ERAS)
async def test_delete_asks_and_only_an_accepted_answer_deletes(tmp_path, mode):
    for action, code in (("decline", "declined_by_user"), ("cancel", "cancelled_by_user")):
        user = User(action)
        async with client(tmp_path, mode, user) as c:
            made = await call(c, "create-pipeline", {"pipeline_name": f"Keep {action}"})
            before = rows(tmp_path, "SELECT count(*) FROM datamachine_logs")
            err = await fail(c, "delete-pipeline", {"pipeline_id": made["pipeline_id"]}, code)
            assert "Nothing was changed" in err["message"]
            assert f"Delete pipeline {made['pipeline_id']}" in user.asked[0].message
            # nothing written: the pipeline is there, and not even an audit row was added
            assert rows(
                tmp_path, f"SELECT pipeline_id FROM datamachine_pipelines WHERE pipeline_id = {made['pipeline_id']}"
            )
            assert rows(tmp_path, "SELECT count(*) FROM datamachine_logs") == before
    user = User("accept", {})
    async with client(tmp_path, mode, user) as c:
        made = await call(c, "create-pipeline", {"pipeline_name": "Gone"})
        out = await call(c, "delete-pipeline", {"pipeline_id": made["pipeline_id"]})
        assert out["pipeline_id"] == made["pipeline_id"] and len(user.asked) == 1
        assert user.asked[0].requested_schema == {"type": "object", "properties": {}}
        assert not rows(tmp_path, f"SELECT 1 FROM datamachine_pipelines WHERE pipeline_id = {made['pipeline_id']}")
        # confirm: true skips the question
        other = await call(c, "create-pipeline", {"pipeline_name": "Sure"})
        await call(c, "delete-pipeline", {"pipeline_id": other["pipeline_id"], "confirm": True})
        assert len(user.asked) == 1


@pytest.mark.parametrize("mode", ERAS)
async def test_every_confirmed_tool_asks_first(tmp_path, mode):
    user = User("decline")
    async with client(tmp_path, mode, user) as c:
        made = await call(c, "create-pipeline", {"pipeline_name": "P", "workflow": {"steps": [echo_step()]}})
        cases = [
            ("delete-flow", {"flow_id": made["flow_id"]}, f"Delete flow {made['flow_id']}"),
            ("delete-jobs", {"type": "failed", "flow_id": made["flow_id"]}, f"failed jobs of flow {made['flow_id']}"),
            ("clear-processed-items", {"clear_type": "flow", "target_id": made["flow_id"]}, "processed items of flow"),
            ("clear-logs", {}, "every log entry of every agent"),
        ]
        for tool, args, asked in cases:
            await fail(c, tool, args, "declined_by_user")
            assert asked in user.asked[-1].message, (tool, user.asked[-1].message)
        assert len(user.asked) == len(cases)
        # invalid input is refused before anyone is asked
        await fail(c, "delete-flow", {"flow_id": "x"}, "invalid_input")
        assert len(user.asked) == len(cases)
    assert rows(tmp_path, "SELECT count(*) FROM datamachine_flows") == [(1,)]


@pytest.mark.parametrize("mode", ERAS)
async def test_without_elicitation_deletes_behave_as_before(tmp_path, mode):
    async with client(tmp_path, mode, None) as c:
        made = await call(c, "create-pipeline", {"pipeline_name": "Plain"})
        assert (await call(c, "delete-pipeline", {"pipeline_id": made["pipeline_id"]}))["pipeline_id"]
        assert not rows(tmp_path, "SELECT 1 FROM datamachine_pipelines")


async def _waiting_action(c: Client) -> tuple[int, str]:
    workflow = {"steps": [approval_step(), echo_step()]}
    started = await call(c, "execute-workflow", {"workflow": workflow, "wait_seconds": 0})
    for _ in range(100):
        listed = (await call(c, "list-pending-actions", {}))["actions"]
        if listed:
            return started["job_id"], listed[0]["action_id"]
        await c.call_tool(
            "wait-for-job", {"job_id": started["job_id"], "timeout_seconds": 0.2, "stop_on_waiting": True}
        )
    raise AssertionError("the job never reached its approval")


@pytest.mark.parametrize("mode", ERAS)
async def test_resolve_without_a_decision_asks_the_user(tmp_path, mode):
    user = User("decline")
    async with client(tmp_path, mode, user) as c:
        job_id, action_id = await _waiting_action(c)
        await fail(c, "resolve-pending-action", {"action_id": action_id}, "declined_by_user")
        form = user.asked[0]
        assert form.requested_schema["properties"]["decision"]["enum"] == ["accepted", "rejected"]
        assert form.requested_schema["required"] == ["decision"]
        assert (await call(c, "get-pending-action", {"action_id": action_id}))["action"]["status"] == "pending"
        user.action, user.content = "accept", {"decision": "accepted", "note": "looks right"}
        out = await call(c, "resolve-pending-action", {"action_id": action_id})
        assert out["decision"] == "accepted" and out["job_id"] == job_id
        decided = (await call(c, "get-pending-action", {"action_id": action_id}))["action"]
        assert decided["status"] == "accepted" and decided["note"] == "looks right"
        assert len(user.asked) == 2


@pytest.mark.parametrize("mode", ERAS)
async def test_the_approval_question_shows_the_flow_the_step_and_what_awaits_approval(tmp_path, mode):
    inbox = tmp_path / "files" / "in"
    inbox.mkdir(parents=True)
    (inbox / "launch.md").write_text("---\ntitle: Launch notes\n---\nWe ship the new importer on Monday.\n")
    user = User("decline")
    async with client(tmp_path, mode, user) as c:
        steps = [fetch_step(inbox), approval_step(description="Check the facts"), echo_step()]
        made = await make_flow(c, steps, name="Release digest")
        job_id = (await call(c, "run-flow", {"flow_id": made["flow_id"], "wait_seconds": 0}))["job_id"]
        parked = await call(c, "wait-for-job", {"job_id": job_id, "timeout_seconds": 30, "stop_on_waiting": True})
        action_id = parked["job"]["wait"]["action_id"]
        err = await fail(c, "resolve-pending-action", {"action_id": action_id}, "declined_by_user")
        asked = user.asked[0].message
        assert asked.startswith(f"Approval {action_id}: accept"), asked
        flow_name = parked["job"]["flow_name"]
        assert f"Flow: {flow_name} (flow {made['flow_id']}, job {job_id})" in asked, asked
        assert "Step 2/3: " in asked and "Check the facts" in asked, asked
        assert "Awaiting approval: Launch notes" in asked, asked
        assert "Preview: We ship the new importer on Monday." in asked, asked
        assert "Launch notes" not in err["message"]  # the refusal quotes only the question


@pytest.mark.parametrize("mode", ERAS)
async def test_resolve_without_a_decision_fails_clearly_when_nobody_can_be_asked(tmp_path, mode):
    async with client(tmp_path, mode, None) as c:
        _, action_id = await _waiting_action(c)
        err = await fail(c, "resolve-pending-action", {"action_id": action_id}, "decision_required")
        assert "accepted or rejected" in err["message"]
        assert (await call(c, "get-pending-action", {"action_id": action_id}))["action"]["status"] == "pending"
        # with a decision the call works as before
        assert (await call(c, "resolve-pending-action", {"action_id": action_id, "decision": "rejected"}))[
            "decision"
        ] == "rejected"


async def test_2026_era_asks_with_input_required_and_a_sealed_state(tmp_path):
    async with client(tmp_path, "2026-07-28", User("accept", {})) as c:
        made = await call(c, "create-pipeline", {"pipeline_name": "Sealed"})
        args = {"pipeline_id": made["pipeline_id"]}
        first = await c.session.call_tool("delete-pipeline", args, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult)
        ((key, request),) = first.input_requests.items()
        assert isinstance(request, types.ElicitRequest) and "Delete pipeline" in request.params.message
        state = first.request_state
        assert state and "delete-pipeline" not in state  # sealed, not readable by the client
        accept = {key: types.ElicitResult(action="accept", content={})}
        # a forged state, or the state of another call, is refused and deletes nothing
        for forged_args, forged_state in ((args, "asked:delete-pipeline"), ({"pipeline_id": 999}, state)):
            with pytest.raises(Exception, match="Invalid or expired requestState"):
                await c.session.call_tool(
                    "delete-pipeline",
                    forged_args,
                    input_responses=accept,
                    request_state=forged_state,
                    allow_input_required=True,
                )
        assert rows(tmp_path, "SELECT count(*) FROM datamachine_pipelines") == [(1,)]
        # an answer without the state of our question is not taken as one: the question comes again
        again = await c.session.call_tool("delete-pipeline", args, input_responses=accept, allow_input_required=True)
        assert isinstance(again, types.InputRequiredResult)
        done = await c.session.call_tool(
            "delete-pipeline", args, input_responses=accept, request_state=state, allow_input_required=True
        )
        assert isinstance(done, types.CallToolResult) and not done.is_error
        assert rows(tmp_path, "SELECT count(*) FROM datamachine_pipelines") == [(0,)]


# --- over streamable HTTP ---------------------------------------------------------------------------
# Runs once `serve --http` exists (the HTTP transport); until then it is skipped, not silently passed.


def _has_http() -> bool:
    from datamachine_mcp.server.cli import build_parser

    return "--http" in build_parser().format_help()


def _start_http(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    """A token for the local owner, and `serve --http` on a free loopback port."""
    base = _params(tmp_path)
    cli = [sys.executable, "-m", "datamachine_mcp.server.cli"]
    minted = subprocess.run(
        [*cli, "token", "create", "--db", str(tmp_path / "dm.db"), "--user", "1"],
        env=base.env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [*cli, "serve", "--http", f"127.0.0.1:{port}", "--db", str(tmp_path / "dm.db"), "--toolsets", "all"],
        env=base.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return server, port, minted.stdout.strip()


@asynccontextmanager
async def http_client(tmp_path: Path, mode: str, user: User):
    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    server, port, token = _start_http(tmp_path)
    try:
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await anyio.sleep(0.1)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            transport = streamable_http_client(f"http://127.0.0.1:{port}/mcp", http_client=http)
            async with Client(transport, mode=mode, elicitation_callback=user) as c:
                yield c
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.skipif(not _has_http(), reason="the streamable HTTP transport (serve --http) is not in this build yet")
@pytest.mark.parametrize("mode", ERAS)
async def test_http_clients_are_asked_too(tmp_path, mode):
    for action, code in (("decline", "declined_by_user"), ("cancel", "cancelled_by_user"), ("accept", None)):
        user = User(action, {} if action == "accept" else None)
        async with http_client(tmp_path, mode, user) as c:
            made = await call(c, "create-pipeline", {"pipeline_name": f"Over HTTP {action}"})
            if code is None:
                await call(c, "delete-pipeline", {"pipeline_id": made["pipeline_id"]})
            else:
                await fail(c, "delete-pipeline", {"pipeline_id": made["pipeline_id"]}, code)
            assert len(user.asked) == 1
            left = rows(tmp_path, f"SELECT 1 FROM datamachine_pipelines WHERE pipeline_id = {made['pipeline_id']}")
            assert bool(left) == (code is not None)
