"""Pipeline steps: get, add, update, delete, reorder; flows stay in sync (docs/storage.md, flow_config)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text

from datamachine_mcp.storage.timeutil import utcnow
from tests.conftest import call, connect, fail, log_rows, table_rows
from tests.test_pipelines import (
    USER2,
    add_flow,
    add_items,
    add_jobs,
    denied,
    flow_row,
    get_pipeline,
    grant,
    make_agent,
    make_pipeline,
    unchanged,
)

pytestmark = pytest.mark.anyio


def by_order(config: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted(config.values(), key=lambda s: s["execution_order"])


async def assert_in_sync(client, pipeline_id: int) -> dict[str, Any]:
    """Orders are 0..n-1 and every flow has exactly one mirrored entry per pipeline step."""
    row = await get_pipeline(client, pipeline_id)
    steps = by_order(row["pipeline_config"])
    assert [s["execution_order"] for s in steps] == list(range(len(steps)))
    for flow in row["flows"]:
        expected = {
            f"{s['pipeline_step_id']}_{flow['flow_id']}": (s["pipeline_step_id"], s["step_type"], s["execution_order"])
            for s in steps
        }
        got = {k: (v["pipeline_step_id"], v["step_type"], v["execution_order"]) for k, v in flow["flow_config"].items()}
        assert got == expected
        assert all(
            v["pipeline_id"] == pipeline_id and v["flow_id"] == flow["flow_id"] for v in flow["flow_config"].values()
        )
    return row


# --- get-pipeline-steps -------------------------------------------------------------------------


async def test_get_pipeline_steps(runtime, owner):
    created = await make_pipeline(owner)
    pid, psids = created["pipeline_id"], created["pipeline_step_ids"]
    out = await call(owner, "get-pipeline-steps", {"pipeline_id": pid})
    assert out["pipeline_id"] == pid and out["step_count"] == 3
    assert [s["pipeline_step_id"] for s in out["steps"]] == psids
    assert out["steps"][1] == {
        "pipeline_step_id": psids[1],
        "step_type": "ai",
        "execution_order": 1,
        "label": "Write",
        "system_prompt": "You write.",
    }
    one = await call(owner, "get-pipeline-steps", {"pipeline_step_id": psids[2], "pipeline_id": 999})
    assert (one["pipeline_id"], one["step_count"], one["steps"][0]["step_type"]) == (pid, 1, "publish")
    unknown = f"{pid}_00000000-0000-4000-8000-000000000000"
    assert await call(owner, "get-pipeline-steps", {"pipeline_step_id": unknown}) == {
        "pipeline_id": None,
        "steps": [],
        "step_count": 0,
    }
    missing_pipeline = "999_00000000-0000-4000-8000-000000000000"
    assert (await call(owner, "get-pipeline-steps", {"pipeline_step_id": missing_pipeline}))["step_count"] == 0
    err = await fail(owner, "get-pipeline-steps", {"pipeline_step_id": "  "}, "invalid_pipeline_step_id")
    assert err["message"] == "pipeline_step_id must be a non-empty string"
    await fail(owner, "get-pipeline-steps", {"pipeline_step_id": "not-an-id"}, "invalid_pipeline_step_id")
    await fail(owner, "get-pipeline-steps", {}, "invalid_pipeline_id")
    await fail(owner, "get-pipeline-steps", {"pipeline_id": 999}, "pipeline_not_found")
    err = await fail(owner, "get-pipeline-steps", {"pipeline_id": 0}, "invalid_input")
    assert err["data"]["errors"][0]["field"] == "pipeline_id"
    async with connect(runtime, USER2) as c:
        await fail(c, "get-pipeline-steps", {"pipeline_id": pid}, "agent_access_denied")
        await fail(c, "get-pipeline-steps", {"pipeline_step_id": psids[0]}, "agent_access_denied")


# --- add-pipeline-step --------------------------------------------------------------------------


async def test_add_pipeline_step_reaches_every_flow(runtime, owner):
    created = await make_pipeline(owner)
    pid = created["pipeline_id"]
    second = await add_flow(owner, pid)
    out = await call(
        owner,
        "add-pipeline-step",
        {
            "pipeline_id": pid,
            "step_type": "update",
            "step_config": {
                "handler_slug": "webhook",
                "handler_config": {"secret": "abc"},
                "label": "Update target",
                "pipeline_step_id": "client-id-ignored",
                "execution_order": 42,
                "note": "kept",
            },
        },
    )
    psid = out["pipeline_step_id"]
    assert psid.startswith(f"{pid}_") and psid != "client-id-ignored"
    assert (out["step_type"], out["execution_order"], out["flows_updated"]) == ("update", 3, 2)
    assert out["flow_step_ids"] == [
        {"flow_id": created["flow_id"], "flow_step_id": f"{psid}_{created['flow_id']}"},
        {"flow_id": second, "flow_step_id": f"{psid}_{second}"},
    ]
    # the webhook default lacks its url: each flow's seeded copy is reported
    assert len(out["warnings"]) == 2 and all("url" in w for w in out["warnings"])
    row = await assert_in_sync(owner, pid)
    step = row["pipeline_config"][psid]
    assert step["label"] == "Update target" and step["note"] == "kept"
    assert step["handler_config"] == {"secret": "********"}
    for flow in row["flows"]:
        entry = flow["flow_config"][f"{psid}_{flow['flow_id']}"]
        assert entry["handler_slugs"] == ["webhook"] and entry["handler_configs"] == {"webhook": {"secret": "********"}}
    audit = (await log_rows(runtime))[-1]
    assert audit["message"].startswith(f"add-pipeline-step: step {psid}") and audit["pipeline_id"] == pid

    ai = await call(owner, "add-pipeline-step", {"pipeline_id": pid, "step_type": "ai"})
    entry = (await flow_row(runtime, second)).flow_config[f"{ai['pipeline_step_id']}_{second}"]
    assert entry["queue_mode"] == "static" and entry["prompt_queue"] == [] and ai["warnings"] == []
    bare = await call(owner, "create-pipeline", {"pipeline_name": "Empty"})
    first = await call(owner, "add-pipeline-step", {"pipeline_id": bare["pipeline_id"], "step_type": "fetch"})
    assert (first["execution_order"], first["flows_updated"], first["flow_step_ids"]) == (0, 0, [])
    assert (await get_pipeline(owner, bare["pipeline_id"]))["pipeline_config"][first["pipeline_step_id"]][
        "label"
    ] == "Fetch"


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        ({"step_type": "teleport"}, "invalid_step_type", "Invalid step_type 'teleport'. Must be one of: fetch, ai"),
        ({"step_type": "fetch", "step_config": {"handler_slug": "nope"}}, "handler_not_found", "nope"),
        ({"step_type": "fetch", "step_config": {"handler_slug": "wordpress"}}, "invalid_handler", "wordpress"),
        ({"step_type": "ai", "step_config": {"handler_slug": "rss"}}, "invalid_handler", ""),
        (
            {"step_type": "fetch", "step_config": {"handler_slug": "rss", "handler_config": {"max_items": 500}}},
            "invalid_handler_config",
            "max_items",
        ),
        ({"step_type": "ai", "step_config": {"provider": "acme"}}, "unknown_provider", "acme"),
    ],
)
async def test_add_pipeline_step_errors(runtime, owner, args, code, fragment):
    created = await make_pipeline(owner)
    err = await unchanged(runtime, owner, "add-pipeline-step", {"pipeline_id": created["pipeline_id"], **args}, code)
    assert fragment in err["message"]


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"step_type": "ai", "step_config": {"temperature": "hot"}}, "step_config.temperature"),
        ({"step_type": "ai", "step_config": {"max_tokens": 0}}, "step_config.max_tokens"),
        ({"step_type": "ai", "step_config": "x"}, "step_config"),
        ({}, "step_type"),
    ],
)
async def test_add_pipeline_step_invalid_input(runtime, owner, args, field):
    created = await make_pipeline(owner)
    err = await unchanged(
        runtime, owner, "add-pipeline-step", {"pipeline_id": created["pipeline_id"], **args}, "invalid_input"
    )
    assert err["data"]["errors"][0]["field"] == field


async def test_add_pipeline_step_not_found_and_roles(runtime, owner):
    await unchanged(runtime, owner, "add-pipeline-step", {"pipeline_id": 999, "step_type": "ai"}, "pipeline_not_found")
    bot = await make_agent(owner)
    pid = (await make_pipeline(owner, agent_id=bot))["pipeline_id"]
    await grant(owner, bot, 2, "operator")
    async with connect(runtime, USER2) as c:
        await denied(runtime, c, "add-pipeline-step", {"pipeline_id": pid, "step_type": "ai"})
    await call(owner, "update-agent", {"agent_id": bot, "status": "inactive"})
    await unchanged(runtime, owner, "add-pipeline-step", {"pipeline_id": pid, "step_type": "ai"}, "agent_inactive")


# --- update-pipeline-step -----------------------------------------------------------------------


async def test_update_pipeline_step(runtime, owner):
    created = await make_pipeline(owner)
    pid, (fetch, ai, _) = created["pipeline_id"], created["pipeline_step_ids"]
    out = await call(
        owner,
        "update-pipeline-step",
        {
            "pipeline_step_id": ai,
            "label": "Draft",
            "provider": "anthropic",
            "model": "claude",
            "temperature": 0.2,
            "max_tokens": 500,
            "skip_marker": "SKIP",
            "system_prompt": "You write.",
        },
    )
    assert out["updated_fields"] == ["label", "provider", "model", "temperature", "max_tokens", "skip_marker"]
    assert out["pipeline_id"] == pid
    step = (await call(owner, "get-pipeline-steps", {"pipeline_step_id": ai}))["steps"][0]
    assert (step["label"], step["provider"], step["model"], step["temperature"], step["max_tokens"]) == (
        "Draft",
        "anthropic",
        "claude",
        0.2,
        500,
    )
    # the label shows in every flow's step
    flow = (await get_pipeline(owner, pid))["flows"][0]
    assert flow["flow_config"][f"{ai}_{created['flow_id']}"]["label"] == "Draft"

    before = await table_rows(runtime)
    same = await call(owner, "update-pipeline-step", {"pipeline_step_id": ai, "label": "Draft", "max_tokens": 500})
    assert same["updated_fields"] == [] and await table_rows(runtime) == before  # no-op: no audit

    cleared = await call(
        owner,
        "update-pipeline-step",
        {"pipeline_step_id": ai, "provider": "", "temperature": None, "skip_marker": None},
    )
    assert cleared["updated_fields"] == ["provider", "temperature", "skip_marker"]
    step = (await call(owner, "get-pipeline-steps", {"pipeline_step_id": ai}))["steps"][0]
    assert not {"provider", "temperature", "skip_marker"} & set(step) and step["model"] == "claude"
    relabel = await call(owner, "update-pipeline-step", {"pipeline_step_id": fetch, "label": " "})
    assert relabel["updated_fields"] == []  # '' means the type's label, which it already has
    assert len([r for r in await log_rows(runtime) if r["message"].startswith("update-pipeline-step")]) == 2


async def test_update_pipeline_step_errors(runtime, owner):
    created = await make_pipeline(owner)
    fetch, ai, _ = created["pipeline_step_ids"]
    for field, value in (
        ("handler_slug", "rss"),
        ("handler_configs", {}),
        ("user_message", "hi"),
        ("handler_slugs", 5),
    ):
        err = await unchanged(
            runtime,
            owner,
            "update-pipeline-step",
            {"pipeline_step_id": ai, field: value},
            "invalid_pipeline_step_fields",
        )
        assert err["message"] == "Handler fields are flow-scoped. Use update-flow-step."
        assert err["data"]["fields"] == [field]
    err = await unchanged(
        runtime, owner, "update-pipeline-step", {"pipeline_step_id": ai}, "invalid_pipeline_step_update"
    )
    assert "at least one" in err["message"]
    err = await unchanged(
        runtime,
        owner,
        "update-pipeline-step",
        {"pipeline_step_id": fetch, "model": "x"},
        "invalid_pipeline_step_update",
    )
    assert "ai steps only" in err["message"]
    await unchanged(
        runtime, owner, "update-pipeline-step", {"pipeline_step_id": ai, "provider": "acme"}, "unknown_provider"
    )
    await unchanged(
        runtime, owner, "update-pipeline-step", {"pipeline_step_id": "", "label": "x"}, "invalid_pipeline_step_id"
    )
    await unchanged(
        runtime, owner, "update-pipeline-step", {"pipeline_step_id": "nope", "label": "x"}, "invalid_pipeline_step_id"
    )
    for psid in (
        f"{created['pipeline_id']}_00000000-0000-4000-8000-000000000000",
        "999_00000000-0000-4000-8000-000000000000",
    ):
        await unchanged(
            runtime, owner, "update-pipeline-step", {"pipeline_step_id": psid, "label": "x"}, "pipeline_step_not_found"
        )
    for args, field in (
        ({"temperature": 2.5}, "temperature"),
        ({"max_tokens": 32001}, "max_tokens"),
        ({"label": 1}, "label"),
    ):
        err = await unchanged(runtime, owner, "update-pipeline-step", {"pipeline_step_id": ai, **args}, "invalid_input")
        assert err["data"]["errors"][0]["field"] == field


# --- delete-pipeline-step -----------------------------------------------------------------------


async def test_delete_pipeline_step_renumbers_syncs_and_clears_items(runtime, owner):
    created = await make_pipeline(owner)
    pid, flow1 = created["pipeline_id"], created["flow_id"]
    fetch, ai, publish = created["pipeline_step_ids"]
    flow2 = await add_flow(owner, pid)
    [done_job] = await add_jobs(runtime, pid, flow1, 1, status="completed")
    [live_job] = await add_jobs(runtime, pid, flow1, 1, status="processing")
    soon = utcnow() + timedelta(hours=1)
    past = utcnow() - timedelta(hours=1)
    await add_items(runtime, f"{fetch}_{flow1}", flow1, 3, job_id=done_job, prefix="done")
    await add_items(runtime, f"{fetch}_{flow2}", flow2, 2, prefix="other-flow")
    # claims: active (live job, not expired) survive; expired or held by a final job do not
    await add_items(
        runtime, f"{fetch}_{flow1}", flow1, 2, job_id=live_job, status="claimed", claim_expires_at=soon, prefix="active"
    )
    await add_items(
        runtime, f"{fetch}_{flow1}", flow1, 1, job_id=live_job, status="claimed", claim_expires_at=None, prefix="held"
    )
    await add_items(
        runtime,
        f"{fetch}_{flow1}",
        flow1,
        1,
        job_id=live_job,
        status="claimed",
        claim_expires_at=past,
        prefix="expired",
    )
    await add_items(
        runtime, f"{fetch}_{flow1}", flow1, 1, job_id=done_job, status="claimed", claim_expires_at=soon, prefix="stale"
    )
    # rows of other steps, including one an unescaped LIKE ('_' wildcard) would wrongly match
    await add_items(runtime, f"{ai}_{flow1}", flow1, 2, prefix="ai")
    await add_items(runtime, f"{fetch.replace('_', 'X')}X{flow1}", flow1, 1, prefix="lookalike")

    out = await call(owner, "delete-pipeline-step", {"pipeline_id": pid, "pipeline_step_id": f" {fetch} "})
    assert out == {
        "pipeline_id": pid,
        "pipeline_step_id": fetch,
        "affected_flows": 2,
        "processed_items_deleted": 7,
        "message": out["message"],
    }
    row = await assert_in_sync(owner, pid)
    assert [s["pipeline_step_id"] for s in by_order(row["pipeline_config"])] == [ai, publish]
    async with runtime.db.read() as s:
        left = (await s.execute(text("SELECT item_identifier FROM datamachine_processed_items"))).scalars().all()
    assert sorted(left) == ["active-0", "active-1", "ai-0", "ai-1", "held-0", "lookalike-0"]
    audit = (await log_rows(runtime))[-1]
    assert audit["message"].startswith(f"delete-pipeline-step: step {fetch}")

    await unchanged(
        runtime,
        owner,
        "delete-pipeline-step",
        {"pipeline_id": pid, "pipeline_step_id": fetch},
        "pipeline_step_not_found",
    )
    other = await call(owner, "create-pipeline", {"pipeline_name": "Other"})
    await unchanged(
        runtime,
        owner,
        "delete-pipeline-step",
        {"pipeline_id": other["pipeline_id"], "pipeline_step_id": ai},
        "pipeline_step_not_found",
    )
    await unchanged(
        runtime, owner, "delete-pipeline-step", {"pipeline_id": 999, "pipeline_step_id": ai}, "pipeline_not_found"
    )
    await unchanged(
        runtime, owner, "delete-pipeline-step", {"pipeline_id": pid, "pipeline_step_id": ""}, "invalid_pipeline_step_id"
    )
    err = await unchanged(runtime, owner, "delete-pipeline-step", {"pipeline_id": pid}, "invalid_input")
    assert err["data"]["errors"][0]["field"] == "pipeline_step_id"


async def test_delete_last_step_leaves_empty_flows(runtime, owner):
    created = await call(
        owner, "create-pipeline", {"pipeline_name": "One", "steps": [{"step_type": "ai"}], "flow_config": {}}
    )
    out = await call(
        owner,
        "delete-pipeline-step",
        {"pipeline_id": created["pipeline_id"], "pipeline_step_id": created["pipeline_step_ids"][0]},
    )
    assert (out["affected_flows"], out["processed_items_deleted"]) == (1, 0)
    row = await get_pipeline(owner, created["pipeline_id"])
    assert row["pipeline_config"] == {} and row["flows"][0]["flow_config"] == {}


# --- reorder-pipeline-steps ---------------------------------------------------------------------


async def test_reorder_pipeline_steps(runtime, owner):
    created = await make_pipeline(owner)
    pid = created["pipeline_id"]
    fetch, ai, publish = created["pipeline_step_ids"]
    await add_flow(owner, pid)
    out = await call(
        owner,
        "reorder-pipeline-steps",
        {
            "pipeline_id": pid,
            "step_order": [
                {"pipeline_step_id": publish, "execution_order": 7},
                {"pipeline_step_id": fetch},
                {"pipeline_step_id": ai},
            ],
        },
    )
    assert out["steps"] == [
        {"pipeline_step_id": publish, "execution_order": 0},
        {"pipeline_step_id": fetch, "execution_order": 1},
        {"pipeline_step_id": ai, "execution_order": 2},
    ]
    assert out["step_count"] == 3
    row = await assert_in_sync(owner, pid)
    assert [s["pipeline_step_id"] for s in by_order(row["pipeline_config"])] == [publish, fetch, ai]
    # flow settings survive the reorder
    flow = row["flows"][0]
    assert flow["flow_config"][f"{fetch}_{flow['flow_id']}"]["handler_slugs"] == ["rss"]
    before = await table_rows(runtime)
    again = await call(
        owner,
        "reorder-pipeline-steps",
        {"pipeline_id": pid, "step_order": [{"pipeline_step_id": s} for s in (publish, fetch, ai)]},
    )
    assert again["steps"] == out["steps"] and await table_rows(runtime) == before  # no-op: no audit
    assert len([r for r in await log_rows(runtime) if r["message"].startswith("reorder-pipeline-steps")]) == 1


async def test_reorder_pipeline_steps_errors(runtime, owner):
    created = await make_pipeline(owner)
    pid = created["pipeline_id"]
    fetch, ai, publish = created["pipeline_step_ids"]

    def order(*ids):
        return {"pipeline_id": pid, "step_order": [{"pipeline_step_id": i} for i in ids]}

    err = await unchanged(runtime, owner, "reorder-pipeline-steps", order(fetch, ai, fetch), "duplicate_step_order")
    assert err["message"] == f"Step '{fetch}' appears more than once in step_order"
    await unchanged(
        runtime, owner, "reorder-pipeline-steps", order(fetch, ai, publish, "1_x"), "pipeline_step_not_found"
    )
    err = await unchanged(runtime, owner, "reorder-pipeline-steps", order(fetch, ai), "step_order_mismatch")
    assert err["data"]["missing"] == [publish]
    await unchanged(
        runtime, owner, "reorder-pipeline-steps", {**order(fetch), "pipeline_id": 999}, "pipeline_not_found"
    )
    for bad in ([], [{"pipeline_step_id": 5}], [{"id": fetch}], [{"pipeline_step_id": fetch}] * 51):
        err = await unchanged(
            runtime, owner, "reorder-pipeline-steps", {"pipeline_id": pid, "step_order": bad}, "invalid_step_order"
        )
        assert err["data"]["errors"][0]["field"].startswith("step_order")
    err = await unchanged(runtime, owner, "reorder-pipeline-steps", {"pipeline_id": pid}, "invalid_input")
    assert err["data"]["errors"][0]["field"] == "step_order"
