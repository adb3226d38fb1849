"""``files`` handler: read files from a directory (fetch) or write Markdown/JSON files (publish, update).

Every path is checked at run time against ``files_allowed_roots`` (``realpath``), whatever the saved
config said: an escape → ``path_not_allowed``.

Choices of this handler:

* Fetch matches ``pattern`` against the file name (or, if the pattern contains ``/``, against
  the path relative to the directory); hidden files and directories (leading ``.``) are skipped
  unless the pattern itself starts with ``.``; symlinked sub-directories are not descended; a
  symlink is followed only when its target stays inside the directory. A Markdown file's front
  matter (``title``, ``source_url``) is read and removed from the body.
* ``file_path`` (engine_updates, result ``path``) is relative to the configured ``directory``;
  the update handler resolves it against its own ``directory``.
* Update keeps the file's original ``date`` and adds ``updated_at``.
* Write failures (permissions, a directory in the way) → ``file_write_failed`` (non-retryable).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import mimetypes
import os
import re
import unicodedata
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from datamachine_mcp.engine.catalog import FETCH, FETCH_ONLY, PUBLISH, PUBLISHING, UPDATE, FieldSpec, HandlerSpec
from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.handlers.base import (
    HandlerContext,
    PublishResult,
    item_identity,
    packet_parts,
    packet_title_body,
    with_defaults,
)
from datamachine_mcp.engine.items import Item, ItemList, html_to_text, normalise_identifier
from datamachine_mcp.storage.timeutil import iso, utcnow

MARKDOWN_SUFFIXES = frozenset({".md", ".markdown", ".mdown", ".mkd"})
MAX_NAME_ATTEMPTS = 10_000


# -- paths -------------------------------------------------------------------------------------


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def allowed_directory(directory: str, roots: list[Path]) -> Path:
    """The real path of ``directory`` if it lies inside one of ``roots`` (else ``path_not_allowed``)."""
    if not directory or "\x00" in directory or not os.path.isabs(directory):
        raise StepError("path_not_allowed", f"directory must be an absolute path (got {directory!r})")
    real = Path(os.path.realpath(directory))
    for root in roots:
        if _inside(real, Path(os.path.realpath(root))):
            return real
    raise StepError(
        "path_not_allowed",
        f"{directory} is outside files_allowed_roots ({', '.join(str(r) for r in roots) or 'none'})",
        diagnostics={"directory": directory, "files_allowed_roots": [str(r) for r in roots]},
    )


def relative_target(directory: Path, name: str) -> Path:
    """``directory / name`` for a relative name that stays inside ``directory`` (else ``path_not_allowed``)."""
    if not name or os.path.isabs(name) or name.startswith("/") or ".." in name or "\x00" in name or "\\" in name:
        raise StepError(
            "path_not_allowed",
            f"The file name {name!r} is not allowed (absolute, '..', NUL or '\\\\')",
            diagnostics={"file_name": name},
        )
    if name.endswith("/"):
        raise StepError("handler_config_invalid", f"The file name {name!r} names a directory")
    target = directory / name
    if not _inside(Path(os.path.realpath(target)), directory):
        raise StepError(
            "path_not_allowed", f"The file name {name!r} resolves outside {directory}", diagnostics={"file_name": name}
        )
    return target


# -- fetch -------------------------------------------------------------------------------------


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
        if not _inside(real, directory):
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


# -- publish / update --------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\{(job_id|flow_id|date|slug|item_hash)\}")
_YAML_UNSAFE = re.compile("[\u007f-\u009f\u2028\u2029\ufeff]")


def slugify(title: str) -> str:
    """Lower-case words joined by ``-`` (letters and digits of any script), ≤ 80 chars, else ``untitled``."""
    text = unicodedata.normalize("NFKC", title or "").casefold()
    text = re.sub(r"[^\w]+|_+", "-", text).strip("-")
    text = text[:80].rstrip("-")
    return text or "untitled"


def expand_template(template: str, *, job_id: Any, flow_id: Any, title: str, identifier: str | None) -> str:
    values = {
        "job_id": "none" if job_id is None else str(job_id),
        "flow_id": "none" if flow_id is None else str(flow_id),
        "date": utcnow().strftime("%Y-%m-%d"),
        "slug": slugify(title),
        "item_hash": hashlib.sha256((identifier or f"job:{job_id}").encode("utf-8")).hexdigest()[:12],
    }
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def yaml_scalar(value: Any) -> str:
    """A JSON scalar that is also a valid YAML flow scalar."""
    return _YAML_UNSAFE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", json.dumps(value, ensure_ascii=False))


def render_document(fmt: str, fields: list[tuple[str, Any]], body: str, metadata: Mapping[str, Any]) -> str:
    if fmt == "json":
        document = dict(fields)
        document["body"] = body
        document["metadata"] = dict(metadata)
        ordered: dict[str, Any] = {k: document[k] for k in ("title", "body", "date") if k in document}
        ordered.update({k: v for k, v in document.items() if k not in ordered})
        return json.dumps(ordered, ensure_ascii=False, indent=2) + "\n"
    lines = ["---", *(f"{key}: {yaml_scalar(value)}" for key, value in fields), "---", ""]
    text = "\n".join(lines) + "\n" + body
    return text if text.endswith("\n") else text + "\n"


def _numbered(target: Path, n: int) -> Path:
    stem, suffix = os.path.splitext(target.name)
    return target.with_name(f"{stem}-{n}{suffix}")


def _free_name(target: Path) -> Path:
    candidate, n = target, 1
    while os.path.lexists(candidate):
        n += 1
        if n > MAX_NAME_ATTEMPTS:
            raise StepError("file_write_failed", f"No free file name for {target.name}")
        candidate = _numbered(target, n)
    return candidate


def write_atomic(directory: Path, target: Path, data: bytes, *, overwrite: bool) -> Path:
    """Write through a temp file + rename; without ``overwrite`` never replace an existing file."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if not _inside(Path(os.path.realpath(target.parent)), directory):
            raise StepError("path_not_allowed", f"{target.parent} resolves outside {directory}")
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:12]}.tmp"
        with open(tmp, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            if overwrite:
                os.replace(tmp, target)
                return target
            candidate, n = target, 1
            while True:
                try:
                    os.link(tmp, candidate)  # atomic and never clobbers
                    return candidate
                except FileExistsError:
                    n += 1
                    if n > MAX_NAME_ATTEMPTS:
                        raise StepError("file_write_failed", f"No free file name for {target.name}") from None
                    candidate = _numbered(target, n)
                except OSError:  # no hard links on this file system
                    candidate = _free_name(candidate)
                    os.replace(tmp, candidate)
                    return candidate
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
    except StepError:
        raise
    except OSError as exc:
        raise StepError(
            "file_write_failed", f"Cannot write {target}: {exc.strerror or exc}", diagnostics={"path": str(target)}
        ) from exc


class FilesHandler:
    slug = "files"

    async def fetch(self, config: dict[str, Any], ctx: HandlerContext) -> ItemList:
        cfg = with_defaults(self.slug, "fetch", config)
        directory = allowed_directory(cfg["directory"], ctx.files_roots)
        return await anyio.to_thread.run_sync(scan_directory, directory, cfg)

    def _document(
        self, cfg: Mapping[str, Any], packet: Mapping[str, Any], ctx: HandlerContext, extra: list[tuple[str, Any]]
    ) -> tuple[str, str, str | None]:
        title, body = packet_title_body(packet)
        _, metadata = packet_parts(packet)
        identifier, source_url = item_identity(packet, ctx.engine_data)
        fields: list[tuple[str, Any]] = [
            ("title", title),
            ("date", iso(utcnow())),
            ("source_url", source_url),
            ("item_identifier", identifier),
            ("job_id", ctx.job_id),
            ("flow_id", ctx.flow_id),
        ]
        overrides = dict(extra)
        fields = [(k, overrides.pop(k, v)) for k, v in fields] + list(overrides.items())
        metadata.pop("_engine_data", None)
        return render_document(cfg["format"], fields, body, metadata), title, identifier

    async def publish(self, config: dict[str, Any], packet: dict[str, Any], ctx: HandlerContext) -> PublishResult:
        cfg = with_defaults(self.slug, "publish", config)
        directory = allowed_directory(cfg["directory"], ctx.files_roots)
        content, title, identifier = self._document(cfg, packet, ctx, [])
        template = cfg.get("filename_template") or (
            "{date}-{slug}.json" if cfg["format"] == "json" else "{date}-{slug}.md"
        )
        name = expand_template(template, job_id=ctx.job_id, flow_id=ctx.flow_id, title=title, identifier=identifier)
        target = relative_target(directory, name)
        if ctx.dry_run:
            planned = target if cfg["overwrite"] else _free_name(target)
            rel = planned.relative_to(directory).as_posix()
            return {
                "status": "preview",
                "path": rel,
                "preview": {"path": rel, "content": content},
                "engine_updates": {},
            }
        written = await anyio.to_thread.run_sync(
            lambda: write_atomic(directory, target, content.encode("utf-8"), overwrite=bool(cfg["overwrite"]))
        )
        rel = written.relative_to(directory).as_posix()
        return {"status": "published", "path": rel, "engine_updates": {"file_path": rel}}

    async def update(self, config: dict[str, Any], packet: dict[str, Any], ctx: HandlerContext) -> PublishResult:
        cfg = with_defaults(self.slug, "update", config)
        directory = allowed_directory(cfg["directory"], ctx.files_roots)
        file_path = ctx.engine_data.get("file_path")
        if not isinstance(file_path, str) or not file_path:
            raise StepError(
                "update_target_missing", "engine_data.file_path is not set: nothing to update", retryable=False
            )
        target = relative_target(directory, file_path)
        if not target.is_file():
            raise StepError(
                "update_target_missing",
                f"{file_path} does not exist in {directory}",
                diagnostics={"file_path": file_path},
            )
        previous = await anyio.to_thread.run_sync(lambda: target.read_text("utf-8", errors="replace"))
        original_date = _original_date(previous, cfg["format"])
        extra: list[tuple[str, Any]] = [("updated_at", iso(utcnow()))]
        if original_date:
            extra.insert(0, ("date", original_date))
        content, _, _ = self._document(cfg, packet, ctx, extra)
        rel = target.relative_to(directory).as_posix()
        if ctx.dry_run:
            return {
                "status": "preview",
                "path": rel,
                "preview": {"path": rel, "content": content},
                "engine_updates": {},
            }
        await anyio.to_thread.run_sync(lambda: write_atomic(directory, target, content.encode("utf-8"), overwrite=True))
        return {"status": "updated", "path": rel, "engine_updates": {"file_path": rel}}


def _original_date(text: str, fmt: str) -> str | None:
    if fmt == "json":
        try:
            value = json.loads(text).get("date")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None
    fields, _ = split_front_matter(text)
    return fields.get("date") or None


_FILES = FilesHandler()


HANDLER = HandlerSpec(
    "files",
    "Files",
    "Read files from a directory (fetch), or write Markdown/JSON files into one (publish, update).",
    (FETCH, PUBLISH, UPDATE),
    {
        "directory": FieldSpec(
            "string", "Absolute directory inside files_allowed_roots", required=True, kind="directory"
        ),
        "pattern": FieldSpec("string", "Glob of files to read", default="*", step_types=FETCH_ONLY),
        "recursive": FieldSpec("boolean", "Descend into subdirectories", default=False, step_types=FETCH_ONLY),
        "max_file_bytes": FieldSpec(
            "integer", "Skip larger files", default=1048576, min=1, max=104857600, step_types=FETCH_ONLY
        ),
        "encoding": FieldSpec("string", "Text encoding of the files", default="utf-8", step_types=FETCH_ONLY),
        "format": FieldSpec(
            "string", "Output format", default="markdown", enum=("markdown", "json"), step_types=PUBLISHING
        ),
        "filename_template": FieldSpec(
            "string",
            "File name with {job_id} {flow_id} {date} {slug} {item_hash}; default {date}-{slug}.md/.json",
            step_types=PUBLISHING,
            kind="filename_template",
        ),
        "overwrite": FieldSpec(
            "boolean", "Replace an existing file (else add -2, -3, …)", default=False, step_types=PUBLISHING
        ),
    },
    code=_FILES,
    position=30,
)
