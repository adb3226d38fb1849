"""Fetched items, the common fetch filters and packet building.

* :class:`Item` is what a fetch handler produces; :class:`ItemList` is a list of items that also
  carries the handler's counters (``skipped``: reason → count, e.g. ``non_object``,
  ``oversized``, ``undecodable``, ``outside_symlink``, ``missing_path``) and, after
  :func:`engine.handlers.run_fetch`, ``source_count``/``filtered_out``/``source_type``.
* The filters (``timeframe_limit``, ``search``, ``exclude_keywords``) are pure functions that keep
  the items' order.
* :func:`normalise_identifier` hashes identifiers longer than 255 characters.
* :func:`item_to_packet` builds the ``fetch`` packet (body truncated to fit 1 MiB).
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any

from datamachine_mcp.storage.timeutil import iso, parse_datetime, utcnow

MAX_IDENTIFIER = 255
MAX_PACKET_BYTES = 1024 * 1024

TIMEFRAMES: dict[str, timedelta | None] = {
    "all_time": None,
    "24_hours": timedelta(hours=24),
    "72_hours": timedelta(hours=72),
    "7_days": timedelta(days=7),
    "30_days": timedelta(days=30),
}


@dataclass
class Item:
    """One fetched item, before dedup and packet building."""

    identifier: str | None
    title: str
    body: str
    content_string: str
    source_url: str | None = None
    published_at: datetime | None = None
    author: str | None = None
    file_info: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class ItemList(list[Item]):
    """Items in source order plus the counters a step records (``fetch_stages``, warnings)."""

    def __init__(self, items: Iterable[Item] = (), *, skipped: Mapping[str, int] | None = None) -> None:
        super().__init__(items)
        self.skipped: dict[str, int] = dict(skipped or {})
        self.source_count: int = len(self)
        self.filtered_out: int = 0
        # identifiers of the items the filters dropped: still offered by the source (dedup refreshes them)
        self.filtered_identifiers: list[str] = []
        self.source_type: str | None = None

    def skip(self, reason: str, count: int = 1) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + count

    def warnings(self) -> list[str]:
        labels = {
            "non_object": "non-object elements skipped",
            "oversized": "files larger than max_file_bytes skipped",
            "undecodable": "files not decodable with the configured encoding skipped",
            "outside_symlink": "symlinks leading outside the directory skipped",
            "missing_path": "items with missing payload paths skipped (ignore_missing_paths)",
            "unreadable": "unreadable files skipped",
        }
        return [f"{count} {labels.get(reason, reason)}" for reason, count in self.skipped.items() if count]


# -- identifiers and JSON ----------------------------------------------------------------------


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalise_identifier(identifier: str | None) -> str | None:
    """Identifiers longer than 255 characters become ``sha256:`` + 64 hex of the full value."""
    if identifier is None:
        return None
    if len(identifier) > MAX_IDENTIFIER:
        return "sha256:" + sha256_hex(identifier)
    return identifier


normalize_identifier = normalise_identifier


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def render(value: Any) -> str:
    """A field value as text: strings as they are, ``None`` as ``""``, anything else compact JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return compact_json(value)


_MISSING = object()


def get_path(value: Any, path: str) -> Any:
    """The value at a dotted path (numeric segments index arrays), or :data:`MISSING`."""
    if path == "":
        return value
    current = value
    for segment in path.split("."):
        if isinstance(current, Mapping):
            if segment not in current:
                return _MISSING
            current = current[segment]
        elif isinstance(current, list) and re.fullmatch(r"-?\d+", segment):
            index = int(segment)
            if not -len(current) <= index < len(current):
                return _MISSING
            current = current[index]
        else:
            return _MISSING
    return current


MISSING = _MISSING


def parse_date(value: Any) -> datetime | None:
    """ISO 8601 text or Unix seconds (number or numeric text) → aware UTC datetime, else None."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            return datetime.fromtimestamp(float(value), UTC)
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return None
            if re.fullmatch(r"-?\d+(\.\d+)?", text):
                return datetime.fromtimestamp(float(text), UTC)
            return parse_datetime(text)
    except (ValueError, OverflowError, OSError):
        return None
    return None


# -- HTML to text ------------------------------------------------------------------------------

_BLOCK_TAGS = frozenset(
    {
        "p",
        "div",
        "br",
        "li",
        "ul",
        "ol",
        "tr",
        "table",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "blockquote",
        "pre",
        "section",
        "article",
        "header",
        "footer",
        "hr",
        "figure",
        "figcaption",
        "dd",
        "dt",
    }
)
_SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "head"})


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self._skip += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    """Plain text of an HTML fragment: tags removed, entities decoded, whitespace tidied."""
    if not markup:
        return ""
    if "<" not in markup and "&" not in markup:
        return markup.strip()
    parser = _TextExtractor()
    try:
        parser.feed(markup)
        parser.close()
        text = "".join(parser.parts)
    except Exception:  # a broken fragment: fall back to a crude strip
        text = html.unescape(re.sub(r"<[^>]*>", " ", markup))
    lines = [re.sub(r"[ \t\r\f\v\u00a0]+", " ", line).strip() for line in text.split("\n")]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


# -- filters -----------------------------------------------------------------------------------


def _keywords(text: str | None) -> list[str]:
    return [k.strip().lower() for k in (text or "").split(",") if k.strip()]


def _haystack(item: Item) -> str:
    return f"{item.title}\n{item.body}\n{item.content_string}".lower()


def timeframe_filter(items: Iterable[Item], timeframe: str | None, now: datetime | None = None) -> list[Item]:
    """Drop dated items older than the cutoff; undated items pass."""
    delta = TIMEFRAMES.get(timeframe or "all_time")
    if delta is None:
        return list(items)
    cutoff = (now or utcnow()) - delta
    return [i for i in items if i.published_at is None or i.published_at >= cutoff]


def search_filter(items: Iterable[Item], search: str | None) -> list[Item]:
    """Keep items whose title or body contains any comma-separated keyword (case-insensitive)."""
    words = _keywords(search)
    if not words:
        return list(items)
    return [i for i in items if any(w in _haystack(i) for w in words)]


def exclude_filter(items: Iterable[Item], exclude_keywords: str | None) -> list[Item]:
    """Drop items whose title or body contains any comma-separated keyword (case-insensitive)."""
    words = _keywords(exclude_keywords)
    if not words:
        return list(items)
    return [i for i in items if not any(w in _haystack(i) for w in words)]


def apply_filters(items: Iterable[Item], config: Mapping[str, Any], now: datetime | None = None) -> list[Item]:
    """The common fetch filters in order: timeframe, search, exclude."""
    kept = timeframe_filter(items, config.get("timeframe_limit"), now)
    kept = search_filter(kept, config.get("search"))
    return exclude_filter(kept, config.get("exclude_keywords"))


# -- packets -----------------------------------------------------------------------------------


def item_to_packet(
    item: Item,
    *,
    handler: str,
    source_type: str,
    flow_step_id: str | None,
    pipeline_id: int | None,
    flow_id: int | None,
    timestamp: datetime | None = None,
) -> dict[str, Any]:
    """The ``fetch`` packet; ``metadata._engine_data`` carries the item's routing keys."""
    data: dict[str, Any] = {"title": item.title, "body": item.body, "content_string": item.content_string}
    if item.file_info is not None:
        data["file_info"] = item.file_info
    metadata: dict[str, Any] = {k: v for k, v in item.metadata.items() if not k.startswith("_")}
    metadata.update(
        {
            "source_type": source_type,
            "handler": handler,
            "flow_step_id": flow_step_id,
            "pipeline_id": pipeline_id,
            "flow_id": flow_id,
            "item_identifier": item.identifier,
        }
    )
    engine: dict[str, Any] = {"source_type": source_type}
    if item.identifier is not None:
        engine["item_identifier"] = item.identifier
    if item.source_url:
        metadata["source_url"] = item.source_url
        engine["source_url"] = item.source_url
    if item.published_at is not None:
        metadata["published_at"] = iso(item.published_at)
    if item.author:
        metadata.setdefault("author", item.author)
    metadata["_engine_data"] = engine
    packet = {"type": "fetch", "timestamp": iso(timestamp or utcnow()), "data": data, "metadata": metadata}
    return fit_packet(packet)


def packet_size(packet: Mapping[str, Any]) -> int:
    return len(compact_json(packet).encode("utf-8"))


def fit_packet(packet: dict[str, Any], limit: int = MAX_PACKET_BYTES) -> dict[str, Any]:
    """Truncate ``data.body``/``data.content_string`` until the packet serialises within ``limit``."""
    size = packet_size(packet)
    if size <= limit:
        return packet
    data = dict(packet["data"])
    for _ in range(8):
        excess = size - limit
        for key in ("content_string", "body"):
            text = data.get(key)
            if isinstance(text, str) and text and excess > 0:
                encoded = text.encode("utf-8")
                cut = max(0, len(encoded) - excess - 1024)
                data[key] = encoded[:cut].decode("utf-8", errors="ignore")
                excess -= len(encoded) - cut
        packet = {**packet, "data": data, "metadata": {**packet["metadata"], "truncated": True}}
        size = packet_size(packet)
        if size <= limit:
            break
    return packet
