"""RSS documents and OpenAI-style replies for tests that run real flows against local fake servers."""

from __future__ import annotations

from email.utils import format_datetime
from typing import Any
from xml.sax.saxutils import escape

from datamachine_mcp.storage.timeutil import utcnow


def ident(guid: str) -> str:
    """The item identifier the rss handler gives an item built by :func:`rss` from ``guid``."""
    return f"tag:example.test,2026:{guid}"


def rss(*items: tuple[str, str] | tuple[str, str, str], title: str = "Local News") -> str:
    """An RSS 2.0 document; each item is (guid, title[, body]), listed newest first."""
    now = format_datetime(utcnow())
    parts = []
    for entry in items:
        guid, item_title = entry[0], entry[1]
        body = entry[2] if len(entry) > 2 else f"<p>Body of {item_title}.</p>"
        parts.append(
            "<item>"
            f"<title>{escape(item_title)}</title>"
            f"<link>https://example.test/{escape(guid)}</link>"
            f'<guid isPermaLink="false">{escape(ident(guid))}</guid>'
            f"<pubDate>{now}</pubDate>"
            f"<description>{escape(body)}</description>"
            "</item>"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<rss version="2.0"><channel><title>{escape(title)}</title><link>https://example.test/</link>'
        f"<description>Test feed</description>{''.join(parts)}</channel></rss>"
    )


RSS_HEADERS = {"Content-Type": "application/rss+xml; charset=utf-8"}


def completion(
    text: str, *, model: str = "local-model", prompt: int = 10, completion_tokens: int = 5
) -> dict[str, Any]:
    """An OpenAI Chat Completions response body."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens,
        },
    }
