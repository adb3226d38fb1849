"""Job resources: datamachine://jobs/{job_id} and datamachine://jobs/{job_id}/logs, and their notifications."""

from __future__ import annotations

import json

import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from tests import jobs_support
from tests.conftest import call, changed_tables, connect, log_rows, table_rows
from tests.jobs_support import USER2, USER3, echo_step, files_flow, grant, make_agent, make_flow, run, wait_job
from tests.test_resources import Inbox

pytestmark = pytest.mark.anyio
engine = jobs_support.engine  # fixture

RESOURCE_NOT_FOUND = -32002


async def read(client, uri: str) -> dict:
    result = await client.read_resource(uri, cache_mode="bypass")
    assert len(result.contents) == 1 and result.contents[0].mime_type == "application/json"
    return json.loads(result.contents[0].text)


async def test_templates_are_listed(owner):
    templates = {t.uri_template: t for t in (await owner.list_resource_templates()).resource_templates}
    assert templates["datamachine://jobs/{job_id}"].name == "job"
    assert templates["datamachine://jobs/{job_id}/logs"].name == "job-logs"


async def test_job_resource_is_the_twin_output(runtime, owner):
    made = await files_flow(owner, runtime)
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    await call(owner, "cancel-job", {"job_id": job_id})
    assert await read(owner, f"datamachine://jobs/{job_id}") == await call(owner, "get-jobs", {"job_id": job_id})
    logs = await read(owner, f"datamachine://jobs/{job_id}/logs")
    assert logs == await call(owner, "read-logs", {"job_id": job_id})
    assert logs["total"] >= 1 and all(row["job_id"] == job_id for row in logs["items"])
    assert any(row["message"] == f"cancel-job: job {job_id} cancelled - manual" for row in logs["items"])


@pytest.mark.parametrize(
    "uri",
    ["datamachine://jobs/999", "datamachine://jobs/999/logs", "datamachine://jobs/0", "datamachine://jobs/abc/logs"],
)
async def test_unknown_job_is_resource_not_found(runtime, owner, uri):
    before = await table_rows(runtime)
    with pytest.raises(MCPError) as exc:
        await owner.read_resource(uri, cache_mode="bypass")
    assert exc.value.error.code == RESOURCE_NOT_FOUND
    assert await table_rows(runtime) == before


async def test_unreadable_job_is_refused_like_the_twin(runtime, owner):
    bot = await make_agent(owner)
    await grant(owner, bot, 2, "viewer")
    made = await files_flow(owner, runtime, agent_id=bot)
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    async with connect(runtime, USER2) as viewer:
        job = await read(viewer, f"datamachine://jobs/{job_id}")
        assert job["jobs"][0]["job_id"] == job_id
        assert (await read(viewer, f"datamachine://jobs/{job_id}/logs"))["total"] >= 1
    async with connect(runtime, USER3) as stranger:
        for uri in (f"datamachine://jobs/{job_id}", f"datamachine://jobs/{job_id}/logs"):
            before = await table_rows(runtime)
            with pytest.raises(MCPError) as exc:
                await stranger.read_resource(uri, cache_mode="bypass")
            assert exc.value.message.startswith("agent_access_denied: ")
            # the same trail as the twin's refusal: one denial row
            changed = changed_tables(before, await table_rows(runtime))
            assert list(changed) == ["datamachine_logs"] and len(changed["datamachine_logs"][1]) == 1
            assert (await log_rows(runtime))[-1]["message"] == "get-jobs denied: agent_access_denied"


async def test_subscription_is_notified_of_status_changes(runtime, owner):
    made = await files_flow(owner, runtime)
    job_id = (await run(owner, made["flow_id"]))["job_id"]
    other = (await run(owner, made["flow_id"]))["job_id"]
    inbox = Inbox()
    async with connect(runtime, message_handler=inbox) as client:
        await client.subscribe_resource(f"datamachine://jobs/{job_id}")
        await call(client, "cancel-job", {"job_id": other})  # not subscribed
        await call(client, "get-jobs", {"job_id": job_id})  # reads notify nothing
        await call(client, "fail-job", {"job_id": job_id})
        updated = await inbox.wait_for(types.ResourceUpdatedNotification)
        assert [str(n.params.uri) for n in updated] == [f"datamachine://jobs/{job_id}"]
        assert (await read(client, f"datamachine://jobs/{job_id}"))["jobs"][0]["status"] == "failed - manual"
        await call(client, "retry-job", {"job_id": job_id})
        await inbox.wait_for(types.ResourceUpdatedNotification, 2)


async def test_subscription_follows_the_engine(runtime, owner, engine):
    made = await make_flow(owner, [echo_step(a=1), echo_step(b=2)])
    inbox = Inbox()
    async with connect(runtime, message_handler=inbox) as client:
        # the next job id is known in advance: subscribe before it exists, so no change is missed
        await client.subscribe_resource("datamachine://jobs/1")
        job_id = (await run(client, made["flow_id"]))["job_id"]
        assert job_id == 1
        assert (await wait_job(client, job_id))["job"]["status"] == "completed"
        updated = await inbox.wait_for(types.ResourceUpdatedNotification, 2)
        assert {str(n.params.uri) for n in updated} == {"datamachine://jobs/1"}
