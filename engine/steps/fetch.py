"""The fetch step (engine.md §10.1, §15.2): fetch, filter, classify against the dedup ledger.

The step itself only reads; the eligible items go to the commit as ``candidates``, which claims the
first ``max_items`` of them (backfilling from the rest when another job wins an item).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from engine import claims as claim_ops
from engine.catalog import HANDLERS
from engine.claims import Candidate
from engine.configs import ConfigError, open_secrets, validate_handler_config
from engine.handlers import FETCHERS
from engine.handlers.base import HandlerContext, with_defaults
from engine.http import Outbound
from engine.items import Item, apply_filters, normalize_identifier
from engine.steps import StepResult, StepRun, failure
from engine.steps.queues import take
from storage.crypto import SecretUnavailable
from storage.models import ProcessedItem
from storage.timeutil import iso

CHUNK = 500


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


async def classify(run: StepRun, source_type: str, items: list[Item]) -> tuple[list[Candidate], dict[str, int]]:
    """Order-preserving classification: processed, actively claimed elsewhere, duplicate, eligible."""
    stages = {"processed_skipped": 0, "actively_claimed": 0, "duplicates": 0, "identifierless_items": 0}
    idents = [i.identifier for i in items if i.identifier]
    processed: set[str] = set()
    claimed: set[str] = set()
    if run.dedupes and idents:
        now = run.now()
        async with run.services.db.read() as session:
            for start in range(0, len(idents), CHUNK):
                chunk = idents[start : start + CHUNK]
                base = select(ProcessedItem.item_identifier).where(
                    ProcessedItem.flow_step_id == run.flow_step_id,
                    ProcessedItem.source_type == source_type,
                    ProcessedItem.item_identifier.in_(chunk),
                )
                processed.update(
                    r[0] for r in (await session.execute(base.where(ProcessedItem.status == "processed"))).all()
                )
                active = claim_ops.active_claim_condition(now, other_than_job=run.job.job_id)
                claimed.update(r[0] for r in (await session.execute(base.where(active))).all())
    seen: set[str] = set()
    eligible: list[Candidate] = []
    for item in items:
        ident = item.identifier
        if not ident:
            stages["identifierless_items"] += 1
            eligible.append(Candidate(None, item))
            continue
        if ident in processed:
            stages["processed_skipped"] += 1
        elif ident in claimed:
            stages["actively_claimed"] += 1
        elif ident in seen:
            stages["duplicates"] += 1
        else:
            seen.add(ident)
            eligible.append(Candidate(ident, item))
    return eligible, stages


def packet_for(run: StepRun, slug: str, source_type: str, item: Item) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "source_type": source_type,
        "handler": slug,
        "flow_step_id": run.flow_step_id,
        "pipeline_id": run.engine_data.get("pipeline", {}).get("pipeline_id"),
        "flow_id": run.engine_data.get("flow", {}).get("flow_id"),
    }
    if item.identifier:
        meta["item_identifier"] = item.identifier
    if item.source_url:
        meta["source_url"] = item.source_url
    if item.published_at is not None:
        meta["published_at"] = iso(item.published_at)
    if item.author:
        meta["author"] = item.author
    meta.update(item.metadata or {})
    data: dict[str, Any] = {
        "title": item.title or "",
        "body": item.body or "",
        "content_string": item.content_string or "",
    }
    if item.file_info is not None:
        data["file_info"] = item.file_info
    return {"type": "fetch", "timestamp": iso(run.now()), "data": data, "metadata": meta}


async def run(run: StepRun) -> StepResult:
    slug = run.step["handler_slugs"][0]
    handler = HANDLERS[slug]
    fetcher = FETCHERS.get(slug)
    if fetcher is None:
        return failure("handler_not_found", f"No fetch implementation for handler '{slug}'.", retryable=False)
    config = dict((run.step.get("handler_configs") or {}).get(slug) or {})
    patch, empty = await take(run, "config_patch_queue")
    if empty:
        return StepResult(status="completed_no_items", reason="empty_drain_queue", handlers=[slug])
    if patch and isinstance(patch.get("patch"), dict):
        config = deep_merge(config, patch["patch"])
    try:
        validate_handler_config(handler, "fetch", config, files_roots=run.settings.files_roots())
        config = open_secrets(handler, config, run.services.box)
    except ConfigError as err:
        return failure("handler_config_invalid", err.message, retryable=False, diagnostics=err.data)
    except SecretUnavailable as err:
        return failure("secret_unavailable", str(err), retryable=False)
    config = with_defaults(handler, "fetch", config)
    source_type = str(config.get("source_type") or slug) if slug == "webhook_payload" else slug
    async with Outbound(run.settings, version=run.services.version) as outbound:
        ctx = HandlerContext(
            job_id=run.job.job_id,
            flow_id=run.job.flow_key,
            pipeline_id=run.job.pipeline_key,
            flow_step_id=run.flow_step_id,
            step_type="fetch",
            dry_run=run.dry_run,
            engine_data=run.engine_data,
            outbound=outbound,
            files_roots=run.settings.files_roots(),
            settings=run.settings,
            version=run.services.version,
        )
        fetched = await fetcher.fetch(config, ctx)
    source_count = len(fetched)
    items = apply_filters(fetched, config, now=run.now())
    for item in items:
        if item.identifier:
            item.identifier = normalize_identifier(item.identifier)
    eligible, stages = await classify(run, source_type, items)
    max_items = int(config.get("max_items", 1) or 0)
    fetch_stages = {
        "source_items": source_count,
        "identifierless_items": stages["identifierless_items"],
        "filtered_out": source_count - len(items),
        "processed_skipped": stages["processed_skipped"],
        "actively_claimed": stages["actively_claimed"],
        "duplicates": stages["duplicates"],
        "eligible": len(eligible),
        "selected_after_max_items": min(len(eligible), max_items) if max_items else len(eligible),
        "claim_conflicts": 0,
        "final_packets": 0,
        "max_items": max_items,
    }
    return StepResult(
        status="succeeded",
        candidates=eligible,
        max_items=max_items,
        source_type=source_type,
        fetch_stages=fetch_stages,
        handlers=[slug],
        make_packet=lambda c: packet_for(run, slug, source_type, c.payload),
    )
