"""test-handler: dry-run a fetch handler and preview what it would fetch.

The handler runs exactly as a fetch step would (engine.handlers.run_fetch: defaults, the handler,
identifier normalisation, the common filters; engine.http.Outbound: SSRF rules and size caps), but
outside any job: no job is created and processed items are neither read nor written, so the preview
lists every item the source offers up to ``max_items``. Nothing is held open while the source is
fetched: the flow and settings are read in a short read transaction first.

Choices made here:

* With ``flow_id`` the flow's first fetch step (by execution_order) is used: its handler and its
  config (the flow step's ``handler_configs``, falling back to the pipeline step's, secrets
  decrypted). ``config`` overrides it key by key (``null`` removes a key, ``"********"`` keeps a
  stored secret). A ``handler_slug`` that is not the flow's fetch handler → ``handler_flow_invalid``.
* ``max_items`` applies as in a run (default 1, 0 = all); raw mode caps it at ``limit``.
  ``packet_count`` counts the items a run would take (after filters, within-fetch duplicates
  dropped and ``max_items``); ``limit`` then caps the packets returned.
* ``byte_limit`` (raw mode) caps the serialised size of the returned packets (a JSON array): packets
  are returned in order while they fit; one that does not fit ends the list (even the first).
* ``config_used`` is the effective config (defaults applied, unset fields left out, secret fields
  as ``"********"``).
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import Field

from datamachine_mcp.abilities.access import ROLE_RANK
from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError, AccessDenied
from datamachine_mcp.abilities.pipeline_common import ordered_steps, owner_of
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Opt, Output
from datamachine_mcp.engine.catalog import HANDLERS, HandlerSpec, handlers_for
from datamachine_mcp.engine.configs import merge, open_secrets, validate_handler_config
from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.handlers import HandlerContext, run_fetch, with_defaults
from datamachine_mcp.engine.http import Outbound
from datamachine_mcp.engine.items import item_to_packet, packet_size
from datamachine_mcp.engine.plan import step_config
from datamachine_mcp.storage.crypto import MASK, SecretUnavailable
from datamachine_mcp.storage.models import Flow, Pipeline

PREVIEW_CHARS = 200
DEFAULT_BYTE_LIMIT = 1024 * 1024


class HandlerTestIn(Input):
    handler_slug: str | None = Field(None, max_length=100, description="Fetch handler (or flow_id)")
    config: dict[str, Any] = Field(default_factory=dict, description="Config")
    flow_id: int | None = Field(None, ge=1, description="Use this flow's fetch step")
    limit: int = Field(5, ge=0, le=100, description="Packets (0 = all)")
    output_mode: Literal["compact", "raw"] = Field("compact", description="raw: full packets")
    byte_limit: int = Field(DEFAULT_BYTE_LIMIT, ge=4096, le=5 * 1024 * 1024, description="raw: byte cap")


class Truncation(Output):
    truncated: bool = Field(description="Some packets were left out")
    reasons: list[Literal["packet_limit", "byte_limit"]] = Field(description="Why packets were left out")
    returned_packet_count: int = Field(description="Packets returned")
    omitted_packet_count: int = Field(description="Packets left out")
    returned_bytes: int = Field(description="Serialised size of the returned packets")


class HandlerTestOut(Output):
    handler_slug: str = Field(description="Handler that ran")
    handler_label: str = Field(description="Its display label")
    config_used: dict[str, Any] = Field(description="Effective config (defaults applied, secrets masked)")
    packet_count: int = Field(description="Items a run would take (after filters and max_items)")
    warnings: list[str] = Field(description='Notes such as "Showing 5 of 12 packets."')
    execution_time_ms: int = Field(description="Time spent fetching, in milliseconds")
    output_mode: Literal["compact", "raw"] = Field(description="compact or raw")
    packets: list[dict[str, Any]] = Field(
        description="compact: {title, content_preview, metadata, source_url}; raw: full packets"
    )
    truncation: Truncation | None = Opt("raw mode: what was left out and why")


# --- resolving the handler and config -------------------------------------------------------------


def _handler(slug: str) -> HandlerSpec:
    spec = HANDLERS.get(slug)
    if spec is None:
        raise AbilityError(
            "handler_not_found",
            f"Handler '{slug}' not found. Fetch handlers: {', '.join(h.slug for h in handlers_for('fetch'))}.",
            handler_slug=slug,
        )
    if "fetch" not in spec.step_types:
        raise AbilityError(
            "invalid_handler",
            f"test-handler supports fetch handlers only; '{slug}' serves {', '.join(spec.step_types)} steps.",
            handler_slug=slug,
        )
    return spec


async def _require_some_operator(ctx: AbilityContext) -> None:
    """Without a flow: operator on at least one agent, or a global administrator."""
    p = ctx.principal
    ctx.access.check_scope("operator")
    if p.is_admin:
        return
    roles = await ctx.access.agent_roles()
    # An agent-bound principal counts only its own agent.
    held = list(roles.values()) if p.agent_id is None else [r for a, r in roles.items() if a == p.agent_id]
    if any(ROLE_RANK[r] >= ROLE_RANK["operator"] for r in held):
        return
    raise AccessDenied(
        "permission_denied",
        "test-handler without flow_id needs the operator role on at least one agent (or a global "
        "administrator); pass the flow_id of a flow you operate instead.",
        required_role="operator",
        effective_role=None,
    )


async def _from_flow(ctx: AbilityContext, flow_id: int) -> tuple[str, dict[str, Any], Flow, str]:
    """(slug, stored config, flow, flow_step_id) of the flow's first fetch step."""
    flow = await ctx.session.get(Flow, flow_id)
    if flow is None:
        raise AbilityError(
            "handler_flow_invalid", f"Flow {flow_id} not found; test-handler needs an existing flow.", flow_id=flow_id
        )
    await ctx.access.authorize(
        await owner_of(ctx, flow.agent_id, flow.user_id),
        "operator",
        mutating=False,
        target={"type": "flow", "id": flow_id},
    )
    pipeline = await ctx.session.get(Pipeline, flow.pipeline_id)
    snapshot = {
        "flow_config": flow.flow_config or {},
        "pipeline_config": (pipeline.pipeline_config if pipeline else {}),
    }
    for entry in ordered_steps(flow.flow_config):
        if entry.get("step_type") != "fetch":
            continue
        fsid = str(entry.get("flow_step_id") or "")
        step = step_config(snapshot, fsid) or entry
        slugs = step.get("handler_slugs") or []
        if not slugs:
            break
        slug = str(slugs[0])
        return slug, dict((step.get("handler_configs") or {}).get(slug) or {}), flow, fsid
    raise AbilityError(
        "handler_flow_invalid",
        f"Flow {flow_id} has no fetch step with a handler; give handler_slug and config instead.",
        flow_id=flow_id,
    )


def _masked(spec: HandlerSpec, config: dict[str, Any]) -> dict[str, Any]:
    fields = spec.fields_for("fetch")
    out = {}
    for name, value in config.items():
        if value is None:
            continue
        field = fields.get(name)
        out[name] = MASK if field is not None and field.secret else value
    return out


# --- output shaping -------------------------------------------------------------------------------


def _compact(packet: dict[str, Any]) -> dict[str, Any]:
    data = packet.get("data") or {}
    meta = {k: v for k, v in (packet.get("metadata") or {}).items() if not k.startswith("_")}
    text = str(data.get("content_string") or data.get("body") or "")
    preview = text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + "..."
    return {
        "title": str(data.get("title") or ""),
        "content_preview": preview,
        "metadata": meta,
        "source_url": meta.get("source_url"),
    }


def _raw(packets: list[dict[str, Any]], limit: int, byte_limit: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    chosen = packets[:limit] if limit else list(packets)
    reasons: list[str] = ["packet_limit"] if len(chosen) < len(packets) else []
    out: list[dict[str, Any]] = []
    used = 2  # the enclosing brackets
    for packet in chosen:
        size = packet_size(packet) + (1 if out else 0)
        if used + size > byte_limit:
            reasons.append("byte_limit")
            break
        out.append(packet)
        used += size
    truncation = {
        "truncated": len(out) < len(packets),
        "reasons": reasons,
        "returned_packet_count": len(out),
        "omitted_packet_count": len(packets) - len(out),
        "returned_bytes": len(json.dumps(out, separators=(",", ":"), ensure_ascii=False).encode("utf-8")),
    }
    return out, truncation


# --- the tool -------------------------------------------------------------------------------------


@ability(
    "test-handler",
    toolset="pipelines",
    level="operator",
    read_only=True,
    idempotent=True,
    open_world=True,
    transaction="manual",
    description=("Preview what a fetch handler (or a flow's fetch step) would fetch. Writes nothing."),
)
async def dry_run_handler(ctx: AbilityContext, inp: HandlerTestIn) -> HandlerTestOut:
    given_slug = inp.handler_slug.strip() if inp.handler_slug is not None else None
    if inp.flow_id is None and not given_slug:
        raise AbilityError(
            "handler_slug_required", "handler_slug is required (or pass flow_id to use a flow's fetch step)."
        )
    flow_id = pipeline_id = None
    flow_step_id: str | None = None
    async with ctx.reading():
        if inp.flow_id is not None:
            slug, stored, flow, flow_step_id = await _from_flow(ctx, inp.flow_id)
            if given_slug and given_slug != slug:
                raise AbilityError(
                    "handler_flow_invalid",
                    f"Flow {inp.flow_id}'s fetch step uses handler '{slug}', not '{given_slug}'; omit handler_slug.",
                    flow_id=inp.flow_id,
                    handler_slug=slug,
                )
            flow_id, pipeline_id = flow.flow_id, flow.pipeline_id
        else:
            await _require_some_operator(ctx)
            slug, stored = str(given_slug), {}
        spec = _handler(slug)
        snap = await ctx.settings()
    config = merge(stored, inp.config)
    try:
        validate_handler_config(spec, "fetch", config, files_roots=snap.files_roots())
        config = open_secrets(spec, config, ctx.runtime.box)
    except SecretUnavailable as err:
        raise AbilityError(
            "secret_unavailable", f"A stored secret of handler '{slug}' cannot be decrypted: {err}", handler_slug=slug
        ) from None
    effective = with_defaults(spec, "fetch", config)
    max_items = int(effective.get("max_items") or 0)
    if inp.output_mode == "raw" and inp.limit and (max_items == 0 or max_items > inp.limit):
        max_items = inp.limit
        effective["max_items"] = max_items
    started = time.monotonic()
    try:
        async with Outbound(snap, version=ctx.runtime.version) as outbound:
            handler_ctx = HandlerContext(
                job_id=None,
                flow_id=flow_id,
                pipeline_id=pipeline_id,
                flow_step_id=flow_step_id,
                step_type="fetch",
                dry_run=True,
                engine_data={},
                outbound=outbound,
                files_roots=snap.files_roots(),
                settings=snap,
                version=ctx.runtime.version,
            )
            items = await run_fetch(slug, effective, handler_ctx)
    except StepError as err:
        elapsed = int((time.monotonic() - started) * 1000)
        failure = AbilityError(err.code, err.message)
        failure.data = {"message": err.message, "execution_time_ms": elapsed}
        raise failure from None
    elapsed = int((time.monotonic() - started) * 1000)
    warnings = items.warnings()
    if items.filtered_out:
        warnings.append(f"{items.filtered_out} item(s) removed by timeframe_limit/search/exclude_keywords.")
    seen: set[str] = set()
    unique = []
    for item in items:
        if item.identifier is not None:
            if item.identifier in seen:
                continue
            seen.add(item.identifier)
        unique.append(item)
    if len(unique) < len(items):
        warnings.append(f"{len(items) - len(unique)} duplicate item(s) dropped.")
    if max_items and len(unique) > max_items:
        warnings.append(f"max_items {max_items}: a run would take {max_items} of {len(unique)} available items.")
        unique = unique[:max_items]
    source_type = items.source_type or slug
    packets = [
        item_to_packet(
            item,
            handler=slug,
            source_type=source_type,
            flow_step_id=flow_step_id,
            pipeline_id=pipeline_id,
            flow_id=flow_id,
        )
        for item in unique
    ]
    out: dict[str, Any] = {
        "handler_slug": slug,
        "handler_label": spec.label,
        "config_used": _masked(spec, effective),
        "packet_count": len(packets),
        "execution_time_ms": elapsed,
        "output_mode": inp.output_mode,
    }
    if inp.output_mode == "raw":
        returned, truncation = _raw(packets, inp.limit, inp.byte_limit)
        out["packets"] = returned
        out["truncation"] = truncation
    else:
        returned = packets[: inp.limit] if inp.limit else packets
        out["packets"] = [_compact(p) for p in returned]
    if len(out["packets"]) < len(packets):
        warnings.append(f"Showing {len(out['packets'])} of {len(packets)} packets.")
    out["warnings"] = warnings
    return HandlerTestOut.model_validate(out)
