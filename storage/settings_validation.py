"""Validation of a settings write: types, ranges (clamped and reported back), provider fields; API keys
are sealed before they are stored."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from datamachine_mcp.storage.crypto import MASK, SecretBox
from datamachine_mcp.storage.settings_schema import (
    INT_SETTINGS,
    PROVIDER_FIELDS,
    PROVIDERS,
    SettingError,
    Snapshot,
    default_providers,
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _clamp(key: str, value: Any, adjusted: dict[str, Any]) -> int:
    spec = INT_SETTINGS[key]
    if not _is_int(value):
        raise SettingError(key, f"{key} must be an integer")
    clamped = max(spec.low, value if spec.high is None else min(spec.high, value))
    if clamped != value:
        adjusted[key] = clamped
    return clamped


def _valid_url(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    parsed = urlparse(value)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def validate(key: str, value: Any, current: Snapshot, adjusted: dict[str, Any], box: SecretBox) -> Any:
    """The value to store for ``key``: checked, clamped (recorded in ``adjusted``), API keys sealed."""
    if key in INT_SETTINGS:
        return _clamp(key, value, adjusted)
    if key == "log_level":
        from datamachine_mcp.storage.models import LOG_LEVELS

        if value not in LOG_LEVELS:
            raise SettingError(key, f"log_level must be one of: {', '.join(LOG_LEVELS)}")
        return value
    if key == "admin_user_ids":
        if not isinstance(value, list) or not all(_is_int(v) and v >= 1 for v in value):
            raise SettingError(key, "admin_user_ids must be a list of user ids (integers >= 1)")
        if not value:
            raise SettingError(key, "admin_user_ids cannot be empty: the last global administrator stays")
        return sorted(set(value))
    if key in ("default_provider", "default_model"):
        if not isinstance(value, str):
            raise SettingError(key, f"{key} must be a string")
        if key == "default_provider" and value not in ("", *PROVIDERS):
            raise SettingError(key, f'default_provider must be one of: {", ".join(PROVIDERS)} (or "")')
        if len(value) > 100:
            raise SettingError(key, f"{key} must be at most 100 characters")
        return value
    if key == "outbound_allow_private_networks":
        if not isinstance(value, bool):
            raise SettingError(key, "outbound_allow_private_networks must be true or false")
        return value
    if key == "files_allowed_roots":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise SettingError(key, "files_allowed_roots must be a non-empty list of absolute directories")
        for root in value:
            if not (root.startswith("$DATA_DIR") or Path(root).is_absolute()):
                raise SettingError(key, f"files_allowed_roots entry '{root}' is not an absolute path")
        return value
    if key == "webhook_rate_limit":
        return _rate_limit(value, current, adjusted)
    if key == "ai_providers":
        return _providers(value, current, box)
    raise SettingError(key, f"Unknown setting '{key}'")  # pragma: no cover - SETTING_KEYS guards


def _rate_limit(value: Any, current: Snapshot, adjusted: dict[str, Any]) -> dict[str, int]:
    key = "webhook_rate_limit"
    if not isinstance(value, dict) or not set(value) <= {"max", "window"}:
        raise SettingError(key, "webhook_rate_limit must be an object with 'max' and/or 'window'")
    merged = dict(current[key])
    bounds = {"max": (0, 10000), "window": (1, 86400)}
    for field, raw in value.items():
        if not _is_int(raw):
            raise SettingError(key, f"webhook_rate_limit.{field} must be an integer")
        low, high = bounds[field]
        merged[field] = max(low, min(high, raw))
        if merged[field] != raw:
            adjusted[key] = merged
    return merged


def _providers(value: Any, current: Snapshot, box: SecretBox) -> dict[str, Any]:
    key = "ai_providers"
    if not isinstance(value, dict):
        raise SettingError(key, "ai_providers must be an object keyed by provider (openai, anthropic)")
    stored = {p: dict(f) for p, f in current[key].items()}
    for provider, fields in value.items():
        if provider not in PROVIDER_FIELDS:
            raise SettingError(
                key,
                f"Unknown provider '{provider}'. Configurable providers: {', '.join(PROVIDER_FIELDS)}.",
            )
        if not isinstance(fields, dict):
            raise SettingError(key, f"ai_providers.{provider} must be an object")
        defaults = default_providers()[provider]
        target = stored.setdefault(provider, dict(defaults))
        for field, raw in fields.items():
            path = f"ai_providers.{provider}.{field}"
            if field not in PROVIDER_FIELDS[provider]:
                raise SettingError(key, f"Unknown field '{path}'. Fields: {', '.join(PROVIDER_FIELDS[provider])}.")
            if raw is None:
                target[field] = defaults[field]
            elif field == "api_key":
                if not isinstance(raw, str) or not raw.strip():
                    raise SettingError(key, f"{path} must be a non-empty string (or null to remove it)")
                if raw != MASK:
                    target[field] = box.encrypt(raw, f"setting:{path}")
            elif field == "base_url":
                if not _valid_url(raw):
                    raise SettingError(key, f"{path} must be an http(s) URL, e.g. http://127.0.0.1:8080/v1")
                target[field] = raw.rstrip("/")
            else:
                if not isinstance(raw, str) or not raw:
                    raise SettingError(key, f"{path} must be a non-empty string")
                target[field] = raw
    # Store only what differs from the defaults, so a removed field reads as its default.
    result: dict[str, Any] = {}
    for provider, fields in stored.items():
        defaults = default_providers().get(provider, {})
        diff = {f: v for f, v in fields.items() if defaults.get(f) != v}
        if diff:
            result[provider] = diff
    return result
