"""import-pipelines' CSV reader: the rows of an export-pipelines CSV grouped by source pipeline, each row
checked (the format is described in ``abilities.pipeline_export``); the first bad row is the error."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any

from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.pipeline_export import HEADER
from datamachine_mcp.engine.catalog import STEP_TYPES

MAX_DATA = 5 * 1024 * 1024


def bad_row(row: int, message: str) -> AbilityError:
    where = "the header" if row == 0 else f"row {row}"
    err = AbilityError("invalid_import_data", f"Invalid import data at {where}: {message}", row=row)
    err.data["message"] = message  # data {row, message}; "message" is also the positional
    return err


@dataclass
class StepRow:
    row: int
    position: int
    step_type: str
    config: dict[str, Any]


@dataclass
class FlowRow:
    row: int
    position: int | None
    settings: dict[str, Any]


@dataclass
class SourceFlow:
    key: str
    name: str
    rows: list[FlowRow] = field(default_factory=list)


@dataclass
class Group:
    name: str
    first_row: int
    steps: dict[int, StepRow] = field(default_factory=dict)
    flows: dict[str, SourceFlow] = field(default_factory=dict)


def _json_object(text: str, row: int, column: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise bad_row(row, f"{column} is not valid JSON ({err.msg})") from None
    if not isinstance(value, dict):
        raise bad_row(row, f"{column} must be a JSON object")
    return value


def parse_csv(data: str) -> list[Group]:
    """Rows grouped by source pipeline; raises invalid_import_data naming the first bad row."""
    if not data.strip():
        raise bad_row(0, "data is required")
    csv.field_size_limit(max(csv.field_size_limit(), MAX_DATA))  # a long prompt queue is one field
    reader = csv.reader(io.StringIO(data.lstrip("\ufeff"), newline=""), strict=True)
    groups: dict[tuple[str, str], Group] = {}
    row_no = 0
    try:
        header = next(reader, None)
        if header != HEADER:
            raise bad_row(0, "CSV header does not match the Data Machine pipeline format")
        for record in reader:
            row_no += 1
            if not record or all(not c.strip() for c in record):
                continue
            if len(record) != len(HEADER):
                raise bad_row(row_no, f"expected {len(HEADER)} columns, found {len(record)}")
            source_pid, name, position, step_type, step_config, flow_id, flow_name, settings = record
            name = name.strip()
            if not name:
                raise bad_row(row_no, "pipeline_name is empty")
            key = (source_pid.strip(), name)
            group = groups.setdefault(key, Group(name=name, first_row=row_no))
            pos: int | None = None
            if position.strip():
                if not position.strip().isdigit():
                    raise bad_row(row_no, f"step_position '{position}' is not a non-negative integer")
                pos = int(position.strip())
            step_type, flow_id = step_type.strip(), flow_id.strip()
            if step_type and flow_id:
                raise bad_row(row_no, "a row is either a structure row (step_type) or a flow row (flow_id), not both")
            if step_type:
                if pos is None:
                    raise bad_row(row_no, "a structure row needs step_position")
                if step_type not in STEP_TYPES:
                    raise bad_row(row_no, f"unknown step_type '{step_type}' (registered: {', '.join(STEP_TYPES)})")
                if pos in group.steps:
                    raise bad_row(row_no, f"step_position {pos} appears twice in pipeline '{name}'")
                group.steps[pos] = StepRow(row_no, pos, step_type, _json_object(step_config, row_no, "step_config"))
            elif flow_id:
                if step_config.strip():
                    raise bad_row(row_no, "a flow row has an empty step_config")
                flow = group.flows.setdefault(flow_id, SourceFlow(key=flow_id, name=flow_name.strip() or "Flow"))
                flow.rows.append(FlowRow(row_no, pos, _json_object(settings, row_no, "settings")))
            elif pos is not None or step_config.strip() or settings.strip():
                raise bad_row(row_no, "a structure row needs step_type; a flow row needs flow_id")
    except csv.Error as err:
        raise bad_row(row_no + 1 if row_no else 0, f"malformed CSV ({err})") from None
    for group in groups.values():
        for flow in group.flows.values():
            for frow in flow.rows:
                if frow.position is not None and frow.position not in group.steps:
                    raise bad_row(
                        frow.row, f"flow row for step_position {frow.position} has no structure row before it"
                    )
                if frow.position is None and frow.settings:
                    raise bad_row(frow.row, "a flow row with settings needs step_position")
    return list(groups.values())
