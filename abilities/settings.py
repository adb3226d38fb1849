"""Settings toolset: global runtime settings (docs/storage.md, Settings)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from datamachine_mcp.abilities.context import AbilityContext
from datamachine_mcp.abilities.errors import AbilityError
from datamachine_mcp.abilities.registry import ability
from datamachine_mcp.abilities.schema import Input, Output, ts
from datamachine_mcp.storage.settings_schema import SETTING_KEYS, SettingError, Snapshot, default_value


class NoInput(Input):
    pass


def _defaults(snap: Snapshot) -> dict[str, Any]:
    defaults = Snapshot({k: default_value(k) for k in SETTING_KEYS}, {}, snap.data_dir)
    return defaults.masked()


class GetSettingsOut(Output):
    settings: dict[str, Any] = Field(description="Every setting with its current value (API keys masked)")
    defaults: dict[str, Any] = Field(description="The same keys with their default values")
    updated_at: dict[str, str] = Field(description="When each stored key was last changed (ISO 8601 UTC)")


@ability(
    "get-settings",
    toolset="settings",
    level="global_admin",
    read_only=True,
    idempotent=True,
    description=("Get server settings (API keys masked)."),
)
async def get_settings(ctx: AbilityContext, inp: NoInput) -> GetSettingsOut:
    ctx.access.require_global_admin("Reading settings")
    snap = await ctx.runtime.settings.snapshot(ctx.session, fresh=True)
    return GetSettingsOut(
        settings=snap.masked(),
        defaults=_defaults(snap),
        updated_at={k: ts(v) or "" for k, v in snap.updated_at.items()},
    )


class UpdateSettingsIn(Input):
    settings: dict[str, Any] = Field(
        min_length=1,
        max_length=50,
        description=("Keys to change"),
    )


class UpdateSettingsOut(Output):
    updated_keys: list[str] = Field(description="Keys whose stored value changed")
    adjusted: dict[str, Any] = Field(description="Values clamped into their range: {key: applied value}")
    settings: dict[str, Any] = Field(description="All settings after the change (as get-settings)")
    message: str = Field(description="Human-readable result")


@ability(
    "update-settings",
    toolset="settings",
    level="global_admin",
    destructive=True,
    idempotent=True,
    description="Change server settings (global admins).",
)
async def update_settings(ctx: AbilityContext, inp: UpdateSettingsIn) -> UpdateSettingsOut:
    ctx.access.require_global_admin("Changing settings")
    try:
        updated, adjusted = await ctx.runtime.settings.update(ctx.session, inp.settings, user_id=ctx.principal.user_id)
    except SettingError as err:
        # data {key, message}; "message" cannot be a keyword of AbilityError.
        error = AbilityError("invalid_setting", err.message, key=err.key)
        error.data["message"] = err.message
        raise error from None
    await ctx.session.flush()
    snap = await ctx.runtime.settings.snapshot(ctx.session, fresh=True)
    if updated:
        # Names only: values of secret keys never reach the log.
        await ctx.audit(f"settings changed: {', '.join(updated)}", target=("settings", "global"), changes=updated)
    return UpdateSettingsOut(
        updated_keys=updated,
        adjusted=adjusted,
        settings=snap.masked(),
        message="Settings saved successfully.",
    )
