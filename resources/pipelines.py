"""Pipeline resources (twin: get-pipelines)."""

from __future__ import annotations

from typing import Any

from datamachine_mcp.abilities.uris import PIPELINE
from datamachine_mcp.resources.registry import ResourceSpec, resource


def _pipeline_id(raw: str) -> int:
    """A URI's pipeline id; anything but a positive integer names no pipeline (resource-not-found)."""
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(raw)
    return int(raw)


def _exists(output: dict[str, Any]) -> bool:
    return bool(output.get("pipelines"))


resource(
    ResourceSpec(
        uri="datamachine://pipelines",
        name="pipelines",
        title="Pipelines",
        description="Pipelines you can read with their steps and flows, first page (twin: get-pipelines).",
        twin="get-pipelines",
    )
)
resource(
    ResourceSpec(
        uri=PIPELINE,
        name="pipeline",
        title="Pipeline",
        description="One pipeline with its steps and flows (twin: get-pipelines with pipeline_id).",
        twin="get-pipelines",
        params={"pipeline_id": _pipeline_id},
        exists=_exists,
    )
)
