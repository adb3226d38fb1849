"""The ``files`` handler's fetch: matching files in a directory become items; a Markdown file's front
matter (``title``, ``source_url``) is read and removed from the body."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import mimetypes
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.handlers.file_paths import inside
from datamachine_mcp.engine.items import Item, ItemList, html_to_text, normalise_identifier
from datamachine_mcp.storage.timeutil import iso

MARKDOWN_SUFFIXES = frozenset({".md", ".markdown", ".mdown", ".mkd"})


def _scalar(text: str) -> str:
    value = text.strip()
    if value.startswith('"'):
        try:
            loaded = json.loads(value)
            return loaded if isinstance(loaded, str) else str(loaded)
        except ValueError:
            return value.strip('"')
    if value.startswith("'") and value.endswith("'") and len(value) >= 2:
        return value[1:-1].replace("''", "'")
    return "" if value in ("null", "~") else value


def split_front_matter(text: str) -> tuple[dict[str, str], str]:
    """``(fields, body)`` of a Markdown document with ``---`` front matter (simple ``key: scalar`` lines)."""
    if not text.startswith("---"):
        return {}, text
    lines = text.split("\n")
    if lines[0].rstrip("\r") != "---":
        return {}, text
    for index in range(1, len(lines)):
        if lines[index].rstrip("\r") in ("---", "..."):
            fields: dict[str, str] = {}
            for line in lines[1:index]:
                key, sep, value = line.rstrip("\r").partition(":")
                if sep and key.strip() and not key.startswith((" ", "\t", "#")):
                    fields[key.strip()] = _scalar(value)
            body = "\n".join(lines[index + 1 :])
            if body.startswith("\r\n"):
                body = body[2:]
            elif body.startswith("\n"):
                body = body[1:]
            return fields, body
    return {}, text


def _matches(pattern: str, name: str, rel: str) -> bool:
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(rel if "/" in pattern else name, pattern)


def _candidates(directory: Path, recursive: bool) -> list[tuple[Path, str]]:
    found: list[tuple[Path, str]] = []
    if recursive:
        for current, dirnames, filenames in os.walk(directory, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            base = Path(current)
            for name in filenames:
                path = base / name
                found.append((path, path.relative_to(directory).as_posix()))
    else:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=True) or entry.is_symlink():
                    found.append((Path(entry.path), entry.name))
    return found


def scan_directory(directory: Path, cfg: Mapping[str, Any]) -> ItemList:
    """Read the matching files of ``directory`` (already checked) into items, newest first."""
    pattern = cfg.get("pattern") or "*"
    max_bytes = int(cfg.get("max_file_bytes") or 1048576)
    encoding = cfg.get("encoding") or "utf-8"
    try:
        "".encode(encoding)
    except LookupError as exc:
        raise StepError("handler_config_invalid", f"Unknown encoding {encoding!r}") from exc
    if not directory.is_dir():
        raise StepError(
            "file_not_found", f"Directory {directory} does not exist", diagnostics={"directory": str(directory)}
        )
    out = ItemList()
    rows: list[tuple[int, str, Item]] = []
    for path, rel in _candidates(directory, bool(cfg.get("recursive"))):
        if not _matches(pattern, path.name, rel):
            continue
        real = Path(os.path.realpath(path))
        if not inside(real, directory):
            out.skip("outside_symlink")
            continue
        try:
            st = os.stat(real)
            if not os.path.isfile(real):
                continue
            if st.st_size > max_bytes:
                out.skip("oversized")
                continue
            with open(real, "rb") as handle:
                raw = handle.read(max_bytes + 1)
        except OSError:
            out.skip("unreadable")
            continue
        if len(raw) > max_bytes:
            out.skip("oversized")
            continue
        try:
            text = raw.decode(encoding)
        except (UnicodeDecodeError, ValueError):
            out.skip("undecodable")
            continue
        rows.append((st.st_mtime_ns, rel, _file_item(path, rel, text, st)))
    rows.sort(key=lambda row: (-row[0], row[1]))
    out.extend(row[2] for row in rows)
    out.source_count = len(out)
    return out


def _file_item(path: Path, rel: str, text: str, st: os.stat_result) -> Item:
    suffix = path.suffix.lower()
    title = path.stem if path.suffix else path.name
    body = text
    source_url = None
    metadata: dict[str, Any] = {}
    if suffix in MARKDOWN_SUFFIXES:
        fields, stripped = split_front_matter(text)
        if fields:
            body = stripped
            metadata["front_matter"] = fields
            if fields.get("title"):
                title = fields["title"]
            if fields.get("source_url", "").startswith(("http://", "https://")):
                source_url = fields["source_url"]
    mime = mimetypes.guess_type(path.name)[0] or "text/plain"
    mtime = datetime.fromtimestamp(st.st_mtime_ns / 1e9, UTC)
    digest = hashlib.sha256(f"{st.st_mtime_ns}:{st.st_size}".encode()).hexdigest()[:16]
    return Item(
        identifier=normalise_identifier(f"{rel}:{digest}"),
        title=title,
        body=body,
        content_string=html_to_text(body) if mime == "text/html" else body,
        source_url=source_url,
        published_at=mtime,
        file_info={"path": rel, "size": st.st_size, "mtime": iso(mtime), "mime_type": mime},
        metadata=metadata,
    )
