"""One server, many sessions: each connection acts as its own principal, is told only what that principal
may read, and is forgotten (notifications and sampling) when it closes. This is the shape of a
streamable-HTTP process, exercised here with in-memory connections."""

from __future__ import annotations

from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.registry import load_all as load_abilities
from datamachine_mcp.resources.registry import load_all as load_resources
from datamachine_mcp.server.app import DataMachineServer
from datamachine_mcp.server.errors import RESOURCE_NOT_FOUND
from datamachine_mcp.server.notifications import Notifications
from tests.conftest import call, connect, error_of
from tests.jobs_support import USER2, USER3, files_flow, grant, make_agent, run
from tests.test_resources import Inbox

pytestmark = pytest.mark.anyio


def per_connection(*principals: Principal | None) -> Any:
    """A resolver giving each new connection the next principal (None: the token was refused)."""
    given: dict[int, Principal | None] = {}

    async def resolve(ctx: Any) -> Principal:
        key = id(ctx.session._connection)
        if key not in given:
            given[key] = principals[len(given)]
        principal = given[key]
        if principal is None:
            raise AbilityError("unauthenticated", "token revoked or expired")
        return principal

    return resolve


async def test_sessions_of_one_server_are_told_by_their_own_principal(runtime, owner):
    bot = await make_agent(owner)
    await grant(owner, bot, USER2.user_id, "viewer")
    job_id = (await run(owner, (await files_flow(owner, runtime, agent_id=bot))["flow_id"]))["job_id"]
    job_uri = f"datamachine://jobs/{job_id}"
    app = DataMachineServer(runtime, load_abilities(), load_resources(), per_connection(USER2, USER3))
    viewer, stranger = Inbox(), Inbox()
    async with (
        Client(app.server, mode="legacy", message_handler=viewer) as c2,
        Client(app.server, mode="legacy", message_handler=stranger) as c3,
    ):
        assert (await call(c2, "whoami"))["user_id"] == 2
        assert (await call(c3, "whoami"))["user_id"] == 3
        for client in (c2, c3):
            await client.subscribe_resource(job_uri)
            await client.subscribe_resource("datamachine://pipelines")
        await call(owner, "fail-job", {"job_id": job_id})
        await call(owner, "create-pipeline", {"pipeline_name": "Marker"})
        await viewer.wait_for(types.ResourceUpdatedNotification, 2)
        await stranger.wait_for(types.ResourceUpdatedNotification)
        await anyio.sleep(0.5)
    told = {
        name: {str(n.params.uri) for n in inbox.of(types.ResourceUpdatedNotification)}
        for name, inbox in (("viewer", viewer), ("stranger", stranger))
    }
    assert told == {"viewer": {job_uri, "datamachine://pipelines"}, "stranger": {"datamachine://pipelines"}}


async def test_a_closed_connection_is_forgotten(runtime):
    hub = Notifications.of(runtime)

    async def sample(_context: Any, params: Any) -> types.CreateMessageResult:
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="x"), model="m")

    async with connect(runtime, sampling_callback=sample) as client:
        await client.subscribe_resource("datamachine://jobs/7")
        await call(client, "whoami")
        assert hub.subscribed_job_ids() == {7}
        assert len(hub.sampling.candidates(origin_session_id=None, user_id=1)) == 1
    assert hub.subscribed_job_ids() == set()  # no more polling for it, nothing sent to it
    assert hub.sampling.candidates(origin_session_id=None, user_id=1) == []


async def test_refused_requests_are_coded_protocol_errors(runtime):
    app = DataMachineServer(runtime, load_abilities(), load_resources(), per_connection(None))
    async with Client(app.server, mode="legacy") as client:
        result = await client.call_tool("whoami", {})
        assert result.is_error and error_of(result)["code"] == "unauthenticated"
        assert result.content[0].text == "unauthenticated: token revoked or expired"
        with pytest.raises(MCPError) as exc:
            await client.read_resource("datamachine://whoami", cache_mode="bypass")
        assert exc.value.code == types.INVALID_REQUEST
        assert exc.value.message == "unauthenticated: token revoked or expired"
    async with connect(runtime) as client:
        with pytest.raises(MCPError) as exc:
            await client.read_resource("datamachine://nothing", cache_mode="bypass")
        assert exc.value.code == RESOURCE_NOT_FOUND
        assert exc.value.message == "resource_not_found: Unknown resource: datamachine://nothing"
        assert exc.value.data == {"uri": "datamachine://nothing"}
