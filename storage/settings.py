"""Runtime settings: keys, defaults, validation, clamping and storage (docs/storage.md, Settings).

A missing row means the default. Writes validate types, clamp ranges (reported back) and
encrypt provider API keys. Readers get a cached snapshot; a write in this process invalidates it,
and other processes' writes are seen after ``CACHE_SECONDS`` - except the settings that decide
access (``ACCESS_KEYS``): a snapshot taken for an access decision checks their rows' ``updated_at``
first, so a change by any process takes effect at once.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from datamachine_mcp.storage.crypto import MASK, SecretBox, is_envelope, mask
from datamachine_mcp.storage.timeutil import utcnow

# SQLAlchemy and the models are imported by the methods that read or write rows: a process that
# serves only its tool list opens a SettingsStore without loading them.
if TYPE_CHECKING:
    from sqlalchemy import Select
    from sqlalchemy.ext.asyncio import AsyncSession

CACHE_SECONDS = 2.0
PROVIDERS = ("openai", "anthropic", "sampling")
PROVIDER_FIELDS: dict[str, tuple[str, ...]] = {
    "openai": ("base_url", "api_key"),
    "anthropic": ("base_url", "api_key", "version"),
}
INTERNAL_KEYS = frozenset({"maintenance_last_retention_at", "scheduler_lease", "worker_heartbeat"})


class SettingError(ValueError):
    """A rejected settings write: ``key`` and a message that names the fix."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


@dataclass(frozen=True)
class IntSpec:
    default: int
    low: int
    high: int | None = None


def _insert(session: AsyncSession) -> Any:
    """The dialect's INSERT construct (both offer ``on_conflict_do_update``)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    from datamachine_mcp.storage.models import Setting

    return pg_insert(Setting) if session.get_bind().dialect.name == "postgresql" else sqlite_insert(Setting)


def _default_providers() -> dict[str, dict[str, Any]]:
    return {
        "openai": {"base_url": "https://api.openai.com/v1", "api_key": None},
        "anthropic": {"base_url": "https://api.anthropic.com", "api_key": None, "version": "2023-06-01"},
    }


INT_SETTINGS: dict[str, IntSpec] = {
    "retention_completed_jobs_days": IntSpec(30, 0, 36500),
    "retention_failed_jobs_days": IntSpec(30, 0, 36500),
    "retention_logs_days": IntSpec(30, 0, 36500),
    "retention_processed_items_days": IntSpec(30, 0, 36500),
    "chat_session_ttl_hours": IntSpec(24, 0, 87600),
    "max_active_jobs": IntSpec(500, 0, 1_000_000),
    "retry_max_attempts": IntSpec(3, 1, 10),
    "retry_base_seconds": IntSpec(60, 1, 3600),
    "retry_transport_base_seconds": IntSpec(15, 1, 3600),
    "retry_max_delay_seconds": IntSpec(3600, 60, 86400),
    "lease_ttl_seconds": IntSpec(120, 15, 3600),
    "claim_ttl_seconds": IntSpec(3600, 60, 604800),
    "step_timeout_seconds": IntSpec(900, 10, 86400),
    "scheduler_tick_seconds": IntSpec(5, 1, 300),
    "maintenance_interval_seconds": IntSpec(30, 5, 3600),
    "problem_flow_threshold": IntSpec(3, 1, 1000),
    "max_agents_per_user": IntSpec(1, 0, 1000),
    "http_rate_limit_per_minute": IntSpec(120, 0, 1_000_000),
    "ai_request_timeout_seconds": IntSpec(120, 5, 900),
    "ai_max_concurrent_requests": IntSpec(3, 1, 50),
    "http_timeout_seconds": IntSpec(30, 1, 300),
    "http_max_response_bytes": IntSpec(10_485_760, 1024, 1_073_741_824),
    "webhook_max_body_bytes": IntSpec(1_048_576, 1024, 10_485_760),
    "webhook_replay_window_seconds": IntSpec(300, 30, 3600),
    "webhook_gate_default_expiry_hours": IntSpec(168, 1, 8760),
}

OTHER_DEFAULTS: dict[str, Callable[[], Any]] = {
    "log_level": lambda: "info",
    "admin_user_ids": lambda: [1],
    "default_provider": lambda: "",
    "default_model": lambda: "",
    "ai_providers": _default_providers,
    "outbound_allow_private_networks": lambda: True,
    "files_allowed_roots": lambda: ["$DATA_DIR/files"],
    "webhook_rate_limit": lambda: {"max": 60, "window": 60},
}

# The order of the table in docs/storage.md, Settings (get-settings lists keys in this order).
SETTING_KEYS: tuple[str, ...] = (
    "log_level",
    "retention_completed_jobs_days",
    "retention_failed_jobs_days",
    "retention_logs_days",
    "retention_processed_items_days",
    "chat_session_ttl_hours",
    "max_active_jobs",
    "retry_max_attempts",
    "retry_base_seconds",
    "retry_transport_base_seconds",
    "retry_max_delay_seconds",
    "lease_ttl_seconds",
    "claim_ttl_seconds",
    "step_timeout_seconds",
    "scheduler_tick_seconds",
    "maintenance_interval_seconds",
    "problem_flow_threshold",
    "admin_user_ids",
    "max_agents_per_user",
    "http_rate_limit_per_minute",
    "default_provider",
    "default_model",
    "ai_providers",
    "ai_request_timeout_seconds",
    "ai_max_concurrent_requests",
    "http_timeout_seconds",
    "http_max_response_bytes",
    "outbound_allow_private_networks",
    "files_allowed_roots",
    "webhook_max_body_bytes",
    "webhook_rate_limit",
    "webhook_replay_window_seconds",
    "webhook_gate_default_expiry_hours",
)


def default_value(key: str) -> Any:
    if key in INT_SETTINGS:
        return INT_SETTINGS[key].default
    return OTHER_DEFAULTS[key]()


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


class Snapshot(Mapping[str, Any]):
    """Effective settings (stored values over defaults), with envelopes still sealed."""

    def __init__(self, values: dict[str, Any], updated_at: dict[str, Any], data_dir: Path) -> None:
        self._values = values
        self.updated_at = updated_at
        self.data_dir = data_dir

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Any:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def int(self, key: str) -> int:
        return int(self._values[key])

    def files_roots(self) -> list[Path]:
        return [Path(str(r).replace("$DATA_DIR", str(self.data_dir))) for r in self._values["files_allowed_roots"]]

    def masked(self) -> dict[str, Any]:
        """Client view: API keys read as the mask when set, null otherwise."""
        out = {key: copy.deepcopy(self._values[key]) for key in SETTING_KEYS}
        out["ai_providers"] = mask(out["ai_providers"])
        out["files_allowed_roots"] = [str(p) for p in self.files_roots()]
        return out


# Settings that decide who may do what (admins, self-service limits, rate limits): read current.
ACCESS_KEYS = frozenset({"admin_user_ids", "max_agents_per_user", "http_rate_limit_per_minute", "webhook_rate_limit"})


@cache
def _access_stamps() -> Select[Any]:
    from sqlalchemy import select

    from datamachine_mcp.storage.models import Setting

    columns = Setting.__table__.c
    return select(columns.key, columns.updated_at).where(columns.key.in_(sorted(ACCESS_KEYS)))


class SettingsStore:
    """Reads and writes ``datamachine_settings`` for one process."""

    def __init__(self, data_dir: Path, box: SecretBox) -> None:
        self.data_dir = data_dir
        self.box = box
        self._cache: tuple[float, Snapshot] | None = None

    def invalidate(self) -> None:
        self._cache = None

    def cached(self) -> Snapshot | None:
        """The cached snapshot while it is fresh (lets hot paths skip opening a session)."""
        if self._cache is not None and time.monotonic() - self._cache[0] < CACHE_SECONDS:
            return self._cache[1]
        return None

    async def snapshot(self, session: AsyncSession, *, fresh: bool = False, access: bool = False) -> Snapshot:
        """The effective settings. ``access``: for an access decision, with ``ACCESS_KEYS`` current as
        of this transaction (one query of a few rows when the cache is warm)."""
        now = time.monotonic()
        if not fresh and self._cache is not None:
            snap = self._cache[1]
            if access:
                stamps = dict((await session.execute(_access_stamps())).all())
                if stamps == {k: v for k, v in snap.updated_at.items() if k in ACCESS_KEYS}:
                    return snap
            elif now - self._cache[0] < CACHE_SECONDS:
                return snap
        from sqlalchemy import select

        from datamachine_mcp.storage.models import Setting

        rows = (await session.execute(select(Setting))).scalars().all()
        stored = {row.key: row for row in rows}
        values: dict[str, Any] = {}
        for key in SETTING_KEYS:
            value = default_value(key)
            if key in stored:
                value = self._merge_stored(key, value, stored[key].value)
            values[key] = value
        updated = {key: row.updated_at for key, row in stored.items() if key in SETTING_KEYS}
        snap = Snapshot(values, updated, self.data_dir)
        self._cache = (now, snap)
        return snap

    @staticmethod
    def _merge_stored(key: str, default: Any, stored: Any) -> Any:
        if key == "ai_providers":
            merged = _default_providers()
            for provider, fields in (stored or {}).items():
                merged.setdefault(provider, {}).update(fields)
            return merged
        if key == "webhook_rate_limit":
            return {**default, **(stored or {})}
        return stored

    async def internal_get(self, session: AsyncSession, key: str) -> Any:
        from datamachine_mcp.storage.models import Setting

        row = await session.get(Setting, key)
        return None if row is None else row.value

    async def internal_set(self, session: AsyncSession, key: str, value: Any, *, at: datetime | None = None) -> None:
        """Write an internal key (not in SETTING_KEYS, never listed), e.g. the last retention run, as of ``at``."""
        # an upsert: two processes writing the same key never collide on its primary key
        now = at or utcnow()
        stmt = _insert(session).values(key=key, value=value, is_secret=False, updated_at=now)
        await session.execute(
            stmt.on_conflict_do_update(index_elements=["key"], set_={"value": stmt.excluded.value, "updated_at": now})
        )

    async def internal_claim(
        self, session: AsyncSession, key: str, value: Any, *, at: datetime, unless_after: datetime
    ) -> bool:
        """Write an internal key as of ``at`` unless it was written after ``unless_after``; True when this call wrote it.

        One statement, so of several processes racing for the same key exactly one wins: the engine's
        once-a-day jobs (retention) run on one process even when several start together.
        """
        now = at
        from datamachine_mcp.storage.models import Setting

        stmt = _insert(session).values(key=key, value=value, is_secret=False, updated_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=["key"],
            set_={"value": stmt.excluded.value, "updated_at": now},
            where=Setting.updated_at <= unless_after,
        ).returning(Setting.key)
        return (await session.execute(stmt)).first() is not None

    def decrypt_api_key(self, snap: Snapshot, provider: str) -> str | None:
        value = snap["ai_providers"].get(provider, {}).get("api_key")
        if value is None:
            return None
        return self.box.decrypt(value, f"setting:ai_providers.{provider}.api_key") if is_envelope(value) else value

    async def update(
        self, session: AsyncSession, changes: Mapping[str, Any], *, user_id: int | None
    ) -> tuple[list[str], dict[str, Any]]:
        """Validate, clamp and store ``changes``. Returns (updated keys, adjusted values)."""
        from datamachine_mcp.storage.models import Setting

        current = await self.snapshot(session, fresh=True)
        adjusted: dict[str, Any] = {}
        to_store: dict[str, Any] = {}
        for key, value in changes.items():
            if key not in SETTING_KEYS:
                raise SettingError(key, f"Unknown setting '{key}'. Valid settings: {', '.join(sorted(SETTING_KEYS))}.")
            to_store[key] = self._validate(key, value, current, adjusted)
        now = utcnow()
        updated_keys: list[str] = []
        for key, value in to_store.items():
            row = await session.get(Setting, key)
            secret = key == "ai_providers" and any(
                is_envelope(f.get("api_key")) for f in value.values() if isinstance(f, dict)
            )
            if row is None:
                session.add(Setting(key=key, value=value, is_secret=secret, updated_at=now, updated_by_user_id=user_id))
                updated_keys.append(key)
            elif row.value != value or row.is_secret != secret:
                row.value = value
                row.is_secret = secret
                row.updated_at = now
                row.updated_by_user_id = user_id
                updated_keys.append(key)
        self.invalidate()
        return updated_keys, adjusted

    def _validate(self, key: str, value: Any, current: Snapshot, adjusted: dict[str, Any]) -> Any:
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
            return self._validate_rate_limit(value, current, adjusted)
        if key == "ai_providers":
            return self._validate_providers(value, current)
        raise SettingError(key, f"Unknown setting '{key}'")  # pragma: no cover - SETTING_KEYS guards

    @staticmethod
    def _validate_rate_limit(value: Any, current: Snapshot, adjusted: dict[str, Any]) -> dict[str, int]:
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

    def _validate_providers(self, value: Any, current: Snapshot) -> dict[str, Any]:
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
            defaults = _default_providers()[provider]
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
                        target[field] = self.box.encrypt(raw, f"setting:{path}")
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
            defaults = _default_providers().get(provider, {})
            diff = {f: v for f, v in fields.items() if defaults.get(f) != v}
            if diff:
                result[provider] = diff
        return result
