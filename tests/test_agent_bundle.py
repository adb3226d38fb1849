"""export-agent and import-agent: bundle v1, secrets, schedules, validation, round trips."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.abilities.flow_ops import StepEdit, apply_step_edit
from datamachine_mcp.abilities.pipeline_common import build_pipeline_step, ordered_steps, sync_flow_config
from datamachine_mcp.engine import schedule as sched
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime
from datamachine_mcp.storage.crypto import is_envelope
from datamachine_mcp.storage.models import Agent, Flow, Pipeline
from datamachine_mcp.storage.timeutil import utcnow
from tests.conftest import as_token, call, changed_tables, connect, fail, log_rows, table_rows

pytestmark = pytest.mark.anyio

USER2 = Principal(user_id=2, transport="http")
FUTURE = int((utcnow() + timedelta(days=30)).timestamp())
PAST = int((utcnow() - timedelta(days=1)).timestamp())

PIPELINES: list[dict[str, Any]] = [
    {
        "name": "News",
        "steps": [
            {
                "step_type": "fetch",
                "label": "Feed",
                "handler_slug": "rss",
                "handler_config": {"feed_url": "https://a.example/feed"},
            },
            {
                "step_type": "ai",
                "provider": "openai",
                "model": "gpt-4o-mini",
                "system_prompt": "Summarise.",
                "temperature": 0.3,
                "custom_field": {"kept": True},
            },
            {
                "step_type": "publish",
                "handler_slug": "webhook",
                "handler_config": {"url": "https://hooks.example/default", "secret": "pipeline-secret"},
            },
        ],
        "flows": [
            {
                "name": "Morning",
                "schedule": {"interval": "daily"},
                "edits": [
                    StepEdit(handler_config={"feed_url": "https://b.example/feed", "max_items": 5}, queue_mode="drain"),
                    StepEdit(queue_mode="loop"),
                    StepEdit(
                        handler_slugs=["webhook", "wordpress"],
                        handler_configs={
                            "webhook": {"secret": "flow-secret"},
                            "wordpress": {
                                "site_url": "https://wp.example",
                                "username": "editor",
                                "application_password": "app-pass",
                            },
                        },
                    ),
                ],
                "queue": ["First prompt", "Second prompt"],
            },
            {"name": "On demand", "schedule": {"interval": "manual"}, "edits": [None, None, None], "queue": []},
        ],
    },
    {
        "name": "Review",
        "steps": [{"step_type": "approval"}, {"step_type": "system_task"}],
        "flows": [
            {
                "name": "Weekdays",
                "schedule": {"interval": "0 9 * * 1-5", "timezone": "Europe/Berlin", "allow_overlap": True},
                "edits": [
                    StepEdit(flow_step_settings={"description": "Check", "timeout_hours": 48, "on_reject": "fail"}),
                    StepEdit(flow_step_settings={"task_type": "echo", "params": {"x": 1}}),
                ],
                "queue": [],
            },
            {"name": "Later", "schedule": {"interval": "one_time", "timestamp": FUTURE}, "edits": [None, None]},
        ],
    },
]


async def seed_agent(runtime, owner, slug: str = "news", pipelines=PIPELINES) -> int:
    """An agent with pipelines and flows written through the shared step/flow helpers."""
    agent = await call(owner, "create-agent", {"agent_slug": slug, "agent_config": {"description": "Digest"}})
    now = utcnow()
    async with runtime.db.write() as s:
        for spec in pipelines:
            pipeline = Pipeline(
                user_id=1,
                agent_id=agent["agent_id"],
                pipeline_name=spec["name"],
                pipeline_config={},
                created_at=now,
                updated_at=now,
            )
            s.add(pipeline)
            await s.flush()
            steps = [
                build_pipeline_step(pipeline.pipeline_id, seed, i, box=runtime.box, files_roots=None)
                for i, seed in enumerate(spec["steps"])
            ]
            pipeline.pipeline_config = {st["pipeline_step_id"]: st for st in steps}
            for fspec in spec["flows"]:
                flow = Flow(
                    pipeline_id=pipeline.pipeline_id,
                    user_id=1,
                    agent_id=agent["agent_id"],
                    flow_name=fspec["name"],
                    flow_config={},
                    scheduling_config={"interval": "manual"},
                    created_at=now,
                    updated_at=now,
                )
                s.add(flow)
                await s.flush()
                config = sync_flow_config(
                    {}, pipeline.pipeline_config, flow_id=flow.flow_id, pipeline_id=pipeline.pipeline_id
                )
                for entry, edit in zip(ordered_steps(config), fspec["edits"], strict=True):
                    if edit is not None:
                        config[entry["flow_step_id"]] = apply_step_edit(
                            entry, edit, box=runtime.box, files_roots=None
                        ).entry
                for entry in ordered_steps(config):
                    if entry["step_type"] == "ai":
                        entry["prompt_queue"] = [
                            {"prompt": p, "added_at": "2026-01-01T00:00:00Z"} for p in fspec.get("queue", [])
                        ]
                flow.flow_config = config
                flow.scheduling_config, flow.next_run_at, _ = sched.apply(
                    None, sched.normalize(fspec["schedule"]), flow_id=flow.flow_id, now=now
                )
    return agent["agent_id"]


def canonical(bundle: dict[str, Any]) -> dict[str, Any]:
    """A bundle with refs replaced by positions and without exported_at: equal iff the content is equal."""
    out = copy.deepcopy(bundle)
    out.pop("exported_at")
    pipe_pos = {p["ref"]: i for i, p in enumerate(out["pipelines"])}
    step_pos = {}
    for i, p in enumerate(out["pipelines"]):
        p["ref"] = i
        for j, st in enumerate(p["steps"]):
            step_pos[st["ref"]] = (i, j)
            st["ref"] = [i, j]
    for f in out["flows"]:
        f["pipeline_ref"] = pipe_pos[f["pipeline_ref"]]
        for st in f["steps"]:
            st["step_ref"] = list(step_pos[st["step_ref"]])
    return out


async def export(client, slug: str, **extra: Any) -> dict[str, Any]:
    return await call(client, "export-agent", {"agent_slug": slug, **extra})


async def unchanged(runtime, client, tool, args, code):
    before = await table_rows(runtime)
    err = await fail(client, tool, args, code)
    assert await table_rows(runtime) == before
    return err


# --- export-agent -------------------------------------------------------------------------------


@pytest.mark.backends
async def test_export_bundle_v1_with_secrets_removed(runtime, owner):
    agent_id = await seed_agent(runtime, owner)
    before = await table_rows(runtime)
    out = await export(owner, "news")
    assert await table_rows(runtime) == before  # read-only: no audit row either
    assert set(out) == {"agent_id", "agent_slug", "bundle", "counts", "redacted_fields"}
    assert (out["agent_id"], out["agent_slug"], out["counts"]) == (agent_id, "news", {"pipelines": 2, "flows": 4})
    bundle = out["bundle"]
    assert set(bundle) == {"format", "version", "exported_at", "agent", "pipelines", "flows"}
    assert (bundle["format"], bundle["version"]) == ("datamachine-mcp.agent-bundle", 1)
    assert bundle["agent"] == {"agent_slug": "news", "agent_name": "news", "agent_config": {"description": "Digest"}}
    news = bundle["pipelines"][0]
    assert news["ref"] == "1" and news["pipeline_name"] == "News"
    assert [st["step_type"] for st in news["steps"]] == ["fetch", "ai", "publish"]
    fetch, ai, publish = news["steps"]
    assert "pipeline_step_id" not in fetch and fetch["ref"].startswith("1_")
    assert fetch["label"] == "Feed" and fetch["execution_order"] == 0
    assert ai["custom_field"] == {"kept": True} and ai["temperature"] == 0.3
    assert publish["handler_config"] == {"url": "https://hooks.example/default"}
    morning = bundle["flows"][0]
    assert morning["pipeline_ref"] == "1" and morning["flow_name"] == "Morning"
    assert morning["scheduling_config"] == {"interval": "daily"}  # client keys only
    mfetch, mai, mpublish = morning["steps"]
    assert mfetch == {
        "step_ref": fetch["ref"],
        "handler_slugs": ["rss"],
        "handler_configs": {"rss": {"feed_url": "https://b.example/feed", "max_items": 5}},
        "queue_mode": "drain",
    }
    assert mai == {
        "step_ref": ai["ref"],
        "flow_step_settings": {},
        "queue_mode": "loop",
        "prompt_queue": [
            {"prompt": "First prompt", "added_at": "2026-01-01T00:00:00Z"},
            {"prompt": "Second prompt", "added_at": "2026-01-01T00:00:00Z"},
        ],
    }
    assert mpublish["handler_slugs"] == ["webhook", "wordpress"]
    assert mpublish["handler_configs"] == {
        "webhook": {"url": "https://hooks.example/default"},
        "wordpress": {"site_url": "https://wp.example", "username": "editor"},
    }
    assert out["redacted_fields"] == [
        "pipelines[0].steps[2].handler_config.secret",
        "flows[0].steps[2].handler_configs.webhook.secret",
        "flows[0].steps[2].handler_configs.wordpress.application_password",
        "flows[1].steps[2].handler_configs.webhook.secret",
    ]
    text = json.dumps(out)
    for secret in ("pipeline-secret", "flow-secret", "app-pass", "__encrypted__"):
        assert secret not in text
    weekdays = bundle["flows"][2]
    assert weekdays["scheduling_config"] == {
        "interval": "cron",
        "cron_expression": "0 9 * * 1-5",
        "timezone": "Europe/Berlin",
        "allow_overlap": True,
    }
    assert weekdays["steps"][0] == {
        "step_ref": bundle["pipelines"][1]["steps"][0]["ref"],
        "flow_step_settings": {"description": "Check", "timeout_hours": 48, "on_reject": "fail"},
    }

    lean = await export(owner, "news", include_flows=False)
    assert lean["bundle"]["flows"] == [] and lean["counts"] == {"pipelines": 2, "flows": 0}
    assert lean["redacted_fields"] == ["pipelines[0].steps[2].handler_config.secret"]
    no_queues = await export(owner, "news", include_queues=False)
    assert all("prompt_queue" not in st for f in no_queues["bundle"]["flows"] for st in f["steps"])
    assert no_queues["bundle"]["flows"][0]["steps"][1]["queue_mode"] == "loop"


async def test_export_access_and_selector_errors(runtime, owner):
    await seed_agent(runtime, owner)
    async with connect(runtime, USER2) as c:
        err = await fail(c, "export-agent", {"agent_slug": "news"}, "agent_access_denied")
        assert err["data"]["required_role"] == "viewer"
        await call(owner, "grant-agent-access", {"agent_slug": "news", "user_id": 2, "role": "viewer"})
        assert (await call(c, "export-agent", {"agent_slug": "news"}))["counts"]["flows"] == 4
    await unchanged(runtime, owner, "export-agent", {}, "agent_identity_required")
    await unchanged(runtime, owner, "export-agent", {"agent_slug": "ghost"}, "agent_not_found")
    await unchanged(runtime, owner, "export-agent", {"agent_slug": "news", "include_flows": "yes"}, "invalid_input")


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.backends
async def test_export_delete_import_round_trip(runtime, owner):
    await seed_agent(runtime, owner)
    first = await export(owner, "news")
    old_rows = await _agent_rows(runtime, "news")
    await call(owner, "delete-agent", {"agent_slug": "news"})
    log_before = len(await log_rows(runtime))
    out = await call(owner, "import-agent", {"bundle": first["bundle"], "activate_schedules": True})
    assert out["skipped"] is False and out["dry_run"] is False
    assert out["imported"]["pipelines"] == 2 and out["imported"]["flows"] == 4
    assert out["paused_flow_ids"] == []
    assert out["warnings"] == [
        f"Step {fsid}: handler 'wordpress' still needs application_password (set it with update-flow-step before running)."
        for fsid in await _wordpress_steps(runtime, out["imported"]["flow_ids"])
    ]
    audit = (await log_rows(runtime))[log_before:]
    assert len(audit) == 1 and audit[0]["context"]["ability"] == "import-agent"
    assert audit[0]["agent_id"] == out["agent_id"]
    second = await export(owner, "news")
    assert canonical(second["bundle"]) == canonical(first["bundle"])
    assert second["redacted_fields"] == []  # secrets did not travel
    new_rows = await _agent_rows(runtime, "news")
    assert new_rows == _without_secrets(old_rows)
    # fresh ids everywhere
    assert set(out["imported"]["pipeline_ids"]).isdisjoint({1, 2})


@pytest.mark.backends
async def test_bundle_from_another_database_imports_identically(runtime, owner, tmp_path: Path):
    await seed_agent(runtime, owner)
    exported = await export(owner, "news")
    other_dir = tmp_path / "other"
    other = await open_runtime(ProcessConfig(db=str(other_dir / "dm.db"), data_dir=other_dir, toolsets=None))
    try:
        async with connect(other) as c:
            await call(c, "create-agent", {"agent_slug": "filler"})  # ids differ from the source database
            out = await call(c, "import-agent", {"bundle": exported["bundle"], "activate_schedules": True})
            assert out["imported"]["pipeline_ids"] == [1, 2] and out["agent_id"] == 2
            again = await call(c, "export-agent", {"agent_slug": "news"})
        assert canonical(again["bundle"]) == canonical(exported["bundle"])
        assert await _agent_rows(other, "news") == _without_secrets(await _agent_rows(runtime, "news"))
    finally:
        await other.db.dispose()


async def _agent_rows(runtime, slug: str) -> dict[str, Any]:
    """The agent's pipelines and flows with ids, step ids and timestamps taken out."""
    async with runtime.db.read() as s:
        agent = (await s.execute(select(Agent).where(Agent.agent_slug == slug))).scalar_one()
        pipelines = (
            (
                await s.execute(
                    select(Pipeline).where(Pipeline.agent_id == agent.agent_id).order_by(Pipeline.pipeline_id)
                )
            )
            .scalars()
            .all()
        )
        flows = (
            (await s.execute(select(Flow).where(Flow.agent_id == agent.agent_id).order_by(Flow.flow_id)))
            .scalars()
            .all()
        )
    position = {}
    out_pipes = []
    for i, p in enumerate(pipelines):
        steps = ordered_steps(p.pipeline_config)
        position.update({st["pipeline_step_id"]: (i, j) for j, st in enumerate(steps)})
        out_pipes.append(
            (p.pipeline_name, p.user_id, [{k: v for k, v in st.items() if k != "pipeline_step_id"} for st in steps])
        )
    out_flows = []
    for f in flows:
        steps = []
        for entry in ordered_steps(f.flow_config):
            drop = ("flow_step_id", "pipeline_step_id", "pipeline_id", "flow_id")
            steps.append((position[entry["pipeline_step_id"]], {k: v for k, v in entry.items() if k not in drop}))
        out_flows.append((f.flow_name, f.user_id, sched.client_keys(f.scheduling_config), steps))
    return {"agent": (agent.agent_name, agent.agent_config, agent.owner_id), "pipelines": out_pipes, "flows": out_flows}


def _without_secrets(rows: dict[str, Any]) -> dict[str, Any]:
    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not is_envelope(v)}
        if isinstance(value, list):
            return [strip(v) for v in value]
        if isinstance(value, tuple):
            return tuple(strip(v) for v in value)
        return value

    return strip(rows)


async def _wordpress_steps(runtime, flow_ids: list[int]) -> list[str]:
    async with runtime.db.read() as s:
        flows = (await s.execute(select(Flow).where(Flow.flow_id.in_(flow_ids)).order_by(Flow.flow_id))).scalars()
        return [
            e["flow_step_id"]
            for f in flows
            for e in ordered_steps(f.flow_config)
            if "wordpress" in e.get("handler_slugs", [])
        ]


# --- import-agent behaviour ---------------------------------------------------------------------


@pytest.mark.backends
async def test_import_pauses_schedules_and_retires_past_one_time(runtime, owner):
    await seed_agent(runtime, owner)
    bundle = (await export(owner, "news"))["bundle"]
    bundle["flows"].append(
        {**bundle["flows"][1], "flow_name": "Missed", "scheduling_config": {"interval": "one_time", "timestamp": PAST}}
    )
    out = await call(owner, "import-agent", {"bundle": bundle, "agent_slug": "copy", "agent_name": "  Copy  "})
    ids = out["imported"]["flow_ids"]
    assert out["agent_slug"] == "copy"
    assert out["paused_flow_ids"] == [ids[0], ids[2], ids[3]]  # daily, cron, future one_time; not manual
    async with runtime.db.read() as s:
        flows = {f.flow_id: f for f in (await s.execute(select(Flow).where(Flow.flow_id.in_(ids)))).scalars()}
        agent = (await s.execute(select(Agent).where(Agent.agent_slug == "copy"))).scalar_one()
    assert agent.agent_name == "Copy"
    for fid in out["paused_flow_ids"]:
        assert flows[fid].scheduling_config["enabled"] is False and flows[fid].next_run_at is None
    assert flows[ids[1]].scheduling_config == {"interval": "manual"}
    assert sched.client_keys(flows[ids[4]].scheduling_config) == {"interval": "manual"}  # past one_time
    got = await call(owner, "get-agent", {"agent_slug": "copy"})
    assert got["agent"]["resource_counts"]["flows"] == 5


@pytest.mark.backends
async def test_import_seals_plaintext_secrets(runtime, owner):
    await seed_agent(runtime, owner)
    bundle = (await export(owner, "news"))["bundle"]
    bundle["flows"][0]["steps"][2]["handler_configs"]["wordpress"]["application_password"] = "typed-in"
    out = await call(owner, "import-agent", {"bundle": bundle, "agent_slug": "sealed"})
    assert out["warnings"] == []
    async with runtime.db.read() as s:
        flow = await s.get(Flow, out["imported"]["flow_ids"][0])
    wp = next(e for e in flow.flow_config.values() if "wordpress" in e.get("handler_slugs", []))
    stored = wp["handler_configs"]["wordpress"]["application_password"]
    assert is_envelope(stored) and runtime.box.decrypt(stored, "handler:wordpress.application_password") == "typed-in"


@pytest.mark.backends
async def test_dry_run_writes_nothing(runtime, owner):
    await seed_agent(runtime, owner)
    bundle = (await export(owner, "news"))["bundle"]
    before = await table_rows(runtime)
    out = await call(owner, "import-agent", {"bundle": bundle, "agent_slug": "preview", "dry_run": True})
    assert await table_rows(runtime) == before
    assert out["agent_id"] is None and out["dry_run"] is True and out["skipped"] is False
    assert out["imported"] == {"pipelines": 2, "flows": 4, "pipeline_ids": [], "flow_ids": []}
    assert out["paused_flow_ids"] == []
    assert (
        len(out["warnings"]) == 1 and "flows[0]" in out["warnings"][0] and "application_password" in out["warnings"][0]
    )
    # a dry run reports the conflict a real run would hit
    await unchanged(runtime, owner, "import-agent", {"bundle": bundle, "dry_run": True}, "agent_slug_conflict")


async def test_slug_conflicts(runtime, owner):
    agent_id = await seed_agent(runtime, owner)
    bundle = (await export(owner, "news"))["bundle"]
    err = await unchanged(runtime, owner, "import-agent", {"bundle": bundle}, "agent_slug_conflict")
    assert err["message"] == f'Agent with slug "news" already exists (ID: {agent_id}).'
    before = await table_rows(runtime)
    out = await call(owner, "import-agent", {"bundle": bundle, "agent_slug": " NEWS ", "on_conflict": "skip"})
    assert await table_rows(runtime) == before
    assert out == {
        "agent_id": agent_id,
        "agent_slug": "news",
        "skipped": True,
        "dry_run": False,
        "imported": {"pipelines": 0, "flows": 0, "pipeline_ids": [], "flow_ids": []},
        "paused_flow_ids": [],
        "warnings": [],
    }
    await unchanged(runtime, owner, "import-agent", {"bundle": bundle, "agent_slug": "!!"}, "invalid_agent_slug")
    await unchanged(runtime, owner, "import-agent", {"bundle": bundle, "on_conflict": "merge"}, "invalid_input")


def _mutate(bundle: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(bundle)
    target = out
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    for key in keys[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return out


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "error_path"),
    [
        ("format", "something-else", "format"),
        ("version", 2, "version"),
        ("agent", _DELETE, "agent"),
        ("pipelines", _DELETE, "pipelines"),
        ("pipelines.0.ref", None, "pipelines[0].ref"),
        ("pipelines.0.pipeline_name", "  ", "pipelines[0].pipeline_name"),
        ("pipelines.1.ref", "1", "pipelines[1].ref"),
        ("pipelines.0.steps.1.step_type", "teleport", "pipelines[0].steps[1].step_type"),
        ("pipelines.0.steps", "x", "pipelines[0].steps"),
        ("flows.0.pipeline_ref", "404", "flows[0].pipeline_ref"),
        ("flows.0.steps.0.step_ref", "1_nope", "flows[0].steps[0].step_ref"),
        ("flows.0.scheduling_config", {"interval": "fortnightly"}, "flows[0].scheduling_config"),
        ("flows.0.steps.1.queue_mode", "shuffle", "flows[0].steps[1].queue_mode"),
        ("flows.0.steps.0.prompt_queue", [{"prompt": "x"}], "flows[0].steps[0].prompt_queue"),
        ("flows.0.steps.1.surprise", 1, "flows[0].steps[1].surprise"),
        ("flows.2.steps.0.handler_slugs", ["rss"], "flows[2].steps[0].handler_slugs"),
    ],
)
async def test_invalid_bundles_write_nothing(runtime, owner, path, value, error_path):
    await seed_agent(runtime, owner)
    bundle = (await export(owner, "news"))["bundle"]
    bad = _mutate(bundle, path, value)
    err = await unchanged(runtime, owner, "import-agent", {"bundle": bad, "agent_slug": "x"}, "invalid_bundle")
    assert error_path in [e["path"] for e in err["data"]["errors"]], err
    assert err["message"].startswith("The bundle is not a valid datamachine-mcp.agent-bundle v1")


@pytest.mark.parametrize(
    ("path", "value", "code", "error_path"),
    [
        (
            "flows.0.steps.2.handler_slugs",
            ["webhook", "carrier-pigeon"],
            "handler_not_found",
            "flows[0].steps[2].handler_configs.carrier-pigeon",
        ),
        (
            "flows.0.steps.0.handler_slugs",
            ["wordpress"],
            "invalid_handler",
            "flows[0].steps[0].handler_configs.wordpress",
        ),
        (
            "flows.0.steps.0.handler_configs.rss.colour",
            "red",
            "invalid_handler_config",
            "flows[0].steps[0].handler_configs.rss",
        ),
        (
            "flows.0.steps.0.handler_configs.rss.max_items",
            "many",
            "invalid_handler_config",
            "flows[0].steps[0].handler_configs.rss",
        ),
        ("pipelines.0.steps.0.handler_slug", "nope", "handler_not_found", "pipelines[0].steps[0]"),
        ("pipelines.0.steps.2.handler_config.url", "ftp://x", "invalid_handler_config", "pipelines[0].steps[2]"),
    ],
)
async def test_handler_errors_name_the_bundle_path(runtime, owner, path, value, code, error_path):
    await seed_agent(runtime, owner)
    bundle = (await export(owner, "news"))["bundle"]
    err = await unchanged(
        runtime, owner, "import-agent", {"bundle": _mutate(bundle, path, value), "agent_slug": "x"}, code
    )
    assert err["data"]["path"] == error_path
    assert err["message"].startswith(error_path)


async def test_import_follows_create_agent_rules(runtime, owner):
    await seed_agent(runtime, owner)
    bundle = (await export(owner, "news"))["bundle"]
    async with connect(runtime, USER2) as c:
        out = await call(c, "import-agent", {"bundle": bundle, "agent_slug": "mine", "owner_id": 9})
        got = await call(c, "get-agent", {"agent_slug": "mine"})
        assert got["agent"]["owner_id"] == 2 and got["agent"]["caller_role"] == "admin"
        assert out["imported"]["flows"] == 4
        err = await unchanged(
            runtime, c, "import-agent", {"bundle": bundle, "agent_slug": "more"}, "agent_limit_reached"
        )
        assert "limited to 1 agent" in err["message"]
        # the limit is checked on a dry run too; a skip of an existing slug needs no new agent
        await unchanged(
            runtime, c, "import-agent", {"bundle": bundle, "agent_slug": "more", "dry_run": True}, "agent_limit_reached"
        )
        assert (await call(c, "import-agent", {"bundle": bundle, "agent_slug": "mine", "on_conflict": "skip"}))[
            "skipped"
        ]
    async with runtime.db.read() as s:
        pipes = (await s.execute(select(Pipeline).where(Pipeline.agent_id == out["agent_id"]))).scalars().all()
    assert {p.user_id for p in pipes} == {2}
    admin = await call(owner, "import-agent", {"bundle": bundle, "agent_slug": "for-seven", "owner_id": 7})
    assert (await call(owner, "get-agent", {"agent_id": admin["agent_id"]}))["agent"]["owner_id"] == 7
    bound = await as_token(runtime, user_id=1, agent_slug="news")
    before = await table_rows(runtime)
    async with connect(runtime, bound) as c:
        await fail(c, "import-agent", {"bundle": bundle, "agent_slug": "y"}, "permission_denied")
    assert list(changed_tables(before, await table_rows(runtime))) == ["datamachine_logs"]  # the denial row only


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"bundle": "not an object"}, "bundle"),
        ({}, "bundle"),
        ({"bundle": {}, "agent_name": "n" * 201}, "agent_name"),
        ({"bundle": {}, "owner_id": 0}, "owner_id"),
        ({"bundle": {}, "dry_run": "yes"}, "dry_run"),
        ({"bundle": {}, "extra": 1}, "extra"),
    ],
)
async def test_import_bad_input(runtime, owner, args, field):
    err = await unchanged(runtime, owner, "import-agent", args, "invalid_input")
    assert field in {e["field"] for e in err["data"]["errors"]}


async def test_import_rejects_oversized_bundles(runtime, owner):
    huge = {"format": "datamachine-mcp.agent-bundle", "version": 1, "padding": "x" * (1024 * 1024)}
    err = await unchanged(runtime, owner, "import-agent", {"bundle": huge}, "input_too_large")
    assert err["data"]["field"] == "bundle"
