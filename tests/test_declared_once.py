"""Step types and handlers are declared once, beside their code: a new handler is one module.

The module below is written to a temporary directory, imported and registered, and nothing else is
touched: the catalogue tools list it, saved configs are validated against its fields, and a flow
using it runs through the engine.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest

from datamachine_mcp.engine.catalog import HANDLERS, STEP_TYPES, claiming_step_types, wait_kinds
from datamachine_mcp.engine.plan import control_keys
from datamachine_mcp.engine.steps import executor
from tests.conftest import call, fail
from tests.jobs_support import echo_step, engine, make_flow  # noqa: F401 (fixture)

pytestmark = pytest.mark.anyio

TINY = """
from datamachine_mcp.engine.catalog import FETCH, FieldSpec, HandlerSpec
from datamachine_mcp.engine.items import Item, ItemList


class Counting:
    async def fetch(self, config, ctx):
        return ItemList(
            Item(identifier=f"n{i}", title=f"Item {i}", body="b", content_string="b")
            for i in range(int(config.get("count") or 0))
        )


HANDLER = HandlerSpec(
    "tiny_count",
    "Tiny counter",
    "Items n0..n(count-1), for tests.",
    (FETCH,),
    {"count": FieldSpec("integer", "How many items", required=True, min=0, max=50)},
    code=Counting(),
)
"""


@pytest.fixture
def tiny_handler(tmp_path):
    path = tmp_path / "tiny_count.py"
    path.write_text(textwrap.dedent(TINY))
    spec = importlib.util.spec_from_file_location("tiny_count", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["tiny_count"] = module
    spec.loader.exec_module(module)
    HANDLERS.register(module.HANDLER)
    try:
        yield module.HANDLER
    finally:
        HANDLERS.unregister("tiny_count")
        sys.modules.pop("tiny_count", None)


async def test_a_new_handler_is_one_module(runtime, owner, engine, tiny_handler):  # noqa: F811
    listed = await call(owner, "get-handlers", {"step_type": "fetch"})
    assert listed["handlers"]["tiny_count"]["label"] == "Tiny counter"
    fields = await call(owner, "get-handler-config-fields", {"handler_slug": "tiny_count"})
    assert fields["fields"]["count"]["required"] is True and "max_items" in fields["fields"]

    # Saved configs are checked against its declared fields.
    bad = {"step_type": "fetch", "handler_slugs": ["tiny_count"], "handler_configs": {"tiny_count": {"cnt": 3}}}
    await fail(owner, "create-pipeline", {"pipeline_name": "T", "workflow": {"steps": [bad]}})

    fetch = {
        "step_type": "fetch",
        "handler_slugs": ["tiny_count"],
        "handler_configs": {"tiny_count": {"count": 3, "max_items": 2}},
    }
    made = await make_flow(owner, [fetch, echo_step(x=1)], name="Tiny")
    run = await call(owner, "run-flow", {"flow_id": made["flow_id"], "wait_seconds": 20})
    assert run["final"] and run["job"]["base_status"] == "completed"
    children = await call(owner, "get-jobs", {"parent_job_id": run["job_id"]})
    assert sorted(j["label"] for j in children["jobs"]) == ["Item 0", "Item 1"]
    # Its items are claimed and settled like any fetch handler's: the next run takes the one left (inline,
    # no children), the one after finds nothing new.
    again = await call(owner, "run-flow", {"flow_id": made["flow_id"], "wait_seconds": 20})
    assert again["job"]["base_status"] == "completed"
    assert (await call(owner, "get-jobs", {"parent_job_id": again["job_id"]}))["jobs"] == []
    last = await call(owner, "run-flow", {"flow_id": made["flow_id"], "wait_seconds": 20})
    assert last["job"]["base_status"] == "completed_no_items"


def test_everything_about_a_step_type_comes_from_its_declaration():
    assert list(STEP_TYPES) == ["fetch", "ai", "publish", "update", "approval", "webhook_gate", "system_task"]
    for slug, spec in STEP_TYPES.items():
        assert executor(slug) is spec.run
    # Parking step types give the wait kinds and their engine_data state keys (control keys).
    assert wait_kinds() == ("approval", "webhook_gate")
    assert {"approval", "webhook_gate"} <= control_keys()
    # Only steps that claim items make a job hold claims.
    assert claiming_step_types() == {"fetch"}


HOLD = """
import uuid

from datamachine_mcp.engine.catalog import FieldSpec, StepType
from datamachine_mcp.engine.steps import StepResult


async def run_hold(run):
    kind = (run.step.get("flow_step_settings") or {}).get("park_as") or "hold"
    ref = "hold_" + uuid.uuid4().hex
    return StepResult(status="waiting", wait={"kind": kind, "wait_ref": ref, "expires_at": None, "state": {"ref": ref}})


STEP_TYPES = (
    StepType(
        "hold",
        "Hold",
        "Park the job until it is cancelled.",
        False,
        settings_fields={"park_as": FieldSpec("string", "The wait kind it parks under (tests a wrong one)")},
        run=run_hold,
        wait_kind="hold",
    ),
)
"""


@pytest.fixture
def hold_step_type(tmp_path):
    path = tmp_path / "hold_step.py"
    path.write_text(textwrap.dedent(HOLD))
    spec = importlib.util.spec_from_file_location("hold_step", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["hold_step"] = module
    spec.loader.exec_module(module)
    (declared,) = module.STEP_TYPES
    STEP_TYPES.register(declared)
    try:
        yield declared
    finally:
        STEP_TYPES.unregister("hold")
        sys.modules.pop("hold_step", None)


async def test_a_new_parking_step_type_is_one_module_and_needs_no_schema_change(
    runtime,
    owner,
    engine,  # noqa: F811
    hold_step_type,
):
    assert "hold" in wait_kinds() and "hold" in control_keys()
    made = await make_flow(owner, [echo_step(x=1), {"step_type": "hold"}], name="Held")
    run = await call(owner, "run-flow", {"flow_id": made["flow_id"], "wait_seconds": 20})
    job = (await call(owner, "get-jobs", {"job_id": run["job_id"]}))["jobs"][0]
    assert job["status"] == "waiting", job
    assert job["wait"]["kind"] == "hold"
    assert job["engine_data"]["hold"]["ref"].startswith("hold_")  # its state lives under its wait kind
    ended = await call(owner, "cancel-job", {"job_id": run["job_id"]})
    assert ended["previous_status"] == "waiting" and ended["changed"] is True, ended


async def test_a_step_parks_only_under_the_wait_kind_its_type_declares(
    runtime,
    owner,
    engine,  # noqa: F811
    hold_step_type,
):
    made = await make_flow(owner, [{"step_type": "hold", "flow_step_settings": {"park_as": "approval"}}], name="Odd")
    run = await call(owner, "run-flow", {"flow_id": made["flow_id"], "wait_seconds": 20})
    assert run["job"]["status"] == "failed - undeclared_wait_kind", run["job"]
