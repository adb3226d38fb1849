"""What copies of pipelines and flows keep: secrets are stripped (duplicate-pipeline for callers who do not
administer the source, export-pipelines always), one-time schedules become manual, flow configs move to
the copy's step ids.
"""

from __future__ import annotations

import copy
from typing import Any

from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.flow_ops import normalize_schedule
from datamachine_mcp.abilities.pipeline_common import make_flow_step_id
from datamachine_mcp.engine import schedule as sched
from datamachine_mcp.engine.catalog import HANDLERS
from datamachine_mcp.storage.crypto import is_envelope


def secret_field_names(slug: str, config: dict[str, Any]) -> list[str]:
    """Keys of ``config`` that hold secrets: secret FieldSpecs of the handler, and any envelope."""
    handler = HANDLERS.get(slug)
    secret = {n for n, f in handler.all_fields().items() if f.secret} if handler is not None else set()
    return sorted(k for k, v in config.items() if k in secret or is_envelope(v))


def strip_secrets(slug: str, config: dict[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """``config`` without its secret fields, and the names removed."""
    data = dict(config or {})
    removed = secret_field_names(slug, data)
    return {k: v for k, v in data.items() if k not in removed}, removed


def strip_step_secrets(entry: dict[str, Any]) -> dict[str, Any]:
    """A flow step (or pipeline step) with every secret handler field removed."""
    out = dict(entry)
    if isinstance(out.get("handler_configs"), dict):
        out["handler_configs"] = {s: strip_secrets(s, c)[0] for s, c in out["handler_configs"].items()}
    if isinstance(out.get("handler_config"), dict):
        out["handler_config"] = strip_secrets(out.get("handler_slug") or "", out["handler_config"])[0]
    return out


def copied_schedule(config: dict[str, Any] | None) -> dict[str, Any]:
    """A flow schedule for a copy: client keys only; a one_time schedule becomes manual."""
    client = sched.client_keys(config)
    if client.get("interval", "manual") == "one_time" or "interval" not in client:
        return {"interval": "manual"}
    try:
        return normalize_schedule(client)
    except AbilityError:  # a stored schedule no longer valid (e.g. a removed zone): start manual
        return {"interval": "manual"}


def remap_flow_config(
    source: dict[str, Any] | None,
    step_map: dict[str, str],
    *,
    flow_id: int,
    pipeline_id: int,
    keep_secrets: bool,
) -> dict[str, Any]:
    """A flow_config copied onto new step ids (queues and settings kept; secrets only with keep_secrets)."""
    out: dict[str, Any] = {}
    for entry in (source or {}).values():
        if not isinstance(entry, dict):
            continue
        new_psid = step_map.get(entry.get("pipeline_step_id", ""))
        if new_psid is None:
            continue
        copied = copy.deepcopy(entry)
        if not keep_secrets:
            copied = strip_step_secrets(copied)
        fsid = make_flow_step_id(new_psid, flow_id)
        copied.update(flow_step_id=fsid, pipeline_step_id=new_psid, pipeline_id=pipeline_id, flow_id=flow_id)
        out[fsid] = copied
    return out
