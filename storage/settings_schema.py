"""Runtime settings' declarations: keys in listing order, defaults, integer bounds, the settings that
decide access, the rejected-write error, and the ``Snapshot`` of effective values (docs/storage.md,
Settings). No database access: the store (``storage.settings``) reads and writes the rows."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamachine_mcp.storage.crypto import mask

# The AI providers: settings hold their configuration; the engine and the tools name them from here.
PROVIDERS = ("openai", "anthropic", "sampling")
PROVIDER_FIELDS: dict[str, tuple[str, ...]] = {
    "openai": ("base_url", "api_key"),
    "anthropic": ("base_url", "api_key", "version"),
}


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


def default_providers() -> dict[str, dict[str, Any]]:
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
    "ai_providers": default_providers,
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
