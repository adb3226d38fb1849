"""Pipelines toolset: get, create, update, delete and duplicate pipelines, and the pipeline resources."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from mcp import MCPError, types
from sqlalchemy import select, text

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.storage.models import Flow, Job, ProcessedItem
from datamachine_mcp.storage.timeutil import utcnow
from tests.conftest import call, changed_tables, connect, count, fail, log_rows, table_rows

pytestmark = pytest.mark.anyio

USER2 = Principal(user_id=2, transport="http")
USER3 = Principal(user_id=3, transport="http")

FEED = "https://example.com/feed.xml"
HOOK = "https://hooks.example.com/in"

# A three-step workflow whose flow has a handler config with a secret, a prompt and an AI setting.
WORKFLOW = {
    "steps": [
        {
            "step_type": "fetch",
            "handler_slugs": ["rss"],
            "handler_configs": {"rss": {"feed_url": FEED, "max_items": 3}},
        },
        {"step_type": "ai", "label": "Write", "system_prompt": "You write.", "user_message": "Summarise it"},
        {
            "step_type": "publish",
            "handler_slugs": ["webhook"],
            "handler_configs": {"webhook": {"url": HOOK, "secret": "s3cret"}},
        },
    ]
}


# --- helpers shared by the pipeline test modules ------------------------------------------------


async def unchanged(runtime, client, tool: str, args: dict[str, Any], code: str) -> dict[str, Any]:
    """The call fails with ``code`` and writes nothing at all."""
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    assert await table_rows(runtime) == before
    return err


async def denied(runtime, client, tool: str, args: dict[str, Any], code: str = "agent_access_denied") -> dict:
    """The call is refused: nothing changes but the one warning row of the denial."""
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    changed = changed_tables(before, await table_rows(runtime))
    assert list(changed) == ["datamachine_logs"] and len(changed["datamachine_logs"][1]) == 1, changed
    assert (await log_rows(runtime))[-1]["message"] == f"{tool} denied: {code}"
    return err


async def make_agent(owner, slug: str = "bot", **extra: Any) -> int:
    return (await call(owner, "create-agent", {"agent_slug": slug, **extra}))["agent_id"]


async def grant(owner, agent_id: int, user_id: int, role: str) -> None:
    await call(owner, "grant-agent-access", {"agent_id": agent_id, "user_id": user_id, "role": role})


async def make_pipeline(client, name: str = "News", **extra: Any) -> dict[str, Any]:
    """A workflow-mode pipeline (fetch rss → ai → publish webhook) with one configured flow."""
    args = {"pipeline_name": name, "workflow": WORKFLOW, **extra}
    return await call(client, "create-pipeline", args)


async def add_flow(client, pipeline_id: int, name: str = "Second", **extra: Any) -> int:
    out = await call(client, "create-flow", {"pipeline_id": pipeline_id, "flow_name": name, **extra})
    return out["flow_id"]


async def get_pipeline(client, pipeline_id: int) -> dict[str, Any]:
    out = await call(client, "get-pipelines", {"pipeline_id": pipeline_id})
    assert out["total"] == 1
    return out["pipelines"][0]


async def add_jobs(runtime, pipeline_id: int, flow_id: int, n: int, status: str = "completed") -> list[int]:
    """Insert ``n`` jobs of a flow directly (the run tools belong to another toolset)."""
    now = utcnow()
    async with runtime.db.write() as s:
        jobs = [
            Job(
                pipeline_id=str(pipeline_id),
                flow_id=str(flow_id),
                pipeline_key=pipeline_id,
                flow_key=flow_id,
                user_id=1,
                status=status,
                run_at=now,
                created_at=now,
                updated_at=now,
            )
            for _ in range(n)
        ]
        s.add_all(jobs)
        await s.flush()
        return [j.job_id for j in jobs]


async def add_items(
    runtime,
    flow_step_id: str,
    flow_id: int,
    n: int,
    *,
    job_id: int | None = None,
    status: str = "processed",
    claim_expires_at: Any = None,
    prefix: str = "item",
) -> None:
    now = utcnow()
    async with runtime.db.write() as s:
        s.add_all(
            ProcessedItem(
                flow_step_id=flow_step_id,
                source_type="rss",
                item_identifier=f"{prefix}-{i}",
                job_id=job_id,
                processed_timestamp=now,
                status=status,
                claim_expires_at=claim_expires_at,
                flow_key=flow_id,
            )
            for i in range(n)
        )


async def flow_row(runtime, flow_id: int) -> Flow:
    async with runtime.db.read() as s:
        return (await s.execute(select(Flow).where(Flow.flow_id == flow_id))).scalar_one()


class Inbox:
    """Collects server notifications delivered to a client."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._event = anyio.Event()

    async def __call__(self, message: Any) -> None:
        if isinstance(message, Exception):
            raise message
        self.items.append(message)
        self._event.set()
        self._event = anyio.Event()

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.items if isinstance(m, kind)]

    async def wait_for(self, kind: type, n: int = 1) -> list[Any]:
        with anyio.fail_after(5):
            while len(self.of(kind)) < n:
                await self._event.wait()
        return self.of(kind)


# --- get-pipelines ------------------------------------------------------------------------------


async def test_get_pipelines_modes_and_paging(owner):
    first = await make_pipeline(owner, "Alpha")
    await call(owner, "create-pipeline", {"pipeline_name": "Beta"})
    await call(owner, "create-pipeline", {"pipeline_name": "Gamma"})

    full = await call(owner, "get-pipelines", {})
    assert [p["pipeline_name"] for p in full["pipelines"]] == ["Alpha", "Beta", "Gamma"]
    assert (full["total"], full["per_page"], full["offset"], full["output_mode"]) == (3, 20, 0, "full")
    alpha = full["pipelines"][0]
    assert alpha["step_count"] == 3 and alpha["flow_count"] == 1
    assert [f["flow_id"] for f in alpha["flows"]] == [first["flow_id"]]
    steps = sorted(alpha["pipeline_config"].values(), key=lambda s: s["execution_order"])
    assert [(s["step_type"], s["label"], s["execution_order"]) for s in steps] == [
        ("fetch", "Fetch", 0),
        ("ai", "Write", 1),
        ("publish", "Publish", 2),
    ]
    assert steps[1]["system_prompt"] == "You write."
    flow_steps = alpha["flows"][0]["flow_config"]
    publish = next(s for s in flow_steps.values() if s["step_type"] == "publish")
    assert publish["handler_configs"]["webhook"] == {"url": HOOK, "secret": "********"}
    assert full["pipelines"][1]["flows"] == [] and full["pipelines"][1]["flow_count"] == 0

    no_flows = await call(owner, "get-pipelines", {"include_flows": False})
    assert all("flows" not in p for p in no_flows["pipelines"])
    listed = await call(owner, "get-pipelines", {"output_mode": "list"})
    assert all("flows" not in p for p in listed["pipelines"]) and listed["pipelines"][0]["flow_count"] == 1
    summary = await call(owner, "get-pipelines", {"output_mode": "summary"})
    assert summary["pipelines"][0] == {"pipeline_id": first["pipeline_id"], "pipeline_name": "Alpha", "flow_count": 1}
    ids = await call(owner, "get-pipelines", {"output_mode": "ids", "per_page": 2, "offset": 1})
    assert ids["pipelines"] == [first["pipeline_id"] + 1, first["pipeline_id"] + 2]
    assert (ids["total"], ids["per_page"], ids["offset"]) == (3, 2, 1)


async def test_get_pipelines_filters(runtime, owner):
    bot = await make_agent(owner)
    await call(owner, "create-pipeline", {"pipeline_name": "a_b digest"})
    await call(owner, "create-pipeline", {"pipeline_name": "aXb digest", "agent_id": bot})
    await call(owner, "create-pipeline", {"pipeline_name": "Shared", "shared": True})

    # "_" is a literal in search, not a LIKE wildcard; matching is case-insensitive
    found = await call(owner, "get-pipelines", {"search": "A_B", "output_mode": "summary"})
    assert [p["pipeline_name"] for p in found["pipelines"]] == ["a_b digest"]
    by_agent = await call(owner, "get-pipelines", {"agent_id": bot, "user_id": 0, "output_mode": "summary"})
    assert [p["pipeline_name"] for p in by_agent["pipelines"]] == ["aXb digest"]  # agent_id wins over user_id
    shared = await call(owner, "get-pipelines", {"user_id": 0, "output_mode": "summary"})
    assert [p["pipeline_name"] for p in shared["pipelines"]] == ["Shared"]
    assert (await call(owner, "get-pipelines", {"pipeline_id": 999}))["pipelines"] == []


async def test_get_pipelines_rows_filtered_for_other_users(runtime, owner):
    bot = await make_agent(owner)
    await call(owner, "create-pipeline", {"pipeline_name": "Bot's", "agent_id": bot})
    mine = await call(owner, "create-pipeline", {"pipeline_name": "Owner's own"})
    await call(owner, "create-pipeline", {"pipeline_name": "Shared", "shared": True})
    async with connect(runtime, USER2) as c:
        own = await call(c, "create-pipeline", {"pipeline_name": "User 2's"})
        seen = await call(c, "get-pipelines", {"output_mode": "summary"})
        assert [p["pipeline_name"] for p in seen["pipelines"]] == ["Shared", "User 2's"]
        assert seen["total"] == 2
        await fail(c, "get-pipelines", {"pipeline_id": mine["pipeline_id"]}, "agent_access_denied")
        await fail(c, "get-pipelines", {"agent_id": bot}, "agent_access_denied")
        await fail(c, "get-pipelines", {"user_id": 1}, "permission_denied")
        assert (await call(c, "get-pipelines", {"user_id": 2}))["pipelines"][0]["pipeline_id"] == own["pipeline_id"]
        await grant(owner, bot, 2, "viewer")
        seen = await call(c, "get-pipelines", {"output_mode": "summary"})
        assert [p["pipeline_name"] for p in seen["pipelines"]] == ["Bot's", "Shared", "User 2's"]


async def test_get_pipelines_embeds_only_readable_flows(runtime, owner):
    bot = await make_agent(owner)
    other = await make_agent(owner, "other")
    pipeline = await make_pipeline(owner, agent_id=bot)
    await add_flow(owner, pipeline["pipeline_id"], "Other's flow", agent_id=other)
    await grant(owner, bot, 2, "viewer")
    async with connect(runtime, USER2) as c:
        row = await get_pipeline(c, pipeline["pipeline_id"])
    assert [f["flow_name"] for f in row["flows"]] == ["News"] and row["flow_count"] == 1
    assert (await get_pipeline(owner, pipeline["pipeline_id"]))["flow_count"] == 2


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"per_page": 101}, "per_page"),
        ({"offset": -1}, "offset"),
        ({"output_mode": "everything"}, "output_mode"),
        ({"pipeline_id": "1.0"}, "pipeline_id"),
        ({"user_id": -1}, "user_id"),
        ({"colour": "red"}, "colour"),
    ],
)
async def test_get_pipelines_invalid_input(runtime, owner, args, field):
    err = await unchanged(runtime, owner, "get-pipelines", args, "invalid_input")
    assert err["data"]["errors"][0]["field"] == field


# --- resources ----------------------------------------------------------------------------------


async def _read(client, uri: str) -> dict[str, Any]:
    result = await client.read_resource(uri, cache_mode="bypass")
    return json.loads(result.contents[0].text)


async def test_pipeline_resources_mirror_get_pipelines(runtime, owner):
    created = await make_pipeline(owner)
    assert await _read(owner, "datamachine://pipelines") == await call(owner, "get-pipelines", {})
    one = await _read(owner, f"datamachine://pipelines/{created['pipeline_id']}")
    assert one == await call(owner, "get-pipelines", {"pipeline_id": created["pipeline_id"]})
    for uri in ("datamachine://pipelines/999", "datamachine://pipelines/abc", "datamachine://pipelines/0"):
        with pytest.raises(MCPError) as exc:
            await owner.read_resource(uri, cache_mode="bypass")
        assert exc.value.code == -32002, uri  # resource not found
    templates = await owner.list_resource_templates()
    assert "datamachine://pipelines/{pipeline_id}" in [t.uri_template for t in templates.resource_templates]
    async with connect(runtime, USER2) as c:
        with pytest.raises(MCPError) as exc:
            await c.read_resource(f"datamachine://pipelines/{created['pipeline_id']}", cache_mode="bypass")
        assert exc.value.message.startswith("agent_access_denied: ")


async def test_create_and_delete_notify(runtime):
    inbox = Inbox()
    async with connect(runtime, message_handler=inbox) as c:
        await c.subscribe_resource("datamachine://pipelines")
        created = await call(c, "create-pipeline", {"pipeline_name": "Notify me"})
        await inbox.wait_for(types.ResourceListChangedNotification)
        updated = await inbox.wait_for(types.ResourceUpdatedNotification)
        assert {str(n.params.uri) for n in updated} == {"datamachine://pipelines"}
        await call(c, "update-pipeline", {"pipeline_id": created["pipeline_id"], "pipeline_name": "Renamed"})
        await inbox.wait_for(types.ResourceUpdatedNotification, 2)
        await call(c, "delete-pipeline", {"pipeline_id": created["pipeline_id"]})
        await inbox.wait_for(types.ResourceListChangedNotification, 2)
        await call(c, "get-pipelines", {})  # reads notify nothing
        await anyio.sleep(0.05)
        assert len(inbox.of(types.ResourceListChangedNotification)) == 2


# --- create-pipeline ----------------------------------------------------------------------------


async def test_create_simple_pipeline_and_audit(runtime, owner):
    out = await call(owner, "create-pipeline", {"pipeline_name": "  Digest  "})
    assert out == {
        "pipeline_id": out["pipeline_id"],
        "pipeline_name": "Digest",
        "agent_id": None,
        "flow_id": None,
        "flow_name": None,
        "steps_created": 0,
        "pipeline_step_ids": [],
        "flow_step_ids": [],
        "creation_mode": "simple",
        "warnings": [],
    }
    row = await get_pipeline(owner, out["pipeline_id"])
    assert (row["user_id"], row["agent_id"], row["pipeline_config"], row["flows"]) == (1, None, {}, [])
    audit = await log_rows(runtime)
    assert len(audit) == 1
    assert audit[0]["message"].startswith("create-pipeline: pipeline 'Digest'")
    assert audit[0]["pipeline_id"] == out["pipeline_id"]
    assert audit[0]["context"]["target"] == {"type": "pipeline", "id": out["pipeline_id"]}


async def test_create_batch_pipeline_seeds_defaults(runtime, owner):
    out = await call(
        owner,
        "create-pipeline",
        {
            "pipeline_name": "Batch",
            "steps": [
                {"step_type": "fetch", "handler": "rss", "handler_config": {"max_items": 2}, "custom_field": "kept"},
                {"step_type": "ai", "provider": "openai", "temperature": 0.5},
                {
                    "step_type": "publish",
                    "label": "  Post it ",
                    "handler_slug": "webhook",
                    "handler_config": {"url": HOOK, "secret": "topsecret"},
                },
                {"step_type": "approval"},
            ],
            "flow_config": {"flow_name": "", "scheduling_config": {"interval": "daily"}},
        },
    )
    assert out["creation_mode"] == "batch" and out["steps_created"] == 4
    assert out["flow_name"] == "Batch"  # defaults to the pipeline's name
    assert out["flow_step_ids"] == [f"{psid}_{out['flow_id']}" for psid in out["pipeline_step_ids"]]
    # the rss default lacks feed_url: stored as is, with a warning
    assert len(out["warnings"]) == 1 and "feed_url" in out["warnings"][0]
    row = await get_pipeline(owner, out["pipeline_id"])
    steps = [row["pipeline_config"][psid] for psid in out["pipeline_step_ids"]]
    assert steps[0] == {
        "pipeline_step_id": out["pipeline_step_ids"][0],
        "step_type": "fetch",
        "execution_order": 0,
        "label": "Fetch",
        "handler_slug": "rss",
        "handler_config": {"max_items": 2},
        "custom_field": "kept",
    }
    assert steps[1]["provider"] == "openai" and steps[1]["temperature"] == 0.5 and "model" not in steps[1]
    assert steps[2]["label"] == "Post it"
    assert steps[2]["handler_config"] == {"url": HOOK, "secret": "********"}
    assert [s["label"] for s in steps[3:]] == ["Approval"]
    flow = row["flows"][0]
    assert flow["scheduling_config"]["interval"] == "daily" and flow["next_run"] is not None
    by_type = {s["step_type"]: s for s in flow["flow_config"].values()}
    assert by_type["fetch"]["handler_slugs"] == ["rss"]
    assert by_type["fetch"]["handler_configs"] == {"rss": {"max_items": 2}}
    assert by_type["publish"]["handler_configs"]["webhook"]["secret"] == "********"
    assert by_type["approval"]["flow_step_settings"] == {}
    async with runtime.db.read() as s:
        raw = (await s.execute(text("SELECT pipeline_config FROM datamachine_pipelines"))).scalar()
    assert "topsecret" not in str(raw) and "__encrypted__" in str(raw)
    assert len(await log_rows(runtime)) == 1


async def test_create_workflow_pipeline_configures_its_flow(runtime, owner):
    out = await make_pipeline(owner, flow_config={"flow_name": "Main", "scheduling_config": {"interval": "manual"}})
    assert out["creation_mode"] == "workflow" and out["flow_name"] == "Main" and out["warnings"] == []
    row = await get_pipeline(owner, out["pipeline_id"])
    psids = out["pipeline_step_ids"]
    assert [row["pipeline_config"][p]["execution_order"] for p in psids] == [0, 1, 2]
    assert all(p.startswith(f"{out['pipeline_id']}_") for p in psids)
    # handler settings live in the flow, not in the pipeline step
    assert "handler_slug" not in row["pipeline_config"][psids[0]]
    config = row["flows"][0]["flow_config"]
    fetch, ai, publish = (config[f"{p}_{out['flow_id']}"] for p in psids)
    assert fetch["handler_configs"] == {"rss": {"feed_url": FEED, "max_items": 3}}
    assert fetch["queue_mode"] == "static" and fetch["config_patch_queue"] == []
    assert [q["prompt"] for q in ai["prompt_queue"]] == ["Summarise it"] and ai["queue_mode"] == "static"
    assert publish["handler_configs"]["webhook"]["secret"] == "********"
    flow = await flow_row(runtime, out["flow_id"])
    stored = flow.flow_config[f"{psids[2]}_{out['flow_id']}"]["handler_configs"]["webhook"]["secret"]
    assert set(stored) == {"__encrypted__"}


async def test_create_pipeline_validate_only_writes_nothing(runtime, owner):
    before = await table_rows(runtime)
    out = await call(owner, "create-pipeline", {"pipeline_name": "Dry", "workflow": WORKFLOW, "validate_only": True})
    assert await table_rows(runtime) == before
    assert out["valid"] is True and out["mode"] == "validate_only"
    would = out["would_create"]
    assert (would["pipeline_name"], would["agent_id"]) == ("Dry", None)
    assert would["flow"] == {"flow_name": "Dry", "scheduling_config": {"interval": "manual"}}
    assert [s["step_type"] for s in would["steps"]] == ["fetch", "ai", "publish"]
    assert would["steps"][2]["handler_configs"]["webhook"] == {"url": HOOK, "secret": "********"}
    assert would["steps"][1]["prompt_queue"][0]["prompt"] == "Summarise it"
    batch = await call(
        owner, "create-pipeline", {"pipeline_name": "Dry", "steps": [{"step_type": "ai"}], "validate_only": True}
    )
    assert batch["would_create"]["flow"] is None
    assert batch["would_create"]["steps"] == [{"step_type": "ai", "execution_order": 0, "label": "AI"}]
    assert await table_rows(runtime) == before


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        ({"pipeline_name": "   "}, "invalid_pipeline_name", "Pipeline name cannot be empty"),
        (
            {"pipeline_name": "P", "steps": [{"step_type": "ai"}], "workflow": WORKFLOW},
            "invalid_pipeline_steps",
            "not both",
        ),
        (
            {"pipeline_name": "P", "steps": [{"step_type": "ai"}, {"step_type": "scrape"}]},
            "invalid_step_type",
            "Invalid step_type 'scrape'. Must be one of: fetch, ai, publish",
        ),
        (
            {"pipeline_name": "P", "steps": [{"step_type": "fetch", "handler_slug": "nope"}]},
            "handler_not_found",
            "nope",
        ),
        ({"pipeline_name": "P", "steps": [{"step_type": "fetch", "handler_slug": "webhook"}]}, "invalid_handler", ""),
        (
            {
                "pipeline_name": "P",
                "steps": [{"step_type": "fetch", "handler_slug": "rss", "handler_config": {"x": 1}}],
            },
            "invalid_handler_config",
            "unknown fields: x",
        ),
        (
            {"pipeline_name": "P", "steps": [{"step_type": "ai", "provider": "acme"}]},
            "unknown_provider",
            "acme",
        ),
        (
            {"pipeline_name": "P", "flow_config": {"scheduling_config": {"interval": "fortnightly"}}},
            "invalid_interval",
            "Invalid interval 'fortnightly'. Valid options:",
        ),
        (
            {"pipeline_name": "P", "flow_config": {"scheduling_config": {"interval": "cron"}}},
            "missing_cron_expression",
            "",
        ),
        (
            {"pipeline_name": "P", "flow_config": {"scheduling_config": {"interval": "one_time"}}},
            "missing_timestamp",
            "",
        ),
        (
            {
                "pipeline_name": "P",
                "flow_config": {"scheduling_config": {"interval": "cron", "cron_expression": "61 * * * *"}},
            },
            "invalid_cron_expression",
            "61 * * * *",
        ),
        (
            {
                "pipeline_name": "P",
                "flow_config": {"scheduling_config": {"interval": "0 9 * * *", "timezone": "Mars/Olympus"}},
            },
            "invalid_timezone",
            "Mars/Olympus",
        ),
        ({"pipeline_name": "P", "agent_id": 99}, "agent_not_found", "Agent 99 not found."),
        (
            {"pipeline_name": "P", "workflow": {"steps": [{"step_type": "fetch", "handler_slugs": ["nope"]}]}},
            "handler_not_found",
            "nope",
        ),
    ],
)
async def test_create_pipeline_errors_write_nothing(runtime, owner, args, code, fragment):
    err = await unchanged(runtime, owner, "create-pipeline", args, code)
    assert fragment in err["message"]


async def test_create_pipeline_invalid_workflow_lists_every_problem(runtime, owner):
    workflow = {
        "steps": [
            {"step_type": "fetch"},
            {"step_type": "publish", "handler_slug": "webhook"},
            {"step_type": "teleport"},
            {"step_type": "publish", "handler_slugs": ["webhook"], "handler_configs": {"webhook": {}}},
            {"step_type": "approval", "user_message": "hi"},
        ]
    }
    err = await unchanged(
        runtime, owner, "create-pipeline", {"pipeline_name": "W", "workflow": workflow}, "invalid_workflow"
    )
    problems = [(e["step"], e["message"]) for e in err["data"]["errors"]]
    assert (0, "Step 0 (fetch) requires exactly one handler") in problems
    assert (
        1,
        "Step 1 uses unsupported legacy field handler_slug; use handler_slugs and handler_configs",
    ) in problems
    assert (1, "Step 1 requires at least one handler") in problems
    assert (2, "Step 2 has unknown step_type 'teleport'") in problems
    assert any(s == 3 and "missing required fields: url" in m for s, m in problems)
    assert any(s == 4 and "user_message applies to ai steps only" in m for s, m in problems)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({}, "pipeline_name"),
        ({"pipeline_name": 5}, "pipeline_name"),
        ({"pipeline_name": "x" * 256}, "pipeline_name"),
        ({"pipeline_name": "P", "steps": [{"label": "no type"}]}, "steps.0.step_type"),
        ({"pipeline_name": "P", "steps": [{"step_type": "ai", "temperature": 3}]}, "steps.0.temperature"),
        ({"pipeline_name": "P", "workflow": {"steps": []}}, "workflow.steps"),
        ({"pipeline_name": "P", "workflow": {"steps": [{"step_type": "ai", "colour": 1}]}}, "workflow.steps.0.colour"),
        ({"pipeline_name": "P", "agent_id": 0}, "agent_id"),
        ({"pipeline_name": "P", "flow_config": {"name": "x"}}, "flow_config.name"),
    ],
)
async def test_create_pipeline_invalid_input(runtime, owner, args, field):
    err = await unchanged(runtime, owner, "create-pipeline", args, "invalid_input")
    assert err["data"]["errors"][0]["field"] == field


async def test_create_pipeline_ownership_rules(runtime, owner):
    bot = await make_agent(owner)
    shared = await call(owner, "create-pipeline", {"pipeline_name": "Everyone", "shared": True})
    row = await get_pipeline(owner, shared["pipeline_id"])
    assert (row["user_id"], row["agent_id"]) == (0, None)
    await unchanged(
        runtime, owner, "create-pipeline", {"pipeline_name": "X", "shared": True, "agent_id": bot}, "invalid_input"
    )
    await grant(owner, bot, 2, "operator")
    async with connect(runtime, USER2) as c:
        own = await call(c, "create-pipeline", {"pipeline_name": "Mine"})
        row = await get_pipeline(c, own["pipeline_id"])
        assert (row["user_id"], row["agent_id"]) == (2, None)
        await fail(c, "create-pipeline", {"pipeline_name": "S", "shared": True}, "permission_denied")
        await fail(c, "create-pipeline", {"pipeline_name": "B", "agent_id": bot}, "agent_access_denied")
        await grant(owner, bot, 2, "admin")
        made = await call(c, "create-pipeline", {"pipeline_name": "B", "agent_id": bot, "workflow": WORKFLOW})
        assert made["agent_id"] == bot
        flows = await call(c, "get-flows", {"flow_id": made["flow_id"]})
        assert flows["flows"][0]["agent_id"] == bot
    # an agent-bound principal's pipelines belong to its agent
    bound = Principal(user_id=1, agent_id=bot, transport="http")
    async with connect(runtime, bound) as c:
        out = await call(c, "create-pipeline", {"pipeline_name": "Bound"})
        assert out["agent_id"] == bot
    await call(owner, "update-agent", {"agent_id": bot, "status": "inactive"})
    err = await unchanged(runtime, owner, "create-pipeline", {"pipeline_name": "Z", "agent_id": bot}, "agent_inactive")
    assert err["data"]["agent_id"] == bot


# --- update-pipeline ----------------------------------------------------------------------------


async def test_update_pipeline_rename_and_move(runtime, owner):
    bot = await make_agent(owner)
    other = await make_agent(owner, "other")
    created = await make_pipeline(owner, agent_id=bot)
    pid = created["pipeline_id"]
    second = await add_flow(owner, pid)
    job_ids = await add_jobs(runtime, pid, created["flow_id"], 1)

    out = await call(owner, "update-pipeline", {"pipeline_id": pid, "pipeline_name": "  Renamed "})
    assert out == {
        "pipeline_id": pid,
        "pipeline_name": "Renamed",
        "agent_id": bot,
        "flows_moved": 0,
        "message": out["message"],
    }
    before = await table_rows(runtime)
    same = await call(owner, "update-pipeline", {"pipeline_id": pid, "pipeline_name": "Renamed", "agent_id": bot})
    assert same["flows_moved"] == 0 and await table_rows(runtime) == before  # no-op: no audit row

    moved = await call(owner, "update-pipeline", {"pipeline_id": pid, "agent_id": other})
    assert (moved["agent_id"], moved["flows_moved"]) == (other, 2)
    assert (await flow_row(runtime, second)).agent_id == other
    assert (await flow_row(runtime, created["flow_id"])).agent_id == other
    assert await count(runtime, "datamachine_jobs", f"job_id={job_ids[0]} AND agent_id IS NULL") == 1  # history
    audits = [r for r in await log_rows(runtime) if r["message"].startswith("update-pipeline")]
    assert len(audits) == 2 and audits[1]["context"]["changes"] == ["agent_id"]


async def test_update_pipeline_errors(runtime, owner):
    pid = (await call(owner, "create-pipeline", {"pipeline_name": "P"}))["pipeline_id"]
    err = await unchanged(runtime, owner, "update-pipeline", {"pipeline_id": pid}, "invalid_pipeline_update")
    assert err["message"] == "Must provide pipeline_name or agent_id to update"
    await unchanged(
        runtime, owner, "update-pipeline", {"pipeline_id": pid, "pipeline_name": " "}, "invalid_pipeline_name"
    )
    await unchanged(runtime, owner, "update-pipeline", {"pipeline_id": 999, "pipeline_name": "X"}, "pipeline_not_found")
    await unchanged(runtime, owner, "update-pipeline", {"pipeline_id": pid, "agent_id": 77}, "agent_not_found")
    err = await unchanged(runtime, owner, "update-pipeline", {"pipeline_id": pid, "agent_id": "2.0"}, "invalid_input")
    assert err["data"]["errors"][0]["field"] == "agent_id"


async def test_moving_needs_admin_on_both_agents(runtime, owner):
    bot = await make_agent(owner)
    other = await make_agent(owner, "other")
    pid = (await make_pipeline(owner, agent_id=bot))["pipeline_id"]
    await grant(owner, bot, 2, "admin")
    await grant(owner, other, 2, "operator")
    async with connect(runtime, USER2) as c:
        await denied(runtime, c, "update-pipeline", {"pipeline_id": pid, "agent_id": other})
        await grant(owner, other, 2, "admin")
        assert (await call(c, "update-pipeline", {"pipeline_id": pid, "agent_id": other}))["flows_moved"] == 1


# --- delete-pipeline ----------------------------------------------------------------------------


async def test_delete_pipeline_cascades_flows_jobs_and_processed_items(runtime, owner):
    created = await make_pipeline(owner)
    pid, flow1 = created["pipeline_id"], created["flow_id"]
    flow2 = await add_flow(owner, pid)
    fetch_step = created["pipeline_step_ids"][0]
    jobs1 = await add_jobs(runtime, pid, flow1, 3)
    await add_jobs(runtime, pid, flow2, 2)
    await add_items(runtime, f"{fetch_step}_{flow1}", flow1, 6, job_id=jobs1[0])
    await add_items(runtime, f"{fetch_step}_{flow2}", flow2, 4)
    # another pipeline's rows must survive
    keep = await make_pipeline(owner, "Keep")
    await add_jobs(runtime, keep["pipeline_id"], keep["flow_id"], 1)
    await add_items(runtime, f"{keep['pipeline_step_ids'][0]}_{keep['flow_id']}", keep["flow_id"], 1)

    out = await call(owner, "delete-pipeline", {"pipeline_id": pid})
    assert out == {
        "pipeline_id": pid,
        "pipeline_name": "News",
        "deleted_flows": 2,
        "deleted_jobs": 5,
        "deleted_processed_items": 10,
        "message": "Pipeline 'News' deleted with 2 flow(s), 5 job(s) and 10 processed item(s).",
    }
    assert await count(runtime, "datamachine_pipelines", f"pipeline_id={pid}") == 0
    assert await count(runtime, "datamachine_flows", f"pipeline_id={pid}") == 0
    assert await count(runtime, "datamachine_jobs", f"pipeline_key={pid} OR flow_key IN ({flow1},{flow2})") == 0
    assert await count(runtime, "datamachine_processed_items", f"flow_key IN ({flow1},{flow2})") == 0
    assert await count(runtime, "datamachine_flows") == 1
    assert await count(runtime, "datamachine_jobs") == 1
    assert await count(runtime, "datamachine_processed_items") == 1
    audit = (await log_rows(runtime))[-1]
    assert audit["message"].startswith("delete-pipeline:") and audit["pipeline_id"] == pid
    await unchanged(runtime, owner, "delete-pipeline", {"pipeline_id": pid}, "pipeline_not_found")
    assert (await call(owner, "get-pipelines", {"pipeline_id": pid}))["total"] == 0


async def test_deleting_a_job_keeps_its_processed_items(runtime, owner):
    created = await make_pipeline(owner)
    flow_id = created["flow_id"]
    [job_id] = await add_jobs(runtime, created["pipeline_id"], flow_id, 1)
    await add_items(runtime, f"{created['pipeline_step_ids'][0]}_{flow_id}", flow_id, 3, job_id=job_id)
    async with runtime.db.write() as s:
        await s.execute(text(f"DELETE FROM datamachine_jobs WHERE job_id={job_id}"))
    assert await count(runtime, "datamachine_processed_items", "job_id IS NULL") == 3


async def test_pipeline_role_checks(runtime, owner):
    bot = await make_agent(owner)
    pid = (await make_pipeline(owner, agent_id=bot))["pipeline_id"]
    await grant(owner, bot, 2, "viewer")
    await grant(owner, bot, 3, "operator")
    async with connect(runtime, USER2) as viewer:
        assert (await get_pipeline(viewer, pid))["pipeline_id"] == pid
        assert (await call(viewer, "get-pipeline-steps", {"pipeline_id": pid}))["step_count"] == 3
        await fail(viewer, "update-pipeline", {"pipeline_id": pid, "pipeline_name": "X"}, "agent_access_denied")
    async with connect(runtime, USER3) as operator:
        err = await denied(runtime, operator, "delete-pipeline", {"pipeline_id": pid})
        assert err["data"]["required_role"] == "admin" and err["data"]["effective_role"] == "operator"
        await fail(operator, "delete-pipeline", {"pipeline_id": 999}, "pipeline_not_found")  # not-found first
    await call(owner, "update-agent", {"agent_id": bot, "status": "inactive"})
    await grant_direct_admin(runtime, bot, 3)
    async with connect(runtime, USER3) as admin:
        assert (await get_pipeline(admin, pid))["pipeline_id"] == pid  # reads still work
        await unchanged(runtime, admin, "delete-pipeline", {"pipeline_id": pid}, "agent_inactive")
        await call(owner, "update-agent", {"agent_id": bot, "status": "active"})
        assert (await call(admin, "delete-pipeline", {"pipeline_id": pid}))["deleted_flows"] == 1


async def grant_direct_admin(runtime, agent_id: int, user_id: int) -> None:
    """Raise a grant while the agent is inactive (grant-agent-access refuses inactive agents)."""
    async with runtime.db.write() as s:
        await s.execute(
            text(f"UPDATE datamachine_agent_access SET role='admin' WHERE agent_id={agent_id} AND user_id={user_id}")
        )


# --- duplicate-pipeline -------------------------------------------------------------------------


async def test_duplicate_pipeline_copies_steps_flows_and_secrets(runtime, owner):
    created = await make_pipeline(
        owner, flow_config={"flow_name": "Main", "scheduling_config": {"interval": "hourly", "allow_overlap": True}}
    )
    pid = created["pipeline_id"]
    once = await add_flow(owner, pid, "Once", scheduling_config={"interval": "one_time", "timestamp": 4102444800})
    async with runtime.db.write() as s:  # an inbound webhook trigger on the source flow
        flow = (await s.execute(select(Flow).where(Flow.flow_id == created["flow_id"]))).scalar_one()
        flow.scheduling_config = {**flow.scheduling_config, "webhook": {"enabled": True, "auth_mode": "bearer"}}
    await add_jobs(runtime, pid, created["flow_id"], 2)
    await add_items(runtime, f"{created['pipeline_step_ids'][0]}_{created['flow_id']}", created["flow_id"], 2)

    out = await call(owner, "duplicate-pipeline", {"pipeline_id": pid})
    new_pid = out["pipeline_id"]
    assert out == {
        "pipeline_id": new_pid,
        "pipeline_name": "Copy of News",
        "source_pipeline_id": pid,
        "source_pipeline_name": "News",
        "flows_created": 2,
        "flow_ids": out["flow_ids"],
    }
    source = await get_pipeline(owner, pid)
    copy = await get_pipeline(owner, new_pid)
    old_steps = sorted(source["pipeline_config"].values(), key=lambda s: s["execution_order"])
    new_steps = sorted(copy["pipeline_config"].values(), key=lambda s: s["execution_order"])
    assert all(s["pipeline_step_id"].startswith(f"{new_pid}_") for s in new_steps)
    strip = lambda s: {k: v for k, v in s.items() if k != "pipeline_step_id"}  # noqa: E731
    assert [strip(s) for s in new_steps] == [strip(s) for s in old_steps]
    main, copied_once = copy["flows"]
    assert (main["flow_name"], copied_once["flow_name"]) == ("Main", "Once")
    assert main["scheduling_config"]["interval"] == "hourly" and main["scheduling_config"]["allow_overlap"] is True
    assert "webhook" not in main["scheduling_config"] and main["webhook_enabled"] is False
    assert source["flows"][0]["webhook_enabled"] is True
    assert copied_once["scheduling_config"] == {"interval": "manual"}  # one_time becomes manual
    assert main["last_run"] is None and main["consecutive_failures"] == 0
    step_map = {o["pipeline_step_id"]: n["pipeline_step_id"] for o, n in zip(old_steps, new_steps, strict=True)}
    old_flow = source["flows"][0]
    for fsid, entry in old_flow["flow_config"].items():
        new_fsid = f"{step_map[entry['pipeline_step_id']]}_{main['flow_id']}"
        new_entry = main["flow_config"][new_fsid]
        assert new_entry["pipeline_id"] == new_pid and new_entry["flow_id"] == main["flow_id"]
        same_keys = ("handler_slugs", "handler_configs", "prompt_queue", "queue_mode", "flow_step_settings", "label")
        assert {k: new_entry.get(k) for k in same_keys} == {k: entry.get(k) for k in same_keys}, fsid
    # the secret envelope is copied as it is
    old_row, new_row = await flow_row(runtime, created["flow_id"]), await flow_row(runtime, main["flow_id"])
    old_secret = old_row.flow_config[f"{old_steps[2]['pipeline_step_id']}_{created['flow_id']}"]
    new_secret = new_row.flow_config[f"{new_steps[2]['pipeline_step_id']}_{main['flow_id']}"]
    assert new_secret["handler_configs"]["webhook"]["secret"] == old_secret["handler_configs"]["webhook"]["secret"]
    # jobs and processed items are not copied
    assert await count(runtime, "datamachine_jobs", f"pipeline_key={new_pid}") == 0
    assert (
        await count(runtime, "datamachine_processed_items", f"flow_key IN ({','.join(map(str, out['flow_ids']))})") == 0
    )
    assert once not in out["flow_ids"]
    audits = [r for r in await log_rows(runtime) if r["message"].startswith("duplicate-pipeline")]
    assert len(audits) == 1 and audits[0]["pipeline_id"] == new_pid


async def test_duplicate_pipeline_target_agent_and_errors(runtime, owner):
    bot = await make_agent(owner)
    other = await make_agent(owner, "other")
    pid = (await make_pipeline(owner, agent_id=bot))["pipeline_id"]
    out = await call(owner, "duplicate-pipeline", {"pipeline_id": pid, "new_name": " Clone ", "agent_id": other})
    copy = await get_pipeline(owner, out["pipeline_id"])
    assert (copy["pipeline_name"], copy["agent_id"]) == ("Clone", other)
    assert [f["agent_id"] for f in copy["flows"]] == [other]
    await unchanged(runtime, owner, "duplicate-pipeline", {"pipeline_id": 999}, "pipeline_not_found")
    await unchanged(runtime, owner, "duplicate-pipeline", {"pipeline_id": pid, "agent_id": 99}, "agent_not_found")
    await unchanged(
        runtime, owner, "duplicate-pipeline", {"pipeline_id": pid, "new_name": "  "}, "invalid_pipeline_name"
    )
    err = await unchanged(runtime, owner, "duplicate-pipeline", {"pipeline_id": pid, "new_name": 3}, "invalid_input")
    assert err["data"]["errors"][0]["field"] == "new_name"


async def test_viewer_duplicates_into_own_agent_without_secrets(runtime, owner):
    bot = await make_agent(owner)
    source = await make_pipeline(owner, agent_id=bot)
    await grant(owner, bot, 2, "viewer")
    async with connect(runtime, USER2) as c:
        # the copy defaults to the source's agent, where a viewer may not create
        await denied(runtime, c, "duplicate-pipeline", {"pipeline_id": source["pipeline_id"]})
        mine = await call(c, "create-agent", {"agent_slug": "mine"})
        out = await call(c, "duplicate-pipeline", {"pipeline_id": source["pipeline_id"], "agent_id": mine["agent_id"]})
        copy = await get_pipeline(c, out["pipeline_id"])
    publish = next(s for s in copy["flows"][0]["flow_config"].values() if s["step_type"] == "publish")
    assert publish["handler_configs"]["webhook"] == {"url": HOOK}  # the secret stayed behind
