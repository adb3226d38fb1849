"""Handler code by slug; the catalogue of what they accept is ``engine.catalog``.

See ``engine/handlers/base.py`` for the interface the job runner uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.handlers.base import (
    FETCHERS,
    PUBLISHERS,
    FetchHandler,
    HandlerContext,
    PublishHandler,
    PublishResult,
    prepare_config,
    result_entry,
    with_defaults,
)
from datamachine_mcp.engine.items import ItemList, apply_filters, normalise_identifier

__all__ = [
    "FETCHERS",
    "PUBLISHERS",
    "FetchHandler",
    "HandlerContext",
    "PublishHandler",
    "PublishResult",
    "prepare_config",
    "result_entry",
    "run_fetch",
    "run_publish",
    "source_type_for",
    "with_defaults",
]


def source_type_for(slug: str, config: Mapping[str, Any]) -> str:
    """The dedup ``source_type`` of a fetch: the slug, or ``webhook_payload``'s ``source_type`` field."""
    if slug == "webhook_payload":
        return str(config.get("source_type") or "webhook_payload")
    return slug


async def run_fetch(
    slug: str, config: Mapping[str, Any], ctx: HandlerContext, *, now: datetime | None = None
) -> ItemList:
    """Defaults + handler + identifier normalisation + common filters (docs/engine.md, Dedup and claims, steps 1-2).

    The result keeps source order; ``source_count`` is what the source gave, ``filtered_out``
    what the filters dropped, ``skipped`` the handler's counters, ``source_type`` the dedup type.
    """
    handler = FETCHERS.get(slug)
    if handler is None:
        raise StepError("handler_not_found", f"No fetch handler '{slug}'")
    cfg = with_defaults(slug, "fetch", config)
    raw = await handler.fetch(cfg, ctx)
    for item in raw:
        item.identifier = normalise_identifier(item.identifier)
    kept = apply_filters(raw, cfg, now)
    out = ItemList(kept, skipped=getattr(raw, "skipped", None))
    out.source_count = len(raw)
    out.filtered_out = len(raw) - len(kept)
    if out.filtered_out:
        taken = {id(item) for item in kept}
        out.filtered_identifiers = [i.identifier for i in raw if i.identifier and id(i) not in taken]
    out.source_type = source_type_for(slug, cfg)
    return out


async def run_publish(
    slug: str, config: Mapping[str, Any], packet: dict[str, Any], ctx: HandlerContext
) -> PublishResult:
    """``publish`` or ``update`` of handler ``slug`` depending on ``ctx.step_type``."""
    handler = PUBLISHERS.get(slug)
    if handler is None:
        raise StepError("handler_not_found", f"No publish/update handler '{slug}'")
    if ctx.step_type == "update":
        return await handler.update(dict(config), packet, ctx)
    return await handler.publish(dict(config), packet, ctx)
