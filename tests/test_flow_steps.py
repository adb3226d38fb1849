"""Flow steps: get-flow-steps, update-flow-step, configure-flow-steps, validate-flow-steps-config.

Flow-step lookup, secrets (docs/storage.md, Secrets at rest) and docs/engine.md, Handler configuration.
"""

from __future__ import annotations

import json

import pytest

from datamachine_mcp.storage.crypto import MASK
from tests.conftest import call, changed_tables, connect, fail, log_rows, table_rows
from tests.test_flows import (
    AI,
    FETCH,
    PUBLISH,
    USER2,
    audits,
    denied,
    invalid_fields,
    make_agent,
    make_flow,
    make_pipeline,
    raw_config,
    unchanged,
)

pytestmark = pytest.mark.anyio

APPROVAL = {"step_type": "approval"}


async def _setup(runtime, owner, steps=(FETCH, AI, PUBLISH), **flow_args):
    pid, psids = await make_pipeline(runtime, steps)
    fid = (await make_flow(owner, pid, **flow_args))["flow_id"]
    return pid, fid, [f"{p}_{fid}" for p in psids]


# --- get-flow-steps ---------------------------------------------------------------------------


async def test_get_flow_steps(runtime, owner):
    pid, fid, ids = await _setup(runtime, owner)
    out = await call(owner, "get-flow-steps", {"flow_id": fid})
    assert (out["flow_id"], out["step_count"]) == (fid, 3)
    assert [s["flow_step_id"] for s in out["steps"]] == ids
    fetch, ai, publish = out["steps"]
    assert (ai["system_prompt"], ai["provider"], ai["model"]) == ("Be brief.", "openai", "gpt-4o-mini")
    assert "system_prompt" not in fetch
    assert publish["handler_configs"]["webhook"]["secret"] == MASK
    one = await call(owner, "get-flow-steps", {"flow_step_id": f"  {ids[1]} ", "flow_id": 999})
    assert (one["flow_id"], one["step_count"], one["steps"]) == (fid, 1, [ai])  # flow_step_id wins
    none = await call(owner, "get-flow-steps", {"flow_step_id": f"{ids[1][: -len(str(fid))]}999"})
    assert none == {"flow_id": None, "steps": [], "step_count": 0}
    none = await call(owner, "get-flow-steps", {"flow_step_id": f"{pid}_0978b49e-a5a1-46e6-ae3a-0bf62ccea60d_{fid}"})
    assert none == {"flow_id": fid, "steps": [], "step_count": 0}
    err = await unchanged(runtime, owner, "get-flow-steps", {"flow_step_id": "  "}, "invalid_flow_step_id")
    assert err["message"] == "flow_step_id must be a non-empty string"
    await unchanged(runtime, owner, "get-flow-steps", {"flow_step_id": "no-underscore"}, "invalid_flow_step_id")
    await unchanged(runtime, owner, "get-flow-steps", {}, "invalid_flow_id")
    await unchanged(runtime, owner, "get-flow-steps", {"flow_id": 999}, "flow_not_found")
    await unchanged(runtime, owner, "get-flow-steps", {"flow_id": "1.0"}, "invalid_input")
    async with connect(runtime, USER2) as c:
        await denied(runtime, c, "get-flow-steps", {"flow_id": fid})
        await denied(runtime, c, "get-flow-steps", {"flow_step_id": ids[0]})


# --- update-flow-step: lookup and inputs --------------------------------------------------------


async def test_update_flow_step_lookup_order(runtime, owner):
    bot = await make_agent(owner, "bot")
    pid, psids = await make_pipeline(runtime, agent_id=bot)
    fid = (await make_flow(owner, pid))["flow_id"]
    fsid = f"{psids[1]}_{fid}"
    args = {"user_message": "hi"}
    err = await unchanged(runtime, owner, "update-flow-step", {"flow_step_id": "", **args}, "invalid_flow_step_id")
    assert err["message"] == "flow_step_id must be a non-empty string"
    await unchanged(
        runtime, owner, "update-flow-step", {"flow_step_id": f"{psids[1]}_x", **args}, "invalid_flow_step_id"
    )
    err = await unchanged(
        runtime, owner, "update-flow-step", {"flow_step_id": f"{psids[1]}_77", **args}, "flow_not_found"
    )
    assert err["data"] == {"flow_id": 77}
    missing = f"{pid}_0978b49e-a5a1-46e6-ae3a-0bf62ccea60d_{fid}"
    err = await unchanged(runtime, owner, "update-flow-step", {"flow_step_id": missing, **args}, "flow_step_not_found")
    assert err["message"] == "Flow step not found in flow config"
    # an unreadable flow is refused before its steps are looked at
    async with connect(runtime, USER2) as c:
        await denied(runtime, c, "update-flow-step", {"flow_step_id": missing, **args})
    err = await unchanged(runtime, owner, "update-flow-step", {"flow_step_id": fsid}, "invalid_flow_step_update")
    assert err["message"] == (
        "At least one of handler_slug, handler_config, handler_configs, add_handler, remove_handler, "
        "flow_step_settings or user_message is required"
    )
    for bad, field in [
        ({"flow_step_id": fsid, "handler_config": ["x"]}, "handler_config"),
        ({"flow_step_id": fsid, "user_message": "x" * 20001}, "user_message"),
        ({"flow_step_id": fsid, "handler_configs": {"rss": 1}}, "handler_configs.rss"),
        ({"flow_step_id": fsid, "user_message": "x", "extra": 1}, "extra"),
        ({"user_message": "x"}, "flow_step_id"),
    ]:
        err = await unchanged(runtime, owner, "update-flow-step", bad, "invalid_input")
        assert field in invalid_fields(err)


# --- update-flow-step: handlers, configs, secrets ----------------------------------------------


async def test_update_flow_step_switches_handlers_and_validates_configs(runtime, owner):
    _, _fid, (fetch, ai, publish) = await _setup(runtime, owner)
    out = await call(
        owner, "update-flow-step", {"flow_step_id": fetch, "handler_config": {"max_items": 4, "search": "ai"}}
    )
    assert out["updated_fields"] == ["handler_config"] and out["validate_only"] is False
    assert out["step"]["handler_configs"] == {
        "rss": {"feed_url": "https://example.com/feed", "max_items": 4, "search": "ai"}
    }
    out = await call(owner, "update-flow-step", {"flow_step_id": fetch, "handler_config": {"search": None}})
    assert out["step"]["handler_configs"]["rss"] == {"feed_url": "https://example.com/feed", "max_items": 4}
    # switching drops the old handler's config and validates the new one, required fields included
    err = await unchanged(
        runtime,
        owner,
        "update-flow-step",
        {"flow_step_id": fetch, "handler_slug": "http_json"},
        "invalid_handler_config",
    )
    assert err["data"]["missing_fields"] == ["url"] and err["data"]["handler_slug"] == "http_json"
    out = await call(
        owner,
        "update-flow-step",
        {"flow_step_id": fetch, "handler_slug": "http_json", "handler_config": {"url": "https://api.example/items"}},
    )
    assert out["step"]["handler_slugs"] == ["http_json"]
    assert out["step"]["handler_configs"] == {"http_json": {"url": "https://api.example/items"}}
    assert out["updated_fields"] == ["handler_slug", "handler_config"]
    err = await unchanged(
        runtime,
        owner,
        "update-flow-step",
        {"flow_step_id": fetch, "handler_config": {"colour": 1}},
        "invalid_handler_config",
    )
    assert err["data"]["unknown_fields"] == ["colour"]
    assert set(err["data"]["field_specs"]) >= {"url", "headers", "max_items"}
    assert err["data"]["field_specs"]["headers"]["secret"] is True
    err = await unchanged(
        runtime,
        owner,
        "update-flow-step",
        {"flow_step_id": fetch, "handler_config": {"max_items": "5", "timeframe_limit": "1_year"}},
        "invalid_handler_config",
    )
    assert [e["field"] for e in err["data"]["field_errors"]] == ["max_items", "timeframe_limit"]
    for args, code in [
        ({"handler_slug": "nope"}, "handler_not_found"),
        ({"handler_slug": "webhook"}, "invalid_handler"),  # a publish handler on a fetch step
        ({"add_handler": "rss"}, "invalid_handler"),  # fetch holds one handler
        ({"remove_handler": "webhook"}, "invalid_handler"),
        ({"handler_configs": {"rss": {"max_items": 1}}}, "invalid_handler"),
        ({"flow_step_settings": {"description": "x"}}, "invalid_flow_step_update"),
        ({"user_message": "x"}, "invalid_flow_step_update"),
    ]:
        await unchanged(runtime, owner, "update-flow-step", {"flow_step_id": fetch, **args}, code)
    await unchanged(runtime, owner, "update-flow-step", {"flow_step_id": ai, "handler_slug": "rss"}, "invalid_handler")
    await unchanged(
        runtime, owner, "update-flow-step", {"flow_step_id": publish, "add_handler": "nope"}, "handler_not_found"
    )


async def test_update_flow_step_secrets_are_encrypted_masked_kept_and_removed(runtime, owner):
    _, fid, (_fetch, _, publish) = await _setup(runtime, owner)
    await call(owner, "update-flow-step", {"flow_step_id": publish, "handler_config": {"secret": "hunter2-secret"}})
    stored = (await raw_config(runtime, fid))[publish]["handler_configs"]["webhook"]
    envelope = stored["secret"]
    assert set(envelope) == {"__encrypted__"} and envelope["__encrypted__"].startswith("v1:")
    assert runtime.box.decrypt(envelope, "handler:webhook.secret") == "hunter2-secret"
    step = (await call(owner, "get-flow-steps", {"flow_step_id": publish}))["steps"][0]
    assert step["handler_configs"]["webhook"] == {"url": "https://hooks.example/in", "secret": MASK}
    # writing the read config back (mask included) keeps the stored secret
    out = await call(
        owner,
        "update-flow-step",
        {
            "flow_step_id": publish,
            "handler_config": {**step["handler_configs"]["webhook"], "url": "https://b.example/"},
        },
    )
    assert out["step"]["handler_configs"]["webhook"]["secret"] == MASK
    assert (await raw_config(runtime, fid))[publish]["handler_configs"]["webhook"]["secret"] == envelope
    # object-valued secrets are sealed whole
    await call(owner, "update-flow-step", {"flow_step_id": publish, "handler_config": {"headers": {"X-Key": "k1"}}})
    headers = (await raw_config(runtime, fid))[publish]["handler_configs"]["webhook"]["headers"]
    assert runtime.box.decrypt(headers, "handler:webhook.headers") == {"X-Key": "k1"}
    # null removes a secret
    out = await call(owner, "update-flow-step", {"flow_step_id": publish, "handler_config": {"secret": None}})
    assert "secret" not in out["step"]["handler_configs"]["webhook"]
    assert "secret" not in (await raw_config(runtime, fid))[publish]["handler_configs"]["webhook"]
    # the mask with nothing stored is no value: a required secret given only as the mask is missing
    err = await unchanged(
        runtime,
        owner,
        "update-flow-step",
        {
            "flow_step_id": publish,
            "handler_slug": "wordpress",
            "handler_config": {"site_url": "https://wp.example", "username": "ed", "application_password": MASK},
        },
        "invalid_handler_config",
    )
    assert err["data"]["missing_fields"] == ["application_password"]
    # secrets never reach the log
    assert "hunter2-secret" not in json.dumps(await log_rows(runtime)) and "k1" not in json.dumps(
        await log_rows(runtime)
    )
    assert len(await audits(runtime, "update-flow-step")) == 4


async def test_update_flow_step_multi_handler_steps_and_files_roots(runtime, owner, tmp_path):
    steps = (FETCH, AI, {"step_type": "publish", "handler_slug": "webhook"})
    _, _fid, (_, _, publish) = await _setup(runtime, owner, steps)
    inside = str(tmp_path / "files" / "out")
    outside = str(tmp_path / "elsewhere")
    err = await unchanged(
        runtime,
        owner,
        "update-flow-step",
        {"flow_step_id": publish, "add_handler": "files", "add_handler_config": {"directory": outside}},
        "invalid_handler_config",
    )
    assert err["data"]["field_errors"][0]["field"] == "directory"
    assert "files_allowed_roots" in err["data"]["field_errors"][0]["message"]
    for template in ("../escape.md", "/abs.md", "a\\b.md"):
        err = await unchanged(
            runtime,
            owner,
            "update-flow-step",
            {
                "flow_step_id": publish,
                "add_handler": "files",
                "add_handler_config": {"directory": inside, "filename_template": template},
            },
            "invalid_handler_config",
        )
        assert err["data"]["field_errors"][0]["field"] == "filename_template", template
    out = await call(
        owner,
        "update-flow-step",
        {"flow_step_id": publish, "add_handler": "files", "add_handler_config": {"directory": inside}},
    )
    assert out["step"]["handler_slugs"] == ["webhook", "files"]
    assert out["updated_fields"] == ["add_handler"]
    # the untouched webhook handler still lacks its url: saved, with a warning
    assert len(out["warnings"]) == 1 and "url" in out["warnings"][0]
    # a wider root makes the outside directory acceptable
    await call(owner, "update-settings", {"settings": {"files_allowed_roots": [str(tmp_path)]}})
    out = await call(
        owner,
        "update-flow-step",
        {"flow_step_id": publish, "handler_configs": {"files": {"directory": outside, "format": "json"}}},
    )
    assert out["step"]["handler_configs"]["files"] == {"directory": outside, "format": "json"}
    out = await call(owner, "update-flow-step", {"flow_step_id": publish, "remove_handler": "webhook"})
    assert out["step"]["handler_slugs"] == ["files"] and list(out["step"]["handler_configs"]) == ["files"]
    assert out["warnings"] == []
    # handler_slug already on the step is targeted, not switched to
    out = await call(
        owner,
        "update-flow-step",
        {"flow_step_id": publish, "handler_slug": "files", "handler_config": {"overwrite": True}},
    )
    assert out["step"]["handler_slugs"] == ["files"] and out["step"]["handler_configs"]["files"]["overwrite"] is True


async def test_update_flow_step_settings_user_message_validate_only_and_no_op(runtime, owner):
    _, _fid, (approval, ai, publish) = await _setup(runtime, owner, (APPROVAL, AI, {"step_type": "publish"}))
    out = await call(
        owner,
        "update-flow-step",
        {"flow_step_id": approval, "flow_step_settings": {"description": "Check it", "timeout_hours": 4}},
    )
    assert out["step"]["flow_step_settings"] == {"description": "Check it", "timeout_hours": 4}
    out = await call(
        owner, "update-flow-step", {"flow_step_id": approval, "flow_step_settings": {"timeout_hours": None}}
    )
    assert out["step"]["flow_step_settings"] == {"description": "Check it"}
    await unchanged(
        runtime,
        owner,
        "update-flow-step",
        {"flow_step_id": approval, "flow_step_settings": {"on_reject": "explode"}},
        "invalid_step_settings",
    )
    await unchanged(
        runtime,
        owner,
        "update-flow-step",
        {"flow_step_id": publish, "handler_config": {"url": "https://x.y/"}},
        "invalid_flow_step_update",
    )  # no handler yet and no handler_slug
    out = await call(owner, "update-flow-step", {"flow_step_id": ai, "user_message": "  First prompt "})
    assert [e["prompt"] for e in out["step"]["prompt_queue"]] == ["First prompt"]
    # validate_only: the effective step, nothing written
    before = await table_rows(runtime)
    preview = await call(
        owner, "update-flow-step", {"flow_step_id": ai, "user_message": "Other", "validate_only": True}
    )
    assert preview["validate_only"] is True and preview["step"]["prompt_queue"][0]["prompt"] == "Other"
    assert await table_rows(runtime) == before
    # the same change again is a no-op (the same one prompt keeps its entry)
    assert (await call(owner, "update-flow-step", {"flow_step_id": ai, "user_message": "First prompt"}))[
        "updated_fields"
    ] == []
    assert await table_rows(runtime) == before
    same = await call(
        owner, "update-flow-step", {"flow_step_id": approval, "flow_step_settings": {"description": "Check it"}}
    )
    assert same["updated_fields"] == [] and "nothing changed" in same["message"]
    assert await table_rows(runtime) == before
    out = await call(owner, "update-flow-step", {"flow_step_id": ai, "user_message": ""})
    assert out["step"]["prompt_queue"] == []


# --- configure-flow-steps ---------------------------------------------------------------------


async def test_configure_pipeline_scope_skips_flows_without_admin(runtime, owner):
    mine = await make_agent(owner, "mine", (2, "admin"))
    theirs = await make_agent(owner, "theirs", (2, "operator"))
    pid, psids = await make_pipeline(runtime, user_id=0)
    f1 = (await make_flow(owner, pid, agent_id=mine))["flow_id"]
    f2 = (await make_flow(owner, pid, agent_id=mine))["flow_id"]
    f3 = (await make_flow(owner, pid, agent_id=theirs))["flow_id"]
    async with connect(runtime, USER2) as c:
        out = await call(
            c, "configure-flow-steps", {"pipeline_id": pid, "handler_slug": "rss", "handler_config": {"max_items": 9}}
        )
        assert out["mode"] == "pipeline" and out["pipeline_id"] == pid
        assert (out["flows_updated"], out["steps_modified"]) == (2, 2)
        assert out["updated_steps"] == [
            {"flow_id": f, "flow_step_id": f"{psids[0]}_{f}", "changes": ["handler_configs"]} for f in (f1, f2)
        ]
        assert out["skipped"] == [{"flow_id": f3, "reason": "agent_access_denied"}]
        assert out["message"] == "Updated 2 step(s) across 2 flow(s). 1 flow(s) skipped."
    for f, expected in ((f1, 9), (f2, 9), (f3, None)):
        assert (await raw_config(runtime, f))[f"{psids[0]}_{f}"]["handler_configs"]["rss"].get("max_items") == expected
    rows = await audits(runtime, "configure-flow-steps")
    assert len(rows) == 1 and rows[0]["context"]["flow_ids"] == [f1, f2]


async def test_configure_switch_with_field_map_carries_values_and_secrets(runtime, owner):
    steps = (FETCH, AI, PUBLISH)
    pid, fid, (_fetch, ai, publish) = await _setup(runtime, owner, steps)
    out = await call(
        owner,
        "configure-flow-steps",
        {
            "pipeline_id": pid,
            "handler_slug": "webhook",
            "target_handler_slug": "wordpress",
            "field_map": {"url": "site_url", "secret": "application_password"},
            "handler_config": {"username": "editor"},
        },
    )
    assert out["updated_steps"] == [
        {"flow_id": fid, "flow_step_id": publish, "changes": ["handler_slug", "handler_config"]}
    ]
    stored = (await raw_config(runtime, fid))[publish]
    assert stored["handler_slugs"] == ["wordpress"]
    config = stored["handler_configs"]["wordpress"]
    assert (config["site_url"], config["username"]) == ("https://hooks.example/in", "editor")
    # the secret was re-sealed for its new field
    assert runtime.box.decrypt(config["application_password"], "handler:wordpress.application_password") == (
        "pipeline-secret"
    )
    # all_flows + user_message reaches ai steps only
    out = await call(owner, "configure-flow-steps", {"pipeline_id": pid, "all_flows": True, "user_message": "Daily"})
    assert [s["flow_step_id"] for s in out["updated_steps"]] == [ai]
    # a change field that applies to none of the matching steps is reported, not an error
    out = await call(
        owner,
        "configure-flow-steps",
        {"pipeline_id": pid, "all_flows": True, "step_type": "fetch", "flow_step_settings": {"description": "x"}},
    )
    assert out["updated_steps"] == [] and out["warnings"] == ["flow_step_settings applied to no matching step."]


async def test_configure_is_all_or_nothing_and_validate_only_previews(runtime, owner):
    pid, psids = await make_pipeline(runtime)
    f1 = (await make_flow(owner, pid))["flow_id"]
    f2 = (await make_flow(owner, pid))["flow_id"]
    args = {
        "pipeline_id": pid,
        "handler_slug": "rss",
        "handler_config": {"max_items": 3},
        "flow_configs": [{"flow_id": f2, "handler_config": {"max_items": 500}}, {"flow_id": 99, "handler_config": {}}],
    }
    err = await unchanged(runtime, owner, "configure-flow-steps", args, "invalid_handler_config")
    assert [(e["flow_id"], e["flow_step_id"]) for e in err["data"]["errors"]] == [(f2, f"{psids[0]}_{f2}")]
    assert err["data"]["errors"][0]["field_errors"][0]["field"] == "max_items"
    before = await table_rows(runtime)
    preview = await call(owner, "configure-flow-steps", {**args, "validate_only": True})
    assert preview["valid"] is False and preview["mode"] == "validate_only"
    assert [r["flow_id"] for r in preview["would_update"]] == [f1]
    good = {**args, "flow_configs": [{"flow_id": f2, "handler_config": {"max_items": 50}}], "validate_only": True}
    preview = await call(owner, "configure-flow-steps", good)
    assert (preview["valid"], preview["errors"]) == (True, [])
    assert [r["flow_id"] for r in preview["would_update"]] == [f1, f2]
    assert await table_rows(runtime) == before
    out = await call(
        owner,
        "configure-flow-steps",
        {**args, "flow_configs": [{"flow_id": f2, "handler_config": {"max_items": 50}}, {"flow_id": 99}]},
    )
    assert out["skipped"] == [{"flow_id": 99, "reason": "flow_not_in_pipeline"}]
    assert (await raw_config(runtime, f2))[f"{psids[0]}_{f2}"]["handler_configs"]["rss"]["max_items"] == 50
    # the same change again modifies nothing and writes nothing
    before = await table_rows(runtime)
    again = await call(
        owner, "configure-flow-steps", {**args, "flow_configs": [{"flow_id": f2, "handler_config": {"max_items": 50}}]}
    )
    assert (again["steps_modified"], again["updated_steps"]) == (0, [])
    assert await table_rows(runtime) == before


async def test_configure_scope_and_input_errors(runtime, owner):
    empty, _ = await make_pipeline(runtime)
    pid, _ = await make_pipeline(runtime)
    await make_flow(owner, pid)
    change = {"handler_config": {"max_items": 1}}
    for args, code, text in [
        (change, "invalid_configure_scope", "No scope"),
        (
            {"pipeline_id": pid, "global_scope": True, "handler_slug": "rss", **change},
            "invalid_configure_scope",
            "one scope",
        ),
        ({"pipeline_id": pid, **change}, "invalid_configure_scope", "explicit scope required"),
        ({"global_scope": True, **change}, "invalid_configure_scope", "handler_slug"),
        ({"pipeline_id": pid, "all_flows": True}, "invalid_flow_step_update", "No change"),
        ({"pipeline_id": 999, "all_flows": True, **change}, "pipeline_not_found", "999"),
        ({"pipeline_id": empty, "all_flows": True, **change}, "pipeline_has_no_flows", "Pipeline has no flows yet"),
        (
            {"pipeline_id": pid, "all_flows": True, "target_handler_slug": "nope"},
            "handler_not_found",
            "Target handler 'nope' not found",
        ),
        ({"updates": [{"flow_id": 99, "user_message": "x"}]}, "flow_not_found", "99"),
        ({"updates": [{"flow_id": 1}]}, "invalid_flow_step_update", "No change"),
    ]:
        err = await unchanged(runtime, owner, "configure-flow-steps", args, code)
        assert text in err["message"], (args, err)
    err = await unchanged(
        runtime,
        owner,
        "configure-flow-steps",
        {"updates": [{"flow_id": 1, "user_message": "x"}] * 201},
        "invalid_input",
    )
    assert invalid_fields(err) == ["updates"]
    err = await unchanged(
        runtime, owner, "configure-flow-steps", {"pipeline_id": pid, "all_flows": "yes"}, "invalid_input"
    )
    assert invalid_fields(err) == ["all_flows"]


async def test_configure_global_scope_considers_only_administered_flows(runtime, owner):
    mine = await make_agent(owner, "mine", (2, "admin"))
    other = await make_agent(owner, "other", (2, "operator"))
    cold = await make_agent(owner, "cold", (2, "admin"))
    pid, _psids = await make_pipeline(runtime, user_id=0)
    files_pid, _ = await make_pipeline(runtime, [{"step_type": "fetch", "handler_slug": "files"}], user_id=0)
    f_mine = (await make_flow(owner, pid, agent_id=mine))["flow_id"]
    (await make_flow(owner, pid, agent_id=other))["flow_id"]
    f_cold = (await make_flow(owner, pid, agent_id=cold))["flow_id"]
    (await make_flow(owner, files_pid, agent_id=mine))["flow_id"]
    await call(owner, "update-agent", {"agent_slug": "cold", "status": "inactive"})
    async with connect(runtime, USER2) as c:
        out = await call(
            c, "configure-flow-steps", {"global_scope": True, "handler_slug": "rss", "handler_config": {"max_items": 2}}
        )
    assert out["mode"] == "global" and out["pipeline_id"] is None
    assert [r["flow_id"] for r in out["updated_steps"]] == [f_mine]
    assert out["skipped"] == [{"flow_id": f_cold, "reason": "agent_inactive"}]


async def test_configure_updates_scope(runtime, owner):
    bot = await make_agent(owner, "bot", (2, "operator"))
    pid, psids = await make_pipeline(runtime, (FETCH, AI, {"step_type": "publish"}))
    f1 = (await make_flow(owner, pid))["flow_id"]
    f2 = (await make_flow(owner, pid))["flow_id"]
    f3 = (await make_flow(owner, pid, agent_id=bot))["flow_id"]
    out = await call(
        owner,
        "configure-flow-steps",
        {
            "shared_config": {"queue_mode": "drain"},
            "updates": [
                {"flow_id": f1, "step_type": "ai", "user_message": "One"},
                {
                    "flow_id": f2,
                    "step_type": "publish",
                    "handler_slug": "webhook",
                    "handler_config": {"url": "https://two.example/"},
                },
                {"flow_id": f2, "step_type": "ai", "user_message": "Two"},
            ],
        },
    )
    assert out["mode"] == "updates" and out["flows_updated"] == 2
    steps = {(r["flow_id"], r["flow_step_id"]): r["changes"] for r in out["updated_steps"]}
    assert steps[(f1, f"{psids[1]}_{f1}")] == ["queue_mode", "user_message"]
    assert steps[(f2, f"{psids[2]}_{f2}")] == ["handler_slug", "handler_config"]
    c1 = await raw_config(runtime, f1)
    assert c1[f"{psids[1]}_{f1}"]["queue_mode"] == "drain"
    assert c1[f"{psids[0]}_{f1}"]["queue_mode"] == "static"  # shared_config applies only to the matched steps
    c2 = await raw_config(runtime, f2)
    assert c2[f"{psids[2]}_{f2}"]["handler_configs"] == {"webhook": {"url": "https://two.example/"}}
    assert c2[f"{psids[1]}_{f2}"]["prompt_queue"][0]["prompt"] == "Two"
    async with connect(runtime, USER2) as c:
        await denied(runtime, c, "configure-flow-steps", {"updates": [{"flow_id": f3, "user_message": "x"}]})
    err = await unchanged(
        runtime,
        owner,
        "configure-flow-steps",
        {
            "updates": [
                {
                    "flow_id": f1,
                    "step_type": "publish",
                    "handler_slug": "webhook",
                    "handler_config": {"url": "ftp://bad"},
                }
            ]
        },
        "invalid_handler_config",
    )
    assert err["data"]["errors"][0]["flow_step_id"] == f"{psids[2]}_{f1}"


# --- validate-flow-steps-config ---------------------------------------------------------------


async def test_validate_flow_steps_config(runtime, owner):
    bot = await make_agent(owner, "bot", (2, "viewer"))
    pid, psids = await make_pipeline(runtime, agent_id=bot)
    f1 = (await make_flow(owner, pid))["flow_id"]
    f2 = (await make_flow(owner, pid))["flow_id"]
    empty, _ = await make_pipeline(runtime)
    before = await table_rows(runtime)
    async with connect(runtime, USER2) as c:  # a viewer may preview
        out = await call(
            c,
            "validate-flow-steps-config",
            {
                "pipeline_id": pid,
                "handler_slug": "rss",
                "target_handler_slug": "http_json",
                "handler_config": {"url": "https://api.example/"},
            },
        )
    assert (out["valid"], out["flow_count"], out["matching_steps"]) == (True, 2, 2)
    assert out["would_update"] == [
        {"flow_id": f, "flow_step_id": f"{psids[0]}_{f}", "changes": ["handler_slug", "handler_config"]}
        for f in (f1, f2)
    ]
    assert out["validation_errors"] == []
    assert "you cannot change them" in out["warnings"][0]
    out = await call(
        owner,
        "validate-flow-steps-config",
        {
            "pipeline_id": pid,
            "step_type": "fetch",
            "target_handler_slug": "nope",
            "flow_configs": [
                {"flow_id": 99, "handler_config": {}},
                {"flow_id": f2, "handler_config": {"max_items": -1, "bogus": 1}},
            ],
        },
    )
    assert out["valid"] is False
    fields = [(e.get("flow_id"), e.get("field")) for e in out["validation_errors"]]
    assert (None, "target_handler_slug") in fields and (99, None) in fields and (f2, "bogus") in fields
    out = await call(
        owner,
        "validate-flow-steps-config",
        {"pipeline_id": pid, "handler_config": {"max_items": 500}, "handler_slug": "rss"},
    )
    assert out["valid"] is False
    assert {e["flow_id"] for e in out["validation_errors"]} == {f1, f2}
    assert all(e["field"] == "max_items" for e in out["validation_errors"])
    out = await call(owner, "validate-flow-steps-config", {"pipeline_id": empty})
    assert (out["valid"], out["flow_count"], out["validation_errors"]) == (
        False,
        0,
        [{"message": "Pipeline has no flows yet"}],
    )
    assert changed_tables(before, await table_rows(runtime)) == {}  # a read-only tool writes nothing
    await fail(owner, "validate-flow-steps-config", {"pipeline_id": 999}, "pipeline_not_found")
    await fail(owner, "validate-flow-steps-config", {}, "invalid_input")
