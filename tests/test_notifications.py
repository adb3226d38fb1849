"""Change notifications: coalesced per URI, and only to principals that may read it.

See docs/architecture.md, Notifications.
"""

from __future__ import annotations

import time

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.shared.subscriptions import ResourceUpdated

from tests.conftest import call, connect, log_rows, make_server
from tests.jobs_support import USER2, USER3, files_flow, grant, make_agent, run
from tests.test_resources import Inbox

pytestmark = pytest.mark.anyio


class TimedInbox(Inbox):
    """An inbox that also notes when each resources/updated arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrivals: list[tuple[str, float]] = []

    async def __call__(self, message) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            self.arrivals.append((str(message.params.uri), time.monotonic()))
        await super().__call__(message)


async def test_a_burst_of_changes_is_one_notification_now_and_one_at_the_window_end(runtime):
    app = make_server(runtime)
    inbox = TimedInbox()
    async with Client(app.server, mode="legacy", message_handler=inbox) as client:
        await client.subscribe_resource("datamachine://jobs/1")
        await client.subscribe_resource("datamachine://jobs/2")
        await app.resource_updated("datamachine://jobs/1")
        await inbox.wait_for(types.ResourceUpdatedNotification)
        for _ in range(20):  # twenty changes within the 250 ms that follow the first notification
            await app.resource_updated("datamachine://jobs/1")
            await anyio.sleep(0.002)
        await app.resource_updated("datamachine://jobs/2")  # another URI is not held back
        await inbox.wait_for(types.ResourceUpdatedNotification, 3)
        await anyio.sleep(0.6)  # nothing more is pending
    ones = [at for uri, at in inbox.arrivals if uri == "datamachine://jobs/1"]
    assert len(ones) == 2 and ones[1] - ones[0] >= 0.24
    twos = [at for uri, at in inbox.arrivals if uri == "datamachine://jobs/2"]
    assert len(twos) == 1 and twos[0] < ones[1]


async def _agent_job(owner, runtime) -> int:
    bot = await make_agent(owner)
    await grant(owner, bot, USER2.user_id, "viewer")
    made = await files_flow(owner, runtime, agent_id=bot)
    return (await run(owner, made["flow_id"]))["job_id"]


@pytest.mark.parametrize(("principal", "told"), [(USER2, True), (USER3, False)], ids=["viewer", "stranger"])
async def test_job_updates_reach_only_principals_that_may_read_the_job(runtime, owner, principal, told):
    job_id = await _agent_job(owner, runtime)
    job_uri = f"datamachine://jobs/{job_id}"
    inbox = Inbox()
    # the newest server delivers the runtime's events; the owner's calls make the changes
    async with connect(runtime, principal, message_handler=inbox) as client:
        await client.subscribe_resource(job_uri)
        await client.subscribe_resource("datamachine://pipelines")  # readable by everyone (filtered)
        await call(owner, "fail-job", {"job_id": job_id})
        await call(owner, "create-pipeline", {"pipeline_name": "Marker"})
        await inbox.wait_for(types.ResourceUpdatedNotification)
        await anyio.sleep(0.5)
    uris = [str(n.params.uri) for n in inbox.of(types.ResourceUpdatedNotification)]
    assert "datamachine://pipelines" in uris
    assert (job_uri in uris) is told
    # the server's visibility checks are not the subscriber's attempts: no denial rows
    assert [r["message"] for r in await log_rows(runtime) if "denied" in r["message"]] == []


async def test_listen_streams_see_only_what_their_principal_may_read(runtime, owner):
    job_id = await _agent_job(owner, runtime)
    job_uri = f"datamachine://jobs/{job_id}"
    app = make_server(runtime, USER3)
    events: list[str] = []
    async with (
        Client(app.server) as client,
        client.listen(resource_subscriptions=[job_uri, "datamachine://pipelines"]) as sub,
    ):
        await call(owner, "fail-job", {"job_id": job_id})
        await call(owner, "create-pipeline", {"pipeline_name": "Marker"})
        with anyio.fail_after(5):
            async for event in sub:
                if isinstance(event, ResourceUpdated):
                    events.append(event.uri)
                    if event.uri == "datamachine://pipelines":
                        break
    assert job_uri not in events


async def test_a_deleted_resource_is_announced_to_those_who_could_read_it(runtime, owner):
    bot = await make_agent(owner, "helper")
    await grant(owner, bot, USER2.user_id, "viewer")
    inbox = Inbox()
    async with connect(runtime, USER2, message_handler=inbox) as client:
        await client.subscribe_resource("datamachine://agents/helper")
        await call(owner, "delete-agent", {"agent_id": bot})
        updated = await inbox.wait_for(types.ResourceUpdatedNotification)
    assert [str(n.params.uri) for n in updated] == ["datamachine://agents/helper"]
