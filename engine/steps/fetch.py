"""The fetch step (docs/engine.md, Dedup and claims): fetch, filter, classify against the dedup ledger.

The step itself only reads; the eligible items go to the commit as ``candidates``, which claims the
first ``max_items`` of them (backfilling from the rest when another job wins an item).
"""

from __future__ import annotations

from typing import Any

from datamachine_mcp.engine import dedup
from datamachine_mcp.engine.catalog import HANDLERS, StepType
from datamachine_mcp.engine.claims import Candidate
from datamachine_mcp.engine.configs import open_secrets
from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.handlers import run_fetch
from datamachine_mcp.engine.handlers.base import HandlerContext, with_defaults
from datamachine_mcp.engine.http import Outbound
from datamachine_mcp.engine.items import Item, item_to_packet
from datamachine_mcp.engine.steps import StepResult, StepRun
from datamachine_mcp.engine.steps.queues import take
from datamachine_mcp.storage.crypto import SecretUnavailable


def deep_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


async def classify(
    run: StepRun, source_type: str, items: list[Item], filtered: list[str] | None = None
) -> tuple[list[Candidate], dict[str, int]]:
    """Order-preserving classification: processed, actively claimed elsewhere, duplicate, eligible.

    Every ledger row of an item the source still offers (``filtered``: the identifiers the filters
    dropped) gets its ``last_seen_at`` refreshed (a real run only, at most daily per item), so
    retention never forgets an item that is still listed (docs/engine.md, Retention).
    """
    stages = {"processed_skipped": 0, "actively_claimed": 0, "duplicates": 0, "identifierless_items": 0}
    idents = [i.identifier for i in items if i.identifier]
    found = dedup.Ledger()
    if run.dedupes and (idents or filtered):
        now = run.now()
        async with run.services.db.read() as session:
            found = await dedup.ledger(
                session, run.flow_step_id, source_type, idents, job_id=run.job.job_id, now=now, also_seen=filtered or ()
            )
        if found.seen_stale and not run.dry_run:
            async with run.services.db.write() as session:
                await dedup.touch_seen(session, found.seen_stale, now)
    processed, claimed = found.processed, found.claimed_elsewhere
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
    return item_to_packet(
        item,
        handler=slug,
        source_type=source_type,
        flow_step_id=run.flow_step_id,
        pipeline_id=(run.engine_data.get("pipeline") or {}).get("pipeline_id"),
        flow_id=(run.engine_data.get("flow") or {}).get("flow_id"),
        timestamp=run.now(),
    )


async def run(run: StepRun) -> StepResult:
    slug = run.step["handler_slugs"][0]
    config = dict((run.step.get("handler_configs") or {}).get(slug) or {})
    patch, empty = await take(run, "config_patch_queue")
    if empty:
        return StepResult(status="completed_no_items", reason="empty_drain_queue", handlers=[slug])
    if patch and isinstance(patch.get("patch"), dict):
        config = deep_merge(config, patch["patch"])
    # Run-time checks (paths, URLs, secrets) raise the handler codes (path_not_allowed, secret_unavailable, …).
    config = open_config(slug, config, run.services.box)
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
        items = await run_fetch(slug, config, ctx, now=run.now())
    source_type = str(items.source_type or slug)
    eligible, stages = await classify(run, source_type, list(items), items.filtered_identifiers)
    max_items = int(with_defaults(slug, "fetch", config).get("max_items", 1) or 0)
    fetch_stages: dict[str, Any] = {
        "source_items": items.source_count,
        "identifierless_items": stages["identifierless_items"],
        "filtered_out": items.filtered_out,
        "processed_skipped": stages["processed_skipped"],
        "actively_claimed": stages["actively_claimed"],
        "duplicates": stages["duplicates"],
        "eligible": len(eligible),
        "selected_after_max_items": min(len(eligible), max_items) if max_items else len(eligible),
        "claim_conflicts": 0,
        "final_packets": 0,
        "max_items": max_items,
    }
    if items.skipped:
        fetch_stages["skipped"] = dict(items.skipped)
    return StepResult(
        status="succeeded",
        candidates=eligible,
        max_items=max_items,
        source_type=source_type,
        fetch_stages=fetch_stages,
        handlers=[slug],
        make_packet=lambda c: packet_for(run, slug, source_type, c.payload),
    )


def open_config(slug: str, config: dict[str, Any], box: Any) -> dict[str, Any]:
    """Decrypt secret fields (secret_unavailable when the key cannot)."""
    try:
        return open_secrets(HANDLERS[slug], config, box)
    except SecretUnavailable as err:
        raise StepError(
            "secret_unavailable", f"A secret of handler '{slug}' cannot be decrypted: {err}", retryable=False
        ) from None


STEP_TYPES = StepType(
    "fetch",
    "Fetch",
    "Fetch new items from a source with one handler.",
    True,
    queue_slot="config_patch_queue",
    run=run,
    claims_items=True,
    position=10,
)
