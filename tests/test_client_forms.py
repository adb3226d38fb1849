"""Arguments as real clients send them: "6" for an integer, JSON text for an object or array, hints for
unknown fields; everything else stays strict and a refusal writes nothing."""

from __future__ import annotations

from typing import Any

import pytest
from mcp import Client

from datamachine_mcp.abilities.context import Runtime
from tests.conftest import call, fail, table_rows
from tests.jobs_support import echo_step, make_flow

pytestmark = pytest.mark.anyio


async def test_numeric_string_for_an_integer_field(owner: Client) -> None:
    out = await call(owner, "get-jobs", {"per_page": "7", "offset": "0"})
    assert (out["per_page"], out["offset"]) == (7, 0)
    # "-3" is read as the integer -3, then validated as usual (offset ≥ 0)
    err = await fail(owner, "get-jobs", {"offset": "-3"}, code="invalid_input")
    assert err["data"]["errors"][0]["field"] == "offset"
    assert "greater than or equal to 0" in err["message"]


@pytest.mark.parametrize("text", ["6.5", " 6", "6 ", "+6", "1e3", "six", "", "0x10"])
async def test_other_strings_for_an_integer_stay_invalid(owner: Client, text: str) -> None:
    err = await fail(owner, "get-jobs", {"per_page": text}, code="invalid_input")
    assert "per_page: Input should be a valid integer" in err["message"]


async def test_strings_stay_strings_and_booleans_stay_strict(owner: Client, runtime: Runtime) -> None:
    out = await call(owner, "create-pipeline", {"pipeline_name": "123"})
    assert out["pipeline_name"] == "123"
    before = await table_rows(runtime)
    err = await fail(owner, "run-flow", {"flow_id": 1, "dry_run": "true"}, code="invalid_input")
    assert "dry_run: Input should be a valid boolean" in err["message"]
    assert await table_rows(runtime) == before


async def test_json_text_for_object_and_array_fields(owner: Client) -> None:
    flow = await make_flow(owner, [echo_step(text="hi")])
    out = await call(
        owner,
        "run-flow",
        {"flow_id": str(flow["flow_id"]), "initial_data": '{"topic": "tea"}', "wait_seconds": "0"},
    )
    job = await call(owner, "get-jobs", {"job_id": str(out["job_id"])})
    assert job["jobs"][0]["job_id"] == out["job_id"]
    # nested: the workflow object as text, its steps array as text inside it
    steps = '[{"step_type": "system_task", "flow_step_settings": {"task_type": "echo", "params": {}}}]'
    created = await call(owner, "create-pipeline", {"pipeline_name": "Q", "workflow": '{"steps": ' + steps + "}"})
    assert created["flow_id"] >= 1
    created = await call(owner, "create-pipeline", {"pipeline_name": "R", "workflow": {"steps": steps}})
    assert created["flow_id"] >= 1


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({"pipeline_name": "x", "workflow": "[1, 2]"}, "workflow"),  # an array is not an object
        ({"pipeline_name": "x", "workflow": "{not json"}, "workflow"),
        ({"pipeline_name": "x", "workflow": '"{}"'}, "workflow"),
        ({"pipeline_name": "x", "workflow": {"steps": '{"step_type": "ai"}'}}, "workflow.steps"),
    ],
)
async def test_json_text_of_the_wrong_shape_stays_invalid(
    owner: Client, runtime: Runtime, args: dict[str, Any], field: str
) -> None:
    before = await table_rows(runtime)
    err = await fail(owner, "create-pipeline", args)
    assert err["code"] in ("invalid_input", "invalid_workflow")
    assert err["data"]["errors"][0]["field"] == field
    assert await table_rows(runtime) == before


async def test_unknown_field_suggests_the_close_one(owner: Client) -> None:
    err = await fail(owner, "run-flow", {"flow_id": 1, "wait": 30}, code="invalid_input")
    assert "wait: unknown field (did you mean wait_seconds?)" in err["message"]
    assert ".." not in err["message"]
    assert err["data"]["errors"] == [
        {"field": "wait", "message": "unknown field (did you mean wait_seconds?)", "suggestions": ["wait_seconds"]}
    ]
    err = await fail(owner, "get-jobs", {"jobId": 3}, code="invalid_input")
    assert err["data"]["errors"][0]["suggestions"] == ["job_id"]
    err = await fail(owner, "get-jobs", {"zzz": 3}, code="invalid_input")
    assert err["data"]["errors"][0] == {"field": "zzz", "message": "unknown field"}


async def test_handler_on_a_step_points_at_handler_slugs(owner: Client, runtime: Runtime) -> None:
    before = await table_rows(runtime)
    step = {"step_type": "fetch", "handler": "rss"}
    err = await fail(owner, "create-pipeline", {"pipeline_name": "x", "workflow": {"steps": [step]}})
    assert err["data"]["errors"][0]["field"] == "workflow.steps.0.handler"
    assert err["data"]["errors"][0]["suggestions"] == ["handler_slugs"]
    assert "did you mean handler_slugs?" in err["message"]
    err = await fail(owner, "execute-workflow", {"workflow": {"steps": [step]}})
    assert err["data"]["errors"][0]["suggestions"] == ["handler_slugs"]
    assert await table_rows(runtime) == before
