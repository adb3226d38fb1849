"""``webhook_payload`` fetch handler: items from the inbound webhook that started the job.

Paths (``title_path``, ``body_path``, ``identifier_path``, template placeholders, ``metadata``
values) are dotted paths inside each item — the whole payload when ``items_path`` is absent, an
element of the selected array otherwise; a placeholder missing from the element is looked up in
the whole payload (e.g. ``"{repository.id}-{id}"``). With ``ignore_missing_paths`` an item with a
missing path is dropped (counted in ``skipped["missing_path"]``) instead of failing the step.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from datamachine_mcp.engine.catalog import FETCH, FieldSpec, HandlerSpec
from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.handlers.base import HandlerContext, with_defaults
from datamachine_mcp.engine.items import (
    MISSING,
    Item,
    ItemList,
    canonical_json,
    get_path,
    html_to_text,
    normalise_identifier,
    render,
    sha256_hex,
)

_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


class _Missing(Exception):
    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path


def _value(item: Any, path: str) -> Any:
    value = get_path(item, path)
    if value is MISSING:
        raise _Missing(path)
    return value


def _template(template: str, item: Any, payload: Any) -> str:
    def substitute(match: re.Match[str]) -> str:
        path = match.group(1).strip()
        value = get_path(item, path)
        if value is MISSING and item is not payload:
            value = get_path(payload, path)
        if value is MISSING:
            raise _Missing(path)
        return render(value)

    return _PLACEHOLDER.sub(substitute, template)


def build_item(item: Any, payload: Any, cfg: Mapping[str, Any]) -> Item:
    title = render(_value(item, cfg["title_path"])) if cfg.get("title_path") else ""
    body = render(_value(item, cfg["body_path"])) if cfg.get("body_path") else ""
    if cfg.get("item_identifier_template"):
        identifier = _template(cfg["item_identifier_template"], item, payload)
    elif cfg.get("identifier_path"):
        identifier = render(_value(item, cfg["identifier_path"]))
    else:
        identifier = ""
    if not identifier:
        identifier = "sha256:" + sha256_hex(canonical_json(item))
    metadata = {str(name): _value(item, str(path)) for name, path in (cfg.get("metadata") or {}).items()}
    return Item(
        identifier=normalise_identifier(identifier),
        title=title,
        body=body,
        content_string=html_to_text(body),
        metadata=metadata,
    )


def payload_items(payload: Any, cfg: Mapping[str, Any]) -> ItemList:
    ignore = bool(cfg.get("ignore_missing_paths"))
    out = ItemList()
    items_path = cfg.get("items_path")
    if items_path:
        selected = get_path(payload, items_path)
        if selected is MISSING or not isinstance(selected, list):
            if ignore:
                out.skip("missing_path")
                return out
            what = "is missing" if selected is MISSING else f"is a {type(selected).__name__}, not an array"
            raise StepError(
                "payload_path_missing",
                f"items_path '{items_path}' {what} in the webhook payload",
                retryable=False,
                diagnostics={"path": items_path},
            )
        elements = selected
    else:
        elements = [payload]
    for element in elements:
        try:
            out.append(build_item(element, payload, cfg))
        except _Missing as missing:
            if ignore:
                out.skip("missing_path")
                continue
            raise StepError(
                "payload_path_missing",
                f"Path '{missing.path}' is missing in the webhook payload",
                retryable=False,
                diagnostics={"path": missing.path},
            ) from None
    out.source_count = len(out)
    return out


class WebhookPayloadHandler:
    slug = "webhook_payload"

    async def fetch(self, config: dict[str, Any], ctx: HandlerContext) -> ItemList:
        cfg = with_defaults(self.slug, "fetch", config)
        trigger = ctx.engine_data.get("webhook_trigger")
        if not isinstance(trigger, Mapping) or trigger.get("payload") is None:
            return ItemList()
        return payload_items(trigger["payload"], cfg)


HANDLER = HandlerSpec(
    "webhook_payload",
    "Webhook payload",
    "Items from the inbound webhook request that started the job.",
    (FETCH,),
    {
        "items_path": FieldSpec("string", "Dotted path to an array of items (absent = one item)"),
        "title_path": FieldSpec("string", "Dotted path of the title (title_path or body_path required)"),
        "body_path": FieldSpec("string", "Dotted path of the body (title_path or body_path required)"),
        "identifier_path": FieldSpec("string", "Dotted path of the item identifier"),
        "item_identifier_template": FieldSpec("string", 'Identifier built from paths, e.g. "{event.id}-{action}"'),
        "metadata": FieldSpec("object", "Extra metadata: name → dotted path"),
        "ignore_missing_paths": FieldSpec("boolean", "Missing paths give no items instead of failing", default=False),
        "source_type": FieldSpec("string", "source_type recorded for dedup", default="webhook_payload"),
    },
    code=WebhookPayloadHandler(),
    position=40,
)
