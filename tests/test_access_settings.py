"""Settings that decide access (admin_user_ids, max_agents_per_user, rate limits) take effect in every
process at once, however long other settings stay cached: two runtimes on one database stand for two
server processes (each has its own settings cache)."""

from __future__ import annotations

import pytest

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime
from datamachine_mcp.storage import settings as settings_module
from tests.conftest import call, connect, database_url, fail, mint_token, token_principal

pytestmark = [pytest.mark.anyio, pytest.mark.backends]

USER3 = Principal(user_id=3, transport="http")


@pytest.fixture
async def other_process(runtime, tmp_path, db_backend):
    rt = await open_runtime(ProcessConfig(db=database_url(db_backend, tmp_path), data_dir=tmp_path, toolsets=None))
    try:
        yield rt
    finally:
        await rt.db.dispose()


async def test_access_settings_written_elsewhere_apply_at_once(runtime, other_process, monkeypatch):
    monkeypatch.setattr(settings_module, "CACHE_SECONDS", 3600.0)  # other settings may stay cached for long
    async with connect(runtime, USER3) as user3:
        await call(user3, "create-agent", {"agent_slug": "first"})  # this process now holds a snapshot
        await fail(user3, "create-agent", {"agent_slug": "second"}, "agent_limit_reached")
        async with connect(other_process) as owner_elsewhere:
            await call(owner_elsewhere, "update-settings", {"settings": {"max_agents_per_user": 2}})
        await call(user3, "create-agent", {"agent_slug": "second"})
        async with connect(other_process) as owner_elsewhere:
            await call(owner_elsewhere, "update-settings", {"settings": {"max_agents_per_user": 0}})
        err = await fail(user3, "create-agent", {"agent_slug": "third"}, "agent_limit_reached")
        assert "max_agents_per_user is 0" in err["message"]

    raw = (await mint_token(runtime, user_id=2))["raw_token"]
    assert (await token_principal(runtime, raw)).is_admin is False
    async with connect(other_process) as owner_elsewhere:
        await call(owner_elsewhere, "update-settings", {"settings": {"admin_user_ids": [1, 2]}})
    assert (await token_principal(runtime, raw)).is_admin is True
    async with connect(other_process) as owner_elsewhere:
        await call(owner_elsewhere, "update-settings", {"settings": {"admin_user_ids": [1]}})
    assert (await token_principal(runtime, raw)).is_admin is False
