"""Flows toolset: get/create/update/delete/duplicate flows, pause/resume, the flow resource.

Helpers here (pipelines built directly from the shared step builder, agents, grants) are reused by the other
flow test modules.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError
from sqlalchemy import select

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.abilities.pipeline_common import build_pipeline_step
from datamachine_mcp.storage.models import Flow, Job, Pipeline, ProcessedItem
from datamachine_mcp.storage.timeutil import utcnow
from tests.conftest import call, changed_tables, connect, count, fail, log_rows, table_rows

pytestmark = pytest.mark.anyio

USER2 = Principal(user_id=2, transport="http")
USER3 = Principal(user_id=3, transport="http")

FETCH = {"step_type": "fetch", "handler_slug": "rss", "handler_config": {"feed_url": "https://example.com/feed"}}
AI = {"step_type": "ai", "label": "Write", "system_prompt": "Be brief.", "provider": "openai", "model": "gpt-4o-mini"}
PUBLISH = {
    "step_type": "publish",
    "handler_slug": "webhook",
    "handler_config": {"url": "https://hooks.example/in", "secret": "pipeline-secret"},
}
STEPS = (FETCH, AI, PUBLISH)


# --- helpers shared by the flow test modules ----------------------------------------------------


async def make_pipeline(
    runtime, steps=STEPS, *, name: str = "News", agent_id: int | None = None, user_id: int = 1
) -> tuple[int, list[str]]:
    """A pipeline with ``steps`` (built like add-pipeline-step does); returns (pipeline_id, pipeline_step_ids)."""
    async with runtime.db.write() as s:
        now = utcnow()
        pipeline = Pipeline(
            pipeline_name=name, user_id=user_id, agent_id=agent_id, pipeline_config={}, created_at=now, updated_at=now
        )
        s.add(pipeline)
        await s.flush()
        config = {}
        for order, seed in enumerate(steps):
            step = build_pipeline_step(pipeline.pipeline_id, dict(seed), order, box=runtime.box, files_roots=None)
            config[step["pipeline_step_id"]] = step
        pipeline.pipeline_config = config
        return pipeline.pipeline_id, list(config)


async def make_agent(client, slug: str = "bot", *grants: tuple[int, str]) -> int:
    out = await call(client, "create-agent", {"agent_slug": slug})
    for user_id, role in grants:
        await call(client, "grant-agent-access", {"agent_slug": slug, "user_id": user_id, "role": role})
    return out["agent_id"]


async def make_flow(client, pipeline_id: int, **args: Any) -> dict[str, Any]:
    return await call(client, "create-flow", {"pipeline_id": pipeline_id, **args})


async def flow_row(runtime, flow_id: int) -> Flow | None:
    async with runtime.db.read() as s:
        return (await s.execute(select(Flow).where(Flow.flow_id == flow_id))).scalar_one_or_none()


async def raw_config(runtime, flow_id: int) -> dict[str, Any]:
    """The stored flow_config JSON exactly as in the database row."""
    row = await flow_row(runtime, flow_id)
    assert row is not None
    return row.flow_config


async def audits(runtime, ability: str) -> list[dict[str, Any]]:
    return [
        r for r in await log_rows(runtime) if (r["context"] or {}).get("ability") == ability and r["level"] == "info"
    ]


async def unchanged(runtime, client, tool: str, args: dict[str, Any], code: str) -> dict[str, Any]:
    """The call fails with ``code`` and writes nothing at all."""
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    assert await table_rows(runtime) == before
    return err


async def denied(runtime, client, tool: str, args: dict[str, Any], code: str = "agent_access_denied") -> dict:
    """A refusal: only the denial warning row is written."""
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    changed = changed_tables(before, await table_rows(runtime))
    assert list(changed) == ["datamachine_logs"], changed
    assert len(changed["datamachine_logs"][1]) == 1
    return err


def invalid_fields(err: dict[str, Any]) -> list[str]:
    return [e["field"] for e in err["data"]["errors"]]


class Inbox:
    """Collects server notifications of one client session."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._event = anyio.Event()

    async def __call__(self, message) -> None:
        if isinstance(message, Exception):
            raise message
        self.items.append(message)
        self._event.set()
        self._event = anyio.Event()

    def uris(self) -> list[str]:
        return [str(m.params.uri) for m in self.items if isinstance(m, types.ResourceUpdatedNotification)]

    def list_changed(self) -> int:
        return sum(isinstance(m, types.ResourceListChangedNotification) for m in self.items)

    async def wait_for(self, predicate) -> None:
        with anyio.fail_after(5):
            while not predicate():
                await self._event.wait()


# --- create-flow ----------------------------------------------------------------------------


async def test_flow_created_after_steps_exist_has_one_step_per_pipeline_step(runtime, owner):
    pid, psids = await make_pipeline(runtime)
    out = await make_flow(owner, pid, flow_name="  Morning digest ")
    fid = out["flow_id"]
    assert out["flow_name"] == "Morning digest"
    assert out["pipeline_id"] == pid and out["agent_id"] is None
    assert out["synced_steps"] == [f"{psid}_{fid}" for psid in psids]
    assert out["configured_steps"] == [] and out["warnings"] == [] and out["next_run"] is None
    config = out["flow_data"]["flow_config"]
    assert list(config) == out["synced_steps"]
    fetch, ai, publish = (config[f"{psid}_{fid}"] for psid in psids)
    for order, (step, psid) in enumerate(zip((fetch, ai, publish), psids, strict=True)):
        assert step["flow_step_id"] == f"{psid}_{fid}"
        assert step["pipeline_step_id"] == psid
        assert (step["execution_order"], step["pipeline_id"], step["flow_id"]) == (order, pid, fid)
    assert fetch["handler_slugs"] == ["rss"]
    assert fetch["handler_configs"] == {"rss": {"feed_url": "https://example.com/feed"}}
    assert (fetch["queue_mode"], fetch["config_patch_queue"]) == ("static", [])
    assert (ai["label"], ai["queue_mode"], ai["prompt_queue"], ai["flow_step_settings"]) == ("Write", "static", [], {})
    # the pipeline step's secret default is copied as an envelope and read back masked
    assert publish["handler_configs"] == {"webhook": {"url": "https://hooks.example/in", "secret": "********"}}
    stored = await raw_config(runtime, fid)
    envelope = stored[f"{psids[2]}_{fid}"]["handler_configs"]["webhook"]["secret"]
    assert set(envelope) == {"__encrypted__"} and "pipeline-secret" not in json.dumps(stored)
    data = out["flow_data"]
    assert data["scheduling_config"] == {"interval": "manual"}
    assert (data["step_count"], data["enabled"], data["is_running"], data["webhook_enabled"]) == (3, True, False, False)
    assert data == (await call(owner, "get-flows", {"flow_id": fid}))["flows"][0]
    rows = await audits(runtime, "create-flow")
    assert len(rows) == 1 and rows[0]["flow_id"] == fid and rows[0]["pipeline_id"] == pid


async def test_create_flow_defaults_owner_name_and_missing_field_warnings(runtime, owner):
    agent_id = await make_agent(owner, "bot")
    pid, _psids = await make_pipeline(runtime, [{"step_type": "fetch", "handler_slug": "rss"}], agent_id=agent_id)
    out = await make_flow(owner, pid, flow_name="   ")
    assert out["flow_name"] == "Flow"
    assert out["agent_id"] == agent_id  # the pipeline's agent
    assert out["flow_data"]["user_id"] == 1
    assert len(out["warnings"]) == 1 and "feed_url" in out["warnings"][0]
    other = await make_agent(owner, "other")
    moved = await make_flow(owner, pid, agent_id=other)
    assert moved["agent_id"] == other


async def test_create_flow_step_configs_by_type_and_by_id(runtime, owner):
    pid, psids = await make_pipeline(
        runtime, [FETCH, {"step_type": "publish", "handler_slug": "files"}, {"step_type": "publish"}, AI]
    )
    out = await make_flow(
        owner,
        pid,
        step_configs={
            "publish": {"handler_slug": "webhook", "handler_config": {"url": "https://a.example/"}},
            psids[1]: {"handler_slugs": ["webhook"], "handler_configs": {"webhook": {"url": "https://b.example/"}}},
            "ai": {"user_message": "  Summarise the news  ", "queue_mode": "drain"},
            "fetch": {"handler_config": {"max_items": 5}},
        },
    )
    fid = out["flow_id"]
    config = out["flow_data"]["flow_config"]
    steps = [config[f"{psid}_{fid}"] for psid in psids]
    assert steps[0]["handler_configs"] == {"rss": {"feed_url": "https://example.com/feed", "max_items": 5}}
    assert steps[1]["handler_configs"] == {"webhook": {"url": "https://b.example/"}}  # the id key wins
    assert steps[2]["handler_configs"] == {"webhook": {"url": "https://a.example/"}}
    assert steps[3]["queue_mode"] == "drain"
    assert [e["prompt"] for e in steps[3]["prompt_queue"]] == ["Summarise the news"]
    assert out["configured_steps"] == out["synced_steps"]


@pytest.mark.parametrize(
    ("args", "code", "check"),
    [
        ({"pipeline_id": 999}, "pipeline_not_found", {"pipeline_id": 999}),
        ({"agent_id": 999}, "agent_not_found", {"agent_id": 999}),
        ({"step_configs": {"approval": {"flow_step_settings": {}}}}, "invalid_step_configs", {"key": "approval"}),
        ({"step_configs": {"fetch": {"user_message": "hi"}}}, "invalid_step_configs", None),
        ({"step_configs": {"fetch": {"handler_slug": "nope"}}}, "handler_not_found", {"handler_slug": "nope"}),
        ({"step_configs": {"publish": {"handler_slug": "rss"}}}, "invalid_handler", None),
        ({"step_configs": {"ai": {"handler_slug": "rss"}}}, "invalid_handler", None),
        ({"step_configs": {"fetch": {"handler_config": {"feed": "x"}}}}, "invalid_handler_config", None),
        ({"scheduling_config": {"interval": "sometimes"}}, "invalid_interval", None),
        ({"scheduling_config": {"interval": "one_time"}}, "missing_timestamp", None),
    ],
)
async def test_create_flow_errors_write_nothing(runtime, owner, args, code, check):
    pid, _ = await make_pipeline(runtime)
    err = await unchanged(runtime, owner, "create-flow", {"pipeline_id": pid, **args}, code)
    if check:
        assert {k: err["data"][k] for k in check} == check
    if code == "invalid_handler_config":
        assert err["data"]["unknown_fields"] == ["feed"]
        assert "feed_url" in err["data"]["field_specs"]
    if code == "invalid_interval":
        assert err["message"].startswith("Invalid interval 'sometimes'. Valid options: ")


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({}, "pipeline_id"),
        ({"pipeline_id": "1.0"}, "pipeline_id"),
        ({"pipeline_id": 0}, "pipeline_id"),
        ({"pipeline_id": 1, "flow_name": "x" * 256}, "flow_name"),
        ({"pipeline_id": 1, "colour": "red"}, "colour"),
        ({"pipeline_id": 1, "step_configs": {"fetch": {"handler": "rss"}}}, "step_configs.fetch.handler"),
        ({"pipeline_id": 1, "scheduling_config": {"interval": "daily", "every": 2}}, "scheduling_config.every"),
        ({"pipeline_id": 1, "scheduling_config": {"timezone": "UTC"}}, "scheduling_config.interval"),
    ],
)
async def test_create_flow_invalid_input(runtime, owner, args, field):
    await make_pipeline(runtime)
    err = await unchanged(runtime, owner, "create-flow", args, "invalid_input")
    assert field in invalid_fields(err)


async def test_create_flow_validate_only_writes_nothing(runtime, owner):
    pid, psids = await make_pipeline(runtime)
    before = await table_rows(runtime)
    out = await call(
        owner,
        "create-flow",
        {
            "pipeline_id": pid,
            "flow_name": "Preview",
            "validate_only": True,
            "scheduling_config": {"interval": "daily"},
            "step_configs": {"ai": {"user_message": "Hi"}},
        },
    )
    assert await table_rows(runtime) == before
    assert out["valid"] is True and out["mode"] == "validate_only"
    preview = out["would_create"]
    assert (preview["flow_name"], preview["agent_id"]) == ("Preview", None)
    assert preview["scheduling_config"]["interval"] == "daily"
    assert [s["pipeline_step_id"] for s in preview["steps"]] == psids
    assert preview["steps"][1]["prompt_queue"][0]["prompt"] == "Hi"
    assert preview["steps"][2]["handler_configs"]["webhook"]["secret"] == "********"
    # the savepoint left no trace: the next real flow gets id 1
    assert (await make_flow(owner, pid))["flow_id"] == 1


async def test_create_flow_needs_admin_on_the_flow_agent(runtime, owner):
    bot = await make_agent(owner, "bot", (2, "operator"), (3, "admin"))
    pid, _ = await make_pipeline(runtime, agent_id=bot)
    async with connect(runtime, USER2) as c:
        err = await denied(runtime, c, "create-flow", {"pipeline_id": pid})
        assert err["data"]["required_role"] == "admin"
    async with connect(runtime, USER3) as c:
        assert (await make_flow(c, pid))["agent_id"] == bot
    # a user's own pipeline (no agent) is theirs to instantiate; another user's is invisible
    mine, _ = await make_pipeline(runtime, user_id=2)
    async with connect(runtime, USER2) as c:
        out = await make_flow(c, mine)
        assert (out["agent_id"], out["flow_data"]["user_id"]) == (None, 2)
    async with connect(runtime, USER3) as c:
        await denied(runtime, c, "create-flow", {"pipeline_id": mine})


# --- get-flows / resource ---------------------------------------------------------------------


async def test_get_flows_modes_paging_and_filters(runtime, owner):
    bot = await make_agent(owner, "bot")
    p1, _ = await make_pipeline(runtime)
    p2, _ = await make_pipeline(runtime, [{"step_type": "fetch", "handler_slug": "files"}], name="Files", agent_id=bot)
    f1 = (await make_flow(owner, p1, flow_name="A"))["flow_id"]
    f2 = (await make_flow(owner, p2, flow_name="B"))["flow_id"]
    f3 = (await make_flow(owner, p1, flow_name="C"))["flow_id"]

    full = await call(owner, "get-flows", {})
    assert [f["flow_id"] for f in full["flows"]] == [f1, f2, f3]
    assert (full["total"], full["per_page"], full["offset"], full["output_mode"]) == (3, 20, 0, "full")
    assert full["filters_applied"] == {}
    assert "flow_config" in full["flows"][0]
    listed = await call(owner, "get-flows", {"output_mode": "list"})
    assert "flow_config" not in listed["flows"][0] and listed["flows"][0]["step_count"] == 3
    summary = await call(owner, "get-flows", {"output_mode": "summary", "per_page": 2, "offset": 1})
    assert summary["flows"] == [
        {"flow_id": f2, "flow_name": "B", "pipeline_id": p2, "last_run_status": None},
        {"flow_id": f3, "flow_name": "C", "pipeline_id": p1, "last_run_status": None},
    ]
    assert summary["total"] == 3
    ids = await call(owner, "get-flows", {"output_mode": "ids", "pipeline_id": p1})
    assert (ids["flows"], ids["total"], ids["filters_applied"]) == ([f1, f3], 2, {"pipeline_id": p1})
    by_agent = await call(owner, "get-flows", {"output_mode": "ids", "agent_id": bot, "user_id": 5})
    assert (by_agent["flows"], by_agent["filters_applied"]) == ([f2], {"agent_id": bot})  # agent wins over user
    by_handler = await call(owner, "get-flows", {"output_mode": "ids", "handler_slug": "files"})
    assert (by_handler["flows"], by_handler["total"]) == ([f2], 1)
    page = await call(owner, "get-flows", {"output_mode": "ids", "handler_slug": "rss", "per_page": 1, "offset": 1})
    assert (page["flows"], page["total"]) == ([f3], 2)
    by_user = await call(owner, "get-flows", {"output_mode": "ids", "user_id": 1})
    assert by_user["flows"] == [f1, f2, f3]
    one = await call(owner, "get-flows", {"flow_id": f2, "pipeline_id": p1, "output_mode": "summary"})
    assert (one["total"], one["filters_applied"]) == (1, {"flow_id": f2})  # filters ignored with flow_id
    missing = await call(owner, "get-flows", {"flow_id": 999})
    assert (missing["flows"], missing["total"]) == ([], 0)
    err = await unchanged(runtime, owner, "get-flows", {"per_page": 101}, "invalid_input")
    assert invalid_fields(err) == ["per_page"]
    await unchanged(runtime, owner, "get-flows", {"output_mode": "tree"}, "invalid_input")
    await unchanged(runtime, owner, "get-flows", {"agent_id": 999}, "agent_not_found")


async def test_get_flows_rows_are_filtered_by_role(runtime, owner):
    mine = await make_agent(owner, "mine", (2, "viewer"))
    secret = await make_agent(owner, "secret")
    p_mine, _ = await make_pipeline(runtime, agent_id=mine)
    p_secret, _ = await make_pipeline(runtime, agent_id=secret)
    p_shared, _ = await make_pipeline(runtime, user_id=0)
    f_mine = (await make_flow(owner, p_mine))["flow_id"]
    f_secret = (await make_flow(owner, p_secret))["flow_id"]
    async with connect(runtime, USER2) as c:
        f_own = (await make_flow(c, p_shared))["flow_id"]  # a shared pipeline instantiated as user 2's flow
        out = await call(c, "get-flows", {"output_mode": "ids"})
        assert (out["flows"], out["total"]) == ([f_mine, f_own], 2)
        await denied(runtime, c, "get-flows", {"flow_id": f_secret})
        await denied(runtime, c, "get-flows", {"agent_id": secret})
        await denied(runtime, c, "get-flows", {"user_id": 1}, "permission_denied")
        assert (await call(c, "get-flows", {"user_id": 2, "output_mode": "ids"}))["flows"] == [f_own]


async def _read(client, uri: str) -> dict[str, Any]:
    result = await client.read_resource(uri)
    return json.loads(result.contents[0].text)


async def test_flow_resource_is_get_flows_for_one_flow(runtime, owner):
    secret = await make_agent(owner, "secret")
    pid, _ = await make_pipeline(runtime)
    hidden, _ = await make_pipeline(runtime, agent_id=secret)
    fid = (await make_flow(owner, pid, scheduling_config={"interval": "daily"}))["flow_id"]
    other = (await make_flow(owner, hidden))["flow_id"]
    assert await _read(owner, f"datamachine://flows/{fid}") == await call(owner, "get-flows", {"flow_id": fid})
    for uri in ("datamachine://flows/999", "datamachine://flows/0", "datamachine://flows/abc"):
        with pytest.raises(MCPError) as info:
            await owner.read_resource(uri)
        assert info.value.error.code == -32002, uri
    async with connect(runtime, USER2) as c:
        with pytest.raises(MCPError) as info:
            await c.read_resource(f"datamachine://flows/{other}")
        assert info.value.error.message.startswith("agent_access_denied: ")
    templates = (await owner.list_resource_templates()).resource_templates
    assert "datamachine://flows/{flow_id}" in [t.uri_template for t in templates]


# --- update-flow ------------------------------------------------------------------------------


async def test_update_flow_rename_schedule_and_no_op(runtime, owner):
    pid, _ = await make_pipeline(runtime)
    fid = (await make_flow(owner, pid, flow_name="Old"))["flow_id"]
    out = await call(owner, "update-flow", {"flow_id": fid, "flow_name": "  New  "})
    assert (out["flow_name"], out["updated_fields"], out["scheduling_unchanged"]) == ("New", ["flow_name"], True)
    assert out["flow_data"]["flow_name"] == "New"
    out = await call(owner, "update-flow", {"flow_id": fid, "scheduling_config": {"interval": "every_12_hours"}})
    assert out["updated_fields"] == ["scheduling_config"] and out["scheduling_unchanged"] is False
    assert out["flow_data"]["scheduling_config"]["interval"] == "twicedaily"
    assert out["flow_data"]["next_run"] is not None
    assert len(await audits(runtime, "update-flow")) == 2
    before = await table_rows(runtime)
    same = await call(
        owner,
        "update-flow",
        {"flow_id": fid, "flow_name": "New", "scheduling_config": {"interval": "twicedaily"}},
    )
    assert (same["updated_fields"], same["scheduling_unchanged"]) == ([], True)
    assert await table_rows(runtime) == before  # no write, no audit row


async def test_update_flow_errors(runtime, owner):
    pid, _ = await make_pipeline(runtime)
    fid = (await make_flow(owner, pid))["flow_id"]
    err = await unchanged(runtime, owner, "update-flow", {"flow_id": fid}, "update_failed")
    assert err["message"] == "Provide flow_name, scheduling_config or agent_id"
    await unchanged(runtime, owner, "update-flow", {"flow_id": fid, "flow_name": "  "}, "update_failed")
    await unchanged(runtime, owner, "update-flow", {"flow_id": 999, "flow_name": "x"}, "flow_not_found")
    await unchanged(runtime, owner, "update-flow", {"flow_id": fid, "agent_id": 999}, "agent_not_found")
    await unchanged(
        runtime,
        owner,
        "update-flow",
        {"flow_id": fid, "scheduling_config": {"interval": "cron"}},
        "missing_cron_expression",
    )
    err = await unchanged(runtime, owner, "update-flow", {"flow_id": fid, "flow_name": 5}, "invalid_input")
    assert invalid_fields(err) == ["flow_name"]


async def test_update_flow_move_needs_admin_on_both_agents(runtime, owner):
    a = await make_agent(owner, "a", (2, "admin"))
    b = await make_agent(owner, "b", (2, "operator"))
    c_agent = await make_agent(owner, "c", (2, "admin"))
    pid, _ = await make_pipeline(runtime, agent_id=a)
    fid = (await make_flow(owner, pid))["flow_id"]
    async with connect(runtime, USER2) as c:
        err = await denied(runtime, c, "update-flow", {"flow_id": fid, "agent_id": b})
        assert err["data"]["agent"] == "b"
        out = await call(c, "update-flow", {"flow_id": fid, "agent_id": c_agent})
        assert out["updated_fields"] == ["agent_id"] and out["flow_data"]["agent_id"] == c_agent


# --- delete-flow ------------------------------------------------------------------------------


async def _job(session, pid: int, fid: int, **extra: Any) -> Job:
    now = utcnow()
    job = Job(
        user_id=1,
        pipeline_id=str(pid),
        flow_id=str(fid),
        pipeline_key=pid,
        flow_key=fid,
        status=extra.pop("status", "completed"),
        created_at=now,
        run_at=now,
        updated_at=now,
        **extra,
    )
    session.add(job)
    await session.flush()
    return job


async def test_delete_flow_cascades_jobs_and_processed_items(runtime, owner):
    pid, psids = await make_pipeline(runtime)
    fid = (await make_flow(owner, pid))["flow_id"]
    keep = (await make_flow(owner, pid))["flow_id"]
    async with runtime.db.write() as s:
        parent = await _job(s, pid, fid)
        await _job(s, pid, fid, parent_job_id=parent.job_id, status="failed")
        await _job(s, pid, fid, status="processing")
        other = await _job(s, pid, keep)
        for i, (flow_id, job_id) in enumerate([(fid, parent.job_id), (fid, None), (keep, other.job_id)]):
            s.add(
                ProcessedItem(
                    flow_step_id=f"{psids[0]}_{flow_id}",
                    source_type="rss",
                    item_identifier=f"item-{i}",
                    job_id=job_id,
                    processed_timestamp=utcnow(),
                    status="processed",
                    flow_key=flow_id,
                )
            )
    out = await call(owner, "delete-flow", {"flow_id": fid})
    assert out == {
        "flow_id": fid,
        "pipeline_id": pid,
        "deleted_jobs": 3,
        "deleted_processed_items": 2,
        "message": f"Flow {fid} deleted with 3 job(s) and 2 processed item(s).",
    }
    assert await flow_row(runtime, fid) is None
    assert await count(runtime, "datamachine_jobs") == 1
    assert await count(runtime, "datamachine_processed_items") == 1
    assert await count(runtime, "datamachine_flows", f"flow_id={keep}") == 1
    rows = await audits(runtime, "delete-flow")
    assert len(rows) == 1 and rows[0]["context"]["deleted_jobs"] == 3
    await unchanged(runtime, owner, "delete-flow", {"flow_id": fid}, "flow_not_found")
    await unchanged(runtime, owner, "delete-flow", {"flow_id": "x"}, "invalid_input")


async def test_delete_flow_needs_admin(runtime, owner):
    bot = await make_agent(owner, "bot", (2, "operator"))
    pid, _ = await make_pipeline(runtime, agent_id=bot)
    fid = (await make_flow(owner, pid))["flow_id"]
    async with connect(runtime, USER2) as c:
        await denied(runtime, c, "delete-flow", {"flow_id": fid})
    await call(owner, "update-agent", {"agent_slug": "bot", "status": "inactive"})
    await unchanged(runtime, owner, "delete-flow", {"flow_id": fid}, "agent_inactive")


# --- duplicate-flow ---------------------------------------------------------------------------


async def test_duplicate_flow_copies_configs_queues_and_secret_envelopes(runtime, owner):
    pid, psids = await make_pipeline(runtime)
    src = await make_flow(
        owner,
        pid,
        flow_name="Digest",
        scheduling_config={"interval": "one_time", "timestamp": 4102444800},
        step_configs={
            "ai": {"user_message": "Write it", "queue_mode": "loop"},
            "publish": {"handler_config": {"secret": "new-secret"}},
        },
    )
    sid = src["flow_id"]
    await call(owner, "webhook-trigger-enable", {"flow_id": sid})
    out = await call(owner, "duplicate-flow", {"source_flow_id": sid})
    new = out["flow_id"]
    assert out["flow_name"] == "Copy of Digest"
    assert (out["source_flow_id"], out["source_pipeline_id"], out["target_pipeline_id"]) == (sid, pid, pid)
    assert out["flow_step_ids"] == [f"{psid}_{new}" for psid in psids]
    assert out["scheduling"] == {"interval": "manual"}  # one_time becomes manual; no webhook copied
    source, copy = await raw_config(runtime, sid), await raw_config(runtime, new)
    for psid in psids:
        a, b = source[f"{psid}_{sid}"], copy[f"{psid}_{new}"]
        for key in ("handler_slugs", "handler_configs", "flow_step_settings", "queue_mode", "prompt_queue"):
            assert a.get(key) == b.get(key), key
        assert (b["flow_step_id"], b["flow_id"]) == (f"{psid}_{new}", new)
    assert copy[f"{psids[1]}_{new}"]["prompt_queue"][0]["prompt"] == "Write it"
    # the secret envelope is copied as it is (same ciphertext)
    assert copy[f"{psids[2]}_{new}"]["handler_configs"]["webhook"]["secret"]["__encrypted__"].startswith("v1:")
    status = await call(owner, "webhook-trigger-status", {"flow_id": new})
    assert status["webhook_enabled"] is False
    assert len(await audits(runtime, "duplicate-flow")) == 1


async def test_duplicate_flow_into_compatible_pipeline_with_overrides(runtime, owner):
    pid, _ = await make_pipeline(runtime)
    target, tpsids = await make_pipeline(
        runtime, [{"step_type": "fetch"}, {"step_type": "ai"}, {"step_type": "publish"}]
    )
    sid = (await make_flow(owner, pid, scheduling_config={"interval": "daily", "enabled": False}))["flow_id"]
    out = await call(
        owner,
        "duplicate-flow",
        {
            "source_flow_id": sid,
            "target_pipeline_id": target,
            "flow_name": "Twin",
            "step_config_overrides": {
                "fetch": {"handler_config": {"max_items": 3}},
                "0": {"handler_config": {"max_items": 7}},
                "ai": {"user_message": "Override"},
            },
        },
    )
    new = out["flow_id"]
    assert out["flow_name"] == "Twin" and out["target_pipeline_id"] == target
    assert out["scheduling"]["interval"] == "daily" and out["scheduling"]["enabled"] is False
    steps = (await call(owner, "get-flow-steps", {"flow_id": new}))["steps"]
    assert [s["pipeline_step_id"] for s in steps] == tpsids
    assert steps[0]["handler_configs"]["rss"] == {"feed_url": "https://example.com/feed", "max_items": 7}
    assert steps[1]["prompt_queue"][0]["prompt"] == "Override"
    assert (await call(owner, "get-flows", {"flow_id": new}))["flows"][0]["next_run"] is None  # still paused


async def test_duplicate_flow_errors(runtime, owner):
    pid, _ = await make_pipeline(runtime)
    other, _ = await make_pipeline(runtime, [FETCH, PUBLISH])
    sid = (await make_flow(owner, pid))["flow_id"]
    err = await unchanged(
        runtime, owner, "duplicate-flow", {"source_flow_id": sid, "target_pipeline_id": other}, "incompatible_pipelines"
    )
    assert err["data"] == {
        "source_step_types": ["fetch", "ai", "publish"],
        "target_step_types": ["fetch", "publish"],
    }
    await unchanged(runtime, owner, "duplicate-flow", {"source_flow_id": 999}, "flow_not_found")
    await unchanged(
        runtime, owner, "duplicate-flow", {"source_flow_id": sid, "target_pipeline_id": 999}, "pipeline_not_found"
    )
    err = await unchanged(
        runtime,
        owner,
        "duplicate-flow",
        {"source_flow_id": sid, "step_config_overrides": {"7": {"user_message": "x"}}},
        "invalid_step_configs",
    )
    assert err["data"]["key"] == "7"
    await unchanged(
        runtime,
        owner,
        "duplicate-flow",
        {"source_flow_id": sid, "step_config_overrides": {"publish": {"handler_config": {"bogus": 1}}}},
        "invalid_handler_config",
    )
    await unchanged(
        runtime,
        owner,
        "duplicate-flow",
        {"source_flow_id": sid, "scheduling_config": {"interval": "cron", "cron_expression": "61 * * * *"}},
        "invalid_cron_expression",
    )


async def test_duplicate_flow_needs_view_on_source_and_admin_on_target(runtime, owner):
    src_agent = await make_agent(owner, "src", (2, "viewer"))
    dst_agent = await make_agent(owner, "dst", (2, "operator"))
    pid, _ = await make_pipeline(runtime, agent_id=src_agent)
    dst, _ = await make_pipeline(runtime, agent_id=dst_agent)
    sid = (await make_flow(owner, pid))["flow_id"]
    async with connect(runtime, USER2) as c:
        await denied(runtime, c, "duplicate-flow", {"source_flow_id": sid, "target_pipeline_id": dst})
    await call(owner, "grant-agent-access", {"agent_slug": "dst", "user_id": 2, "role": "admin"})
    async with connect(runtime, USER2) as c:
        out = await call(c, "duplicate-flow", {"source_flow_id": sid, "target_pipeline_id": dst})
    assert (await call(owner, "get-flows", {"flow_id": out["flow_id"]}))["flows"][0]["agent_id"] == dst_agent
    async with connect(runtime, USER3) as c:
        await denied(runtime, c, "duplicate-flow", {"source_flow_id": sid})


# --- pause-flow / resume-flow -----------------------------------------------------------------


async def test_pause_and_resume_one_flow(runtime, owner):
    pid, _ = await make_pipeline(runtime)
    fid = (await make_flow(owner, pid, scheduling_config={"interval": "hourly", "allow_overlap": True}))["flow_id"]
    before = (await call(owner, "get-flows", {"flow_id": fid}))["flows"][0]
    out = await call(owner, "pause-flow", {"flow_id": fid})
    assert out == {
        "paused": 1,
        "skipped": 0,
        "errors": 0,
        "partial": False,
        "flows": [{"flow_id": fid, "status": "paused"}],
    }
    flow = (await call(owner, "get-flows", {"flow_id": fid}))["flows"][0]
    assert (flow["enabled"], flow["next_run"]) == (False, None)
    schedule = flow["scheduling_config"]
    assert schedule["enabled"] is False and "next_run" not in schedule
    assert (schedule["interval"], schedule["allow_overlap"], schedule["first_run"]) == (
        "hourly",
        True,
        before["scheduling_config"]["first_run"],
    )
    row = await flow_row(runtime, fid)
    assert row.next_run_at is None
    snapshot = await table_rows(runtime)
    again = await call(owner, "pause-flow", {"flow_id": fid})
    assert (again["paused"], again["skipped"], again["flows"][0]["status"]) == (0, 1, "already_paused")
    assert await table_rows(runtime) == snapshot  # no write, no audit

    out = await call(owner, "resume-flow", {"flow_id": fid})
    assert out["resumed"] == 1 and out["flows"][0]["status"] == "resumed"
    flow = (await call(owner, "get-flows", {"flow_id": fid}))["flows"][0]
    assert flow["enabled"] is True and "enabled" not in flow["scheduling_config"]
    assert out["flows"][0]["next_run"] == flow["next_run"] == flow["scheduling_config"]["next_run"]
    assert flow["scheduling_config"]["first_run"] == before["scheduling_config"]["first_run"]
    again = await call(owner, "resume-flow", {"flow_id": fid})
    assert again["flows"] == [{"flow_id": fid, "status": "not_paused"}] and again["skipped"] == 1
    assert len(await audits(runtime, "pause-flow")) == len(await audits(runtime, "resume-flow")) == 1


async def test_bulk_pause_reports_per_flow_access(runtime, owner):
    ops = await make_agent(owner, "ops", (2, "operator"))
    view = await make_agent(owner, "view", (2, "viewer"))
    cold = await make_agent(owner, "cold", (2, "operator"))
    shared, _ = await make_pipeline(runtime, user_id=0)
    f_ops = (await make_flow(owner, shared, agent_id=ops, scheduling_config={"interval": "daily"}))["flow_id"]
    f_view = (await make_flow(owner, shared, agent_id=view))["flow_id"]
    f_cold = (await make_flow(owner, shared, agent_id=cold))["flow_id"]
    await call(owner, "update-agent", {"agent_slug": "cold", "status": "inactive"})
    async with connect(runtime, USER2) as c:
        out = await call(c, "pause-flow", {"pipeline_id": shared})
        assert (out["paused"], out["skipped"], out["errors"], out["partial"]) == (1, 0, 2, True)
        statuses = {f["flow_id"]: f["status"] for f in out["flows"]}
        assert statuses == {f_ops: "paused", f_view: "agent_access_denied", f_cold: "agent_inactive"}
        assert all("message" in f for f in out["flows"] if f["status"] != "paused")
        # every targeted flow failing is an error (nothing changes)
        err = await unchanged(runtime, c, "pause-flow", {"agent_id": view}, "flow_pause_failed")
        assert err["data"]["flows"][0]["status"] == "agent_access_denied" and err["data"]["errors"] == 1
        # the single form fails as a whole
        await denied(runtime, c, "pause-flow", {"flow_id": f_view})
        out = await call(c, "resume-flow", {"agent_id": ops})
        assert out["flows"][0]["status"] == "resumed" and "next_run" in out["flows"][0]
        await unchanged(runtime, c, "resume-flow", {"flow_id": f_cold}, "agent_inactive")
        await unchanged(runtime, c, "resume-flow", {"agent_id": cold}, "flow_resume_failed")
    assert (await flow_row(runtime, f_view)).scheduling_config == {"interval": "manual"}


async def test_pause_scope_errors_and_empty_scope(runtime, owner):
    pid, _ = await make_pipeline(runtime)
    bot = await make_agent(owner, "bot")
    for tool in ("pause-flow", "resume-flow"):
        err = await unchanged(runtime, owner, tool, {}, "invalid_flow_scope")
        assert "exactly one" in err["message"]
        await unchanged(runtime, owner, tool, {"flow_id": 1, "pipeline_id": pid}, "invalid_flow_scope")
        await unchanged(runtime, owner, tool, {"flow_id": 99}, "flow_not_found")
        await unchanged(runtime, owner, tool, {"pipeline_id": 99}, "pipeline_not_found")
        await unchanged(runtime, owner, tool, {"agent_id": 99}, "agent_not_found")
        await unchanged(runtime, owner, tool, {"flow_id": 0}, "invalid_input")
        empty = await call(owner, tool, {"agent_id": bot})
        assert empty["flows"] == [] and empty["errors"] == 0 and empty["partial"] is False
    hidden = await make_agent(owner, "hidden")
    async with connect(runtime, USER2) as c:
        await denied(runtime, c, "pause-flow", {"agent_id": hidden})


# --- roles and notifications ------------------------------------------------------------------


async def test_viewer_reads_operator_runs_admin_configures(runtime, owner):
    bot = await make_agent(owner, "bot", (2, "viewer"), (3, "operator"))
    pid, psids = await make_pipeline(runtime, agent_id=bot)
    fid = (await make_flow(owner, pid))["flow_id"]
    ai = f"{psids[1]}_{fid}"
    async with connect(runtime, USER2) as viewer:
        assert (await call(viewer, "get-flows", {"flow_id": fid}))["total"] == 1
        assert (await call(viewer, "get-flow-steps", {"flow_id": fid}))["step_count"] == 3
        assert (await call(viewer, "queue-list", {"flow_id": fid, "flow_step_id": ai}))["total"] == 0
        assert (await call(viewer, "webhook-trigger-status", {"flow_id": fid}))["webhook_enabled"] is False
        await denied(runtime, viewer, "pause-flow", {"flow_id": fid})
        await denied(runtime, viewer, "queue-add", {"flow_id": fid, "flow_step_id": ai, "prompt": "hi"})
    async with connect(runtime, USER3) as operator:
        await call(operator, "pause-flow", {"flow_id": fid})
        await call(operator, "resume-flow", {"flow_id": fid})
        await call(operator, "queue-add", {"flow_id": fid, "flow_step_id": ai, "prompt": "hi"})
        await call(operator, "queue-mode", {"flow_id": fid, "flow_step_id": ai, "mode": "drain"})
        err = await denied(runtime, operator, "update-flow-step", {"flow_step_id": ai, "user_message": "x"})
        assert (err["data"]["required_role"], err["data"]["effective_role"]) == ("admin", "operator")
        await denied(runtime, operator, "schedule-flow", {"flow_id": fid, "interval_or_timestamp": "daily"})
        await denied(runtime, operator, "webhook-trigger-enable", {"flow_id": fid})
        await denied(runtime, operator, "update-flow", {"flow_id": fid, "flow_name": "x"})
    await call(owner, "grant-agent-access", {"agent_slug": "bot", "user_id": 3, "role": "admin"})
    async with connect(runtime, USER3) as admin:
        out = await call(admin, "update-flow-step", {"flow_step_id": ai, "user_message": "x"})
        assert out["updated_fields"] == ["user_message"]


async def test_flow_changes_notify_flow_and_pipeline(runtime, owner):
    pid, _ = await make_pipeline(runtime)
    inbox = Inbox()
    async with connect(runtime, message_handler=inbox) as c:
        await c.subscribe_resource("datamachine://flows/1")
        await c.subscribe_resource(f"datamachine://pipelines/{pid}")
        await call(c, "create-flow", {"pipeline_id": pid})
        await inbox.wait_for(lambda: inbox.list_changed() >= 1 and len(inbox.uris()) >= 2)
        assert sorted(inbox.uris()) == sorted(["datamachine://flows/1", f"datamachine://pipelines/{pid}"])
        await call(c, "get-flows", {"flow_id": 1})  # reads notify nothing
        await call(c, "update-flow", {"flow_id": 1, "flow_name": "Renamed"})
        await inbox.wait_for(lambda: len(inbox.uris()) >= 4)
        assert inbox.list_changed() == 1  # an update is not a list change
        await call(c, "delete-flow", {"flow_id": 1})
        await inbox.wait_for(lambda: inbox.list_changed() >= 2 and len(inbox.uris()) >= 6)
        assert inbox.uris()[-2:] == ["datamachine://flows/1", f"datamachine://pipelines/{pid}"]
