"""Runtime settings: the store (docs/storage.md, Settings). Keys and defaults are declared in
``storage.settings_schema``, write validation in ``storage.settings_validation``.

A missing row means the default. Writes validate types, clamp ranges (reported back) and
encrypt provider API keys. Readers get a cached snapshot; a write in this process invalidates it,
and other processes' writes are seen after ``CACHE_SECONDS`` - except the settings that decide
access (``ACCESS_KEYS``): a snapshot taken for an access decision checks their rows' ``updated_at``
first, so a change by any process takes effect at once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from datamachine_mcp.storage.crypto import SecretBox, is_envelope
from datamachine_mcp.storage.settings_schema import (
    ACCESS_KEYS,
    SETTING_KEYS,
    SettingError,
    Snapshot,
    default_providers,
    default_value,
)
from datamachine_mcp.storage.settings_validation import validate
from datamachine_mcp.storage.timeutil import utcnow

# SQLAlchemy and the models are imported by the methods that read or write rows: a process that
# serves only its tool list opens a SettingsStore without loading them.
if TYPE_CHECKING:
    from sqlalchemy import Select
    from sqlalchemy.ext.asyncio import AsyncSession

CACHE_SECONDS = 2.0


def _insert(session: AsyncSession) -> Any:
    """The dialect's INSERT construct (both offer ``on_conflict_do_update``)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    from datamachine_mcp.storage.models import Setting

    return pg_insert(Setting) if session.get_bind().dialect.name == "postgresql" else sqlite_insert(Setting)


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
            merged = default_providers()
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
            to_store[key] = validate(key, value, current, adjusted, self.box)
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
