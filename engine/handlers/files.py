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

Path checks are in ``file_paths``, the fetch scan in ``file_scan``, document rendering and atomic writes in
``file_write``.
"""

from __future__ import annotations

from collections.abc import Mapping
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
from datamachine_mcp.engine.handlers.file_paths import allowed_directory, relative_target
from datamachine_mcp.engine.handlers.file_scan import scan_directory
from datamachine_mcp.engine.handlers.file_write import (
    expand_template,
    free_name,
    original_date,
    render_document,
    write_atomic,
)
from datamachine_mcp.engine.items import ItemList
from datamachine_mcp.storage.timeutil import iso, utcnow


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
            planned = target if cfg["overwrite"] else free_name(target)
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
        first_date = original_date(previous, cfg["format"])
        extra: list[tuple[str, Any]] = [("updated_at", iso(utcnow()))]
        if first_date:
            extra.insert(0, ("date", first_date))
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
