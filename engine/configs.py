"""Validating, merging and sealing handler configs and step settings (docs/engine.md, Handler configuration).

Used when a config is saved (abilities) and again when a step runs (the engine), so both agree on
what a valid config is.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from datamachine_mcp.engine.catalog import HANDLERS, STEP_TYPES, FieldSpec, HandlerSpec, handlers_for
from datamachine_mcp.engine.errors import CodedError
from datamachine_mcp.storage.crypto import MASK, SecretBox, is_envelope


class ConfigError(CodedError):
    """A handler config or step settings problem (``handler_not_found``, ``invalid_handler``, …)."""


def step_type_or_error(slug: str) -> None:
    if slug not in STEP_TYPES:
        raise ConfigError(
            "invalid_step_type",
            f"Invalid step_type '{slug}'. Must be one of: {', '.join(STEP_TYPES)}",
            step_type=slug,
        )


def handler_for(step_type: str, slug: str) -> HandlerSpec:
    """The handler ``slug`` for a step of ``step_type`` (handler_not_found / invalid_handler)."""
    handler = HANDLERS.get(slug)
    if handler is None:
        raise ConfigError(
            "handler_not_found",
            f"Handler '{slug}' not found. Registered handlers: {', '.join(HANDLERS)}.",
            handler_slug=slug,
        )
    if step_type not in handler.step_types:
        serving = ", ".join(h.slug for h in handlers_for(step_type)) or "none"
        raise ConfigError(
            "invalid_handler",
            f"Handler '{slug}' does not serve {step_type} steps (handlers for {step_type}: {serving}).",
            handler_slug=slug,
            step_type=step_type,
        )
    return handler


def _value_error(name: str, spec: FieldSpec, value: Any, files_roots: list[Path] | None) -> str | None:
    if spec.secret and (is_envelope(value) or value == MASK):
        return None
    expected = spec.type
    ok = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
    }[expected]
    if not ok:
        return f"must be of type {expected}"
    if spec.enum is not None and value not in spec.enum:
        return f"must be one of: {', '.join(map(str, spec.enum))}"
    if expected in ("integer", "number"):
        if spec.min is not None and value < spec.min:
            return f"must be >= {spec.min:g}"
        if spec.max is not None and value > spec.max:
            return f"must be <= {spec.max:g}"
    if expected == "array" and spec.items is not None:
        item_ok = {
            "string": lambda v: isinstance(v, str),
            "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        }.get(spec.items, lambda v: True)
        if not all(item_ok(v) for v in value):
            return f"must be an array of {spec.items} values"
    if spec.kind in ("url", "feed_url"):
        parsed = urlparse(value)
        if spec.kind == "feed_url" and parsed.scheme == "file":
            return file_url_error(value, files_roots)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            return "must be an http(s) URL" + (" or a file:/// URL" if spec.kind == "feed_url" else "")
    elif spec.kind == "directory":
        return directory_error(value, files_roots)
    elif spec.kind == "filename_template":
        return filename_template_error(value)
    return None


def directory_error(value: str, files_roots: list[Path] | None) -> str | None:
    if not os.path.isabs(value):
        return "must be an absolute path"
    if files_roots is None:
        return None
    resolved = Path(os.path.realpath(value))
    for root in files_roots:
        root_real = Path(os.path.realpath(root))
        if resolved == root_real or root_real in resolved.parents:
            return None
    return f"must be inside files_allowed_roots ({', '.join(str(r) for r in files_roots)})"


def file_url_path(value: str) -> str | None:
    """The local path of a ``file:`` URL (``file:///p`` or ``file://localhost/p``), else None."""
    parsed = urlparse(value)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
        return None
    path = unquote(parsed.path)
    return path if os.path.isabs(path) and "\x00" not in path else None


def file_url_error(value: str, files_roots: list[Path] | None) -> str | None:
    path = file_url_path(value)
    if path is None:
        return "must be a file:///absolute/path URL naming a local file"
    return directory_error(path, files_roots)


def filename_template_error(value: str) -> str | None:
    if os.path.isabs(value) or value.startswith("/") or ".." in value or "\x00" in value or "\\" in value:
        return "must be a relative file name without '..', NUL or '\\'"
    return None


def _missing(fields: Mapping[str, FieldSpec], config: Mapping[str, Any]) -> list[str]:
    return [n for n, f in fields.items() if f.required and config.get(n) in (None, "")]


def check_fields(
    fields: Mapping[str, FieldSpec],
    config: Mapping[str, Any],
    *,
    check_required: bool,
    files_roots: list[Path] | None,
) -> dict[str, Any] | None:
    """Problems of ``config`` against ``fields`` as error data, or None when it is valid."""
    unknown = sorted(k for k in config if k not in fields)
    if unknown:
        return {"unknown_fields": unknown, "field_specs": {n: f.public() for n, f in fields.items()}}
    if check_required:
        missing = _missing(fields, config)
        if missing:
            return {"missing_fields": missing}
    errors = []
    for name, value in config.items():
        if value is None:
            continue
        problem = _value_error(name, fields[name], value, files_roots)
        if problem is not None:
            errors.append({"field": name, "message": f"{name} {problem}"})
    return {"field_errors": errors} if errors else None


def handler_config_problem(
    handler: HandlerSpec,
    step_type: str,
    config: Mapping[str, Any],
    *,
    check_required: bool = True,
    files_roots: list[Path] | None = None,
    check_kinds: bool = True,
) -> dict[str, Any] | None:
    """Problems of a handler config as error data (see :func:`check_fields`), or None when it is valid.

    With ``check_required``, webhook_payload also needs title_path or body_path. ``check_kinds=False``
    leaves the safety of url/directory/file name fields to the run (the handlers judge the real values).
    """
    fields = handler.fields_for(step_type)
    if not check_kinds:
        fields = {n: dataclasses.replace(f, kind=None) for n, f in fields.items()}
    problem = check_fields(fields, config, check_required=check_required, files_roots=files_roots)
    needs_path = check_required and handler.slug == "webhook_payload"
    if problem is None and needs_path and not config.get("title_path") and not config.get("body_path"):
        problem = {"missing_fields": ["title_path|body_path"]}
    return problem


def problem_detail(problem: Mapping[str, Any]) -> str:
    """The human-readable part of a :func:`check_fields` problem."""
    if "unknown_fields" in problem:
        return f"unknown fields: {', '.join(problem['unknown_fields'])}"
    if "missing_fields" in problem:
        return f"missing required fields: {', '.join(problem['missing_fields'])}"
    return "; ".join(e["message"] for e in problem["field_errors"])


def validate_handler_config(
    handler: HandlerSpec,
    step_type: str,
    config: Mapping[str, Any],
    *,
    check_required: bool = True,
    files_roots: list[Path] | None = None,
) -> None:
    problem = handler_config_problem(handler, step_type, config, check_required=check_required, files_roots=files_roots)
    if problem is None:
        return
    raise ConfigError(
        "invalid_handler_config",
        f"Invalid config for handler '{handler.slug}': {problem_detail(problem)}.",
        handler_slug=handler.slug,
        **problem,
    )


def validate_step_settings(step_type: str, settings: Mapping[str, Any], *, check_required: bool = True) -> None:
    spec = STEP_TYPES[step_type]
    problem = check_fields(spec.settings_fields, settings, check_required=check_required, files_roots=None)
    if problem is None:
        return
    raise ConfigError(
        "invalid_step_settings",
        f"Invalid flow_step_settings for a {step_type} step: {problem_detail(problem)}.",
        step_type=step_type,
        **problem,
    )


def merge(stored: Mapping[str, Any] | None, patch: Mapping[str, Any]) -> dict[str, Any]:
    """Shallow merge: given keys replace, ``null`` removes, MASK keeps the stored secret."""
    out = dict(stored or {})
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif value == MASK and key in out:
            continue
        else:
            out[key] = value
    return out


def seal_secrets(handler: HandlerSpec, config: Mapping[str, Any], box: SecretBox) -> dict[str, Any]:
    """Encrypt plaintext values of secret fields (kind ``handler:<slug>.<field>``)."""
    out = dict(config)
    for name, spec in handler.all_fields().items():
        if not spec.secret or name not in out:
            continue
        value = out[name]
        if value == MASK:  # "keep" with nothing stored: nothing to keep
            out.pop(name)
        elif not is_envelope(value):
            out[name] = box.encrypt(value, f"handler:{handler.slug}.{name}")
    return out


def open_secrets(handler: HandlerSpec, config: Mapping[str, Any], box: SecretBox) -> dict[str, Any]:
    """Decrypt secret fields for a run (raises storage.crypto.SecretUnavailable)."""
    out = dict(config)
    for name, spec in handler.all_fields().items():
        if spec.secret and is_envelope(out.get(name)):
            out[name] = box.decrypt(out[name], f"handler:{handler.slug}.{name}")
    return out


def missing_required(handler: HandlerSpec, step_type: str, config: Mapping[str, Any]) -> list[str]:
    return _missing(handler.fields_for(step_type), config)
