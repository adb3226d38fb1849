"""The ``files`` handler's publish and update: file names from a template, the document (Markdown
front matter or JSON), and atomic writes that never replace a file unless asked."""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.handlers.file_paths import inside
from datamachine_mcp.engine.handlers.file_scan import split_front_matter
from datamachine_mcp.storage.timeutil import utcnow

MAX_NAME_ATTEMPTS = 10_000


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


def free_name(target: Path) -> Path:
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
        if not inside(Path(os.path.realpath(target.parent)), directory):
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
                    candidate = free_name(candidate)
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


def original_date(text: str, fmt: str) -> str | None:
    if fmt == "json":
        try:
            value = json.loads(text).get("date")
        except (ValueError, AttributeError):
            return None
        return value if isinstance(value, str) else None
    fields, _ = split_front_matter(text)
    return fields.get("date") or None
