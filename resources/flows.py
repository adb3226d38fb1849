"""Flow resources: ``datamachine://flows/{flow_id}`` (twin: get-flows with flow_id)."""

from __future__ import annotations

from typing import Any

from datamachine_mcp.abilities.uris import FLOW
from datamachine_mcp.resources.registry import ResourceSpec, resource


def _flow_id(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"not a flow id: {raw!r}")
    return int(raw)


def _exists(output: dict[str, Any]) -> bool:
    # get-flows answers an unknown flow_id with an empty list; the resource answers "not found".
    return bool(output.get("total"))


resource(
    ResourceSpec(
        uri=FLOW,
        name="flow",
        title="Flow",
        description="One flow with its step configs, schedule, last and next run (twin: get-flows with flow_id).",
        twin="get-flows",
        params={"flow_id": _flow_id},
        exists=_exists,
    )
)
