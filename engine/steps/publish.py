"""Publish and update steps: handlers in order on the newest packet, each at most once."""

from __future__ import annotations

from typing import Any

from datamachine_mcp.engine.catalog import StepType
from datamachine_mcp.engine.handlers import run_publish
from datamachine_mcp.engine.handlers.base import HandlerContext, prepare_config, result_entry
from datamachine_mcp.engine.http import Outbound
from datamachine_mcp.engine.steps import StepResult, StepRun, failure
from datamachine_mcp.storage.timeutil import iso

IDENTITY_KEYS = ("source_type", "handler", "flow_step_id", "pipeline_id", "flow_id", "item_identifier", "source_url")


async def record_progress(run: StepRun, slug: str, result: dict[str, Any]) -> None:
    """Remember that ``slug`` succeeded, so a re-run of the step skips it (lease-checked)."""
    data = dict(run.job.engine_data or {})
    progress = {k: dict(v) for k, v in (data.get("publish_progress") or {}).items()}
    progress.setdefault(run.flow_step_id, {})[slug] = {"status": "done", "result": result, "at": iso(run.now())}
    data["publish_progress"] = progress
    await run.save_engine_data(data)


async def run(run: StepRun) -> StepResult:
    step_type = run.step_type
    packets = run.job.packets or []
    if not packets:
        return failure("empty_data_packet_returned", f"The {step_type} step received no input packet.", retryable=False)
    packet = packets[0]
    slugs: list[str] = list(run.step.get("handler_slugs") or [])
    done = (run.engine_data.get("publish_progress") or {}).get(run.flow_step_id) or {}
    results: list[dict[str, Any]] = []
    engine_updates: dict[str, Any] = {}
    for slug in slugs:
        if slug in done:
            previous = done[slug].get("result") or {}
            results.append(previous.get("summary") or {"handler": slug, "status": "done"})
            engine_updates.update(previous.get("engine_updates") or {})
            continue
        # Run-time checks (paths, URLs, secrets) raise the handler codes (path_not_allowed, secret_unavailable, …).
        config = prepare_config(
            slug, step_type, (run.step.get("handler_configs") or {}).get(slug) or {}, run.services.box
        )
        view = {**run.engine_data, **engine_updates}
        async with Outbound(run.settings, version=run.services.version) as outbound:
            ctx = HandlerContext(
                job_id=run.job.job_id,
                flow_id=run.job.flow_key,
                pipeline_id=run.job.pipeline_key,
                flow_step_id=run.flow_step_id,
                step_type=step_type,
                dry_run=run.dry_run,
                engine_data=view,
                outbound=outbound,
                files_roots=run.settings.files_roots(),
                settings=run.settings,
                version=run.services.version,
            )
            outcome = await run_publish(slug, config, packet, ctx)
        summary = result_entry(slug, outcome)
        results.append(summary)
        updates = dict(outcome.get("engine_updates") or {})
        engine_updates.update(updates)
        if not run.dry_run:
            await record_progress(run, slug, {"summary": summary, "engine_updates": updates})
    in_meta = packet.get("metadata") or {}
    meta = {k: in_meta[k] for k in IDENTITY_KEYS if k in in_meta}
    out = {
        "type": "publish_result" if step_type == "publish" else "update_result",
        "timestamp": iso(run.now()),
        "data": {"title": (packet.get("data") or {}).get("title") or "", "results": results},
        "metadata": meta,
    }
    preview = [r.get("preview") for r in results if r.get("preview") is not None] if run.dry_run else None
    return StepResult(
        status="succeeded", packets=[out], engine_updates=engine_updates, handlers=slugs, preview=preview or None
    )


STEP_TYPES = (
    StepType(
        "publish",
        "Publish",
        "Publish the item with one or more handlers.",
        True,
        multi_handler=True,
        run=run,
        position=30,
    ),
    StepType(
        "update",
        "Update",
        "Update a previously published target with one or more handlers.",
        True,
        multi_handler=True,
        run=run,
        position=40,
    ),
)
