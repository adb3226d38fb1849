"""``http_json`` fetch handler: GET a JSON API and map an array of objects.

Non-object elements of the array are skipped and counted in ``ItemList.skipped["non_object"]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from datamachine_mcp.engine.catalog import FETCH, FieldSpec, HandlerSpec
from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.handlers.base import HandlerContext, with_defaults
from datamachine_mcp.engine.http import excerpt
from datamachine_mcp.engine.items import (
    MISSING,
    Item,
    ItemList,
    canonical_json,
    get_path,
    html_to_text,
    normalise_identifier,
    parse_date,
    render,
    sha256_hex,
)


def _field(element: Mapping[str, Any], path: str | None) -> Any:
    if not path:
        return None
    value = get_path(element, path)
    return None if value is MISSING else value


def map_elements(document: Any, cfg: Mapping[str, Any], url: str) -> ItemList:
    items_path = cfg.get("items_path") or ""
    array = get_path(document, items_path)
    if array is MISSING or not isinstance(array, list):
        where = f"items_path '{items_path}'" if items_path else "the document root"
        found = "nothing" if array is MISSING else type(array).__name__
        raise StepError(
            "invalid_response",
            f"{url}: {where} does not select an array (found {found})",
            diagnostics={"url": url, "items_path": items_path},
        )
    out = ItemList()
    for element in array:
        if not isinstance(element, dict):
            out.skip("non_object")
            continue
        raw_id = _field(element, cfg.get("identifier_field"))
        identifier = render(raw_id) if raw_id not in (None, "") else ""
        if not identifier:
            identifier = "sha256:" + sha256_hex(canonical_json(element))
        body = render(_field(element, cfg.get("body_field")))
        link = _field(element, cfg.get("link_field"))
        out.append(
            Item(
                identifier=normalise_identifier(identifier),
                title=render(_field(element, cfg.get("title_field"))),
                body=body,
                content_string=html_to_text(body),
                source_url=link if isinstance(link, str) and link else None,
                published_at=parse_date(_field(element, cfg.get("date_field"))),
            )
        )
    out.source_count = len(out)
    return out


class HttpJsonHandler:
    slug = "http_json"

    async def fetch(self, config: dict[str, Any], ctx: HandlerContext) -> ItemList:
        cfg = with_defaults(self.slug, "fetch", config)
        headers = {"Accept": "application/json"}
        for name, value in (cfg.get("headers") or {}).items():
            headers[str(name)] = render(value)
        response = await ctx.outbound.get(cfg["url"], headers=headers)
        shown = response.url.split("?", 1)[0]
        try:
            document = response.json()
        except StepError as exc:
            raise StepError(
                "invalid_response",
                f"{shown} did not return JSON",
                http_status=response.status,
                diagnostics={"url": shown, "body": excerpt(response.content)},
            ) from exc
        return map_elements(document, cfg, shown)


HANDLER = HandlerSpec(
    "http_json",
    "HTTP JSON API",
    "GET a JSON API and map an array of objects to items.",
    (FETCH,),
    {
        "url": FieldSpec("string", "API URL (http or https)", required=True, kind="url"),
        "headers": FieldSpec("object", "Extra request headers (stored encrypted)", secret=True),
        "items_path": FieldSpec("string", 'Dotted path to the array ("" = the root)', default=""),
        "title_field": FieldSpec("string", "Dotted path of the title in each element", default="title"),
        "body_field": FieldSpec("string", "Dotted path of the body in each element", default="body"),
        "identifier_field": FieldSpec("string", "Dotted path of the item identifier", default="id"),
        "link_field": FieldSpec("string", "Dotted path of the item URL", default="url"),
        "date_field": FieldSpec("string", "Dotted path of the date (ISO 8601 or Unix seconds)"),
    },
    code=HttpJsonHandler(),
    position=20,
)
