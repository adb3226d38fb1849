"""``rss`` fetch handler: RSS 2.0, RSS 1.0/RDF and Atom feeds."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import anyio
import feedparser

from datamachine_mcp.engine.catalog import FETCH, FieldSpec, HandlerSpec
from datamachine_mcp.engine.configs import file_url_path
from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.handlers.base import HandlerContext, with_defaults
from datamachine_mcp.engine.handlers.file_paths import allowed_directory
from datamachine_mcp.engine.http import excerpt
from datamachine_mcp.engine.items import Item, ItemList, html_to_text, normalise_identifier, sha256_hex

SOFT_PROBLEMS = (
    feedparser.CharacterEncodingOverride,
    feedparser.NonXMLContentType,
)


def _struct_time(value: Any) -> datetime | None:
    if not isinstance(value, time.struct_time):
        return None
    try:
        return datetime(*value[:6], tzinfo=UTC)
    except (ValueError, OverflowError):
        return None


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def entry_to_item(entry: Any, feed_title: str) -> Item:
    title = _text(entry.get("title"))
    contents = entry.get("content") or []
    body = ""
    for content in contents:
        value = content.get("value") if hasattr(content, "get") else None
        if isinstance(value, str) and value.strip():
            body = value
            break
    if not body:
        body = entry.get("summary") or ""
    link = _text(entry.get("link")) or None
    published_raw = entry.get("published") or entry.get("updated") or ""
    published = _struct_time(entry.get("published_parsed")) or _struct_time(entry.get("updated_parsed"))
    identifier = _text(entry.get("id")) or link
    if not identifier:
        identifier = "sha256:" + sha256_hex(f"{title}{published_raw}")
    metadata: dict[str, Any] = {}
    if feed_title:
        metadata["feed_title"] = feed_title
    categories = [t.get("term") for t in entry.get("tags") or [] if hasattr(t, "get") and t.get("term")]
    if categories:
        metadata["categories"] = categories
    return Item(
        identifier=normalise_identifier(identifier),
        title=title,
        body=body,
        content_string=html_to_text(body),
        source_url=link,
        published_at=published,
        author=_text(entry.get("author")) or None,
        metadata=metadata,
    )


def parse_feed(content: bytes, content_type: str | None, url: str, shown: str | None = None) -> ItemList:
    """Items of a feed document (``url`` resolves relative links; ``shown`` is used in messages)."""
    shown = shown or url.split("?", 1)[0]
    local = url.lower().startswith("file:")
    # feedparser resolves relative links against content-location, but turns file:///dir/x into
    # file://dir/x (a host "dir"): a local feed's links are resolved here instead, its guids kept as written.
    headers = {} if local else {"content-location": url}
    if content_type:
        headers["content-type"] = content_type
    # A stream, never bytes/str: feedparser treats strings as URLs or file names.
    parsed = feedparser.parse(io.BytesIO(content), response_headers=headers)
    entries = parsed.get("entries") or []
    problem = parsed.get("bozo_exception") if parsed.get("bozo") else None
    if isinstance(problem, SOFT_PROBLEMS):  # a wrong Content-Type or charset label: the feed still parsed
        problem = None
    if not entries and (problem is not None or not parsed.get("version")):
        detail = f"{problem.__class__.__name__}: {problem}" if problem else "not an RSS or Atom document"
        raise StepError(
            "invalid_response",
            f"{shown} is not a readable feed ({detail})",
            diagnostics={"url": shown, "body": excerpt(content)},
        )
    feed_title = _text((parsed.get("feed") or {}).get("title"))
    items = ItemList(entry_to_item(entry, feed_title) for entry in entries)
    if local:
        for item in items:
            if item.source_url and not urlsplit(item.source_url).scheme:
                item.source_url = urljoin(url, item.source_url)
    return items


def read_feed_file(url: str, roots: list[Path], max_bytes: int) -> bytes:
    """The bytes of a ``file:`` feed URL, checked like the files handler's paths (inside
    files_allowed_roots after resolving links) and capped like a response (http_max_response_bytes)."""
    path = file_url_path(url)
    if path is None:
        raise StepError("url_not_allowed", f"{url} is not a file:///absolute/path URL", diagnostics={"url": url})
    real = allowed_directory(path, roots)
    if not real.is_file():
        raise StepError("file_not_found", f"Feed file {path} does not exist", diagnostics={"path": path})
    with real.open("rb") as handle:
        content = handle.read(max_bytes + 1)
    if len(content) > max_bytes:
        raise StepError(
            "response_too_large",
            f"Feed file {path} is larger than http_max_response_bytes ({max_bytes} bytes)",
            diagnostics={"path": path, "limit": max_bytes},
        )
    return content


class RssHandler:
    slug = "rss"

    async def fetch(self, config: dict[str, Any], ctx: HandlerContext) -> ItemList:
        cfg = with_defaults(self.slug, "fetch", config)
        url = cfg["feed_url"]
        if url.lower().startswith("file:"):  # a local feed file (no network, no outbound rules)
            limit = int(ctx.settings["http_max_response_bytes"])
            content = await anyio.to_thread.run_sync(read_feed_file, url, ctx.files_roots, limit)
            return await anyio.to_thread.run_sync(parse_feed, content, None, url)
        response = await ctx.outbound.get(
            url,
            headers={"Accept": "application/rss+xml, application/atom+xml, application/xml;q=0.9, */*;q=0.8"},
        )
        return await anyio.to_thread.run_sync(
            parse_feed, response.content, response.headers.get("content-type"), response.url
        )


HANDLER = HandlerSpec(
    "rss",
    "RSS / Atom feed",
    "Fetch items from an RSS 2.0, RSS 1.0/RDF or Atom feed.",
    (FETCH,),
    {
        "feed_url": FieldSpec(
            "string",
            "Feed URL: http(s), or file:///absolute/path of a feed file inside files_allowed_roots",
            required=True,
            kind="feed_url",
        )
    },
    code=RssHandler(),
    position=10,
)
