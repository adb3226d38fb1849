"""Numbers at the edges: an id or offset beyond 64 bits, a time beyond year 9999, a missing job asked for by
id. Each gets its documented not-found or validation code, names the field and writes nothing; never
internal_error (on either backend: SQLite and PostgreSQL both hold 64-bit integers only)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import call
from tests.jobs_support import echo_step, make_flow, unchanged

pytestmark = [pytest.mark.anyio, pytest.mark.backends]

BIG = [2**63, 2**64, 2**70, -(2**63) - 1]


@pytest.mark.parametrize(
    ("tool", "args", "field"),
    [
        ("get-jobs", {"job_id": None}, "job_id"),
        ("get-jobs", {"offset": None}, "offset"),
        ("get-flows", {"flow_id": None}, "flow_id"),
        ("run-flow", {"flow_id": None}, "flow_id"),
        ("get-run-metrics", {"job_id": None}, "job_id"),
        ("export-pipelines", {"pipeline_ids": [1, None]}, "pipeline_ids"),
    ],
)
async def test_integers_beyond_64_bits_are_a_validation_error(runtime, owner, tool, args, field):
    for big in BIG:
        filled: dict[str, Any] = {
            k: [big if x is None else x for x in v] if isinstance(v, list) else big for k, v in args.items()
        }
        err = await unchanged(runtime, owner, tool, filled, "invalid_input")
        assert err["data"]["errors"][0]["field"].startswith(field)
        if big > 0:  # (a negative one already breaks the field's minimum)
            assert "9223372036854775807" in err["message"]
    # the largest 64-bit id is simply not there
    if tool in ("get-jobs", "run-flow", "get-run-metrics") and "offset" not in args:
        kind = "job" if "job_id" in args else "flow"
        await unchanged(runtime, owner, tool, {k: 2**63 - 1 for k in args}, f"{kind}_not_found")


async def test_a_missing_job_by_id_is_job_not_found(runtime, owner):
    made = await make_flow(owner, [echo_step()])
    err = await unchanged(runtime, owner, "get-jobs", {"job_id": 424242}, "job_not_found")
    assert err["data"] == {"job_id": 424242}
    listed = await call(owner, "get-jobs", {"flow_id": made["flow_id"]})  # a filter's empty page is no error
    assert listed["jobs"] == [] and listed["total"] == 0


async def test_a_start_time_beyond_year_9999_is_a_validation_error(runtime, owner):
    err = await unchanged(
        runtime,
        owner,
        "execute-workflow",
        {"workflow": {"steps": [echo_step()]}, "timestamp": 253402300800},
        "invalid_input",
    )
    assert err["data"]["errors"][0]["field"] == "timestamp"
