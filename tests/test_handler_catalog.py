"""Step types and handlers as tools: get-step-types, get-handlers, get-handler-config-fields,
validate-handler (docs/engine.md, Step types)."""

from __future__ import annotations

import pytest

from datamachine_mcp.abilities.access import Principal
from datamachine_mcp.engine.catalog import HANDLERS, STEP_TYPES
from tests.conftest import call, connect, fail, table_rows
from tests.test_pipelines import unchanged

pytestmark = pytest.mark.anyio

# A read-only token of a user with no agent at all: "any" tools still answer.
NOBODY = Principal(user_id=42, capabilities=frozenset({"read"}), transport="http")


async def test_get_step_types(runtime, owner):
    out = await call(owner, "get-step-types", {})
    assert list(out["step_types"]) == ["fetch", "ai", "publish", "update", "approval", "webhook_gate", "system_task"]
    assert out["count"] == 7
    fetch, ai, publish = (out["step_types"][k] for k in ("fetch", "ai", "publish"))
    assert (fetch["uses_handler"], fetch["multi_handler"], fetch["queue_slot"]) == (True, False, "config_patch_queue")
    assert (ai["uses_handler"], ai["queue_slot"], ai["settings_fields"]) == (False, "prompt_queue", {})
    assert (publish["multi_handler"], publish["queue_slot"]) == (True, None)
    approval = out["step_types"]["approval"]["settings_fields"]
    assert set(approval) == {"description", "timeout_hours", "on_reject", "notify_url"}
    assert approval["on_reject"] == {
        "type": "string",
        "required": False,
        "default": "skip",
        "secret": False,
        "description": "What a rejection does to the job",
        "enum": ["skip", "fail"],
    }
    assert approval["timeout_hours"]["min"] == 0 and approval["timeout_hours"]["max"] == 8760
    assert out["step_types"]["system_task"]["settings_fields"]["task_type"]["required"] is True
    one = await call(owner, "get-step-types", {"step_type_slug": " approval "})
    assert list(one["step_types"]) == ["approval"] and one["count"] == 1
    assert await call(owner, "get-step-types", {"step_type_slug": "teleport"}) == {"step_types": {}, "count": 0}
    await unchanged(runtime, owner, "get-step-types", {"step_type_slug": " "}, "step_type_slug_invalid")
    err = await unchanged(runtime, owner, "get-step-types", {"step_type_slug": 3}, "invalid_input")
    assert err["data"]["errors"][0]["field"] == "step_type_slug"


async def test_get_handlers(runtime, owner):
    out = await call(owner, "get-handlers", {})
    assert list(out["handlers"]) == ["rss", "http_json", "files", "webhook_payload", "webhook", "wordpress"]
    assert (out["count"], out["step_type"]) == (6, None)
    rss = out["handlers"]["rss"]
    assert rss == {
        "label": "RSS / Atom feed",
        "description": HANDLERS["rss"].description,
        "step_types": ["fetch"],
        "field_count": 5,  # feed_url + the four common fetch fields
        "supports_test": True,
    }
    assert out["handlers"]["webhook"]["supports_test"] is False
    assert out["handlers"]["files"]["step_types"] == ["fetch", "publish", "update"]

    fetchers = await call(owner, "get-handlers", {"step_type": "fetch"})
    assert list(fetchers["handlers"]) == ["rss", "http_json", "files", "webhook_payload"]
    assert fetchers["step_type"] == "fetch"
    # files for publish: its publish fields, without the fetch-only and common fetch fields
    publishers = await call(owner, "get-handlers", {"step_type": "publish"})
    assert list(publishers["handlers"]) == ["files", "webhook", "wordpress"]
    assert publishers["handlers"]["files"]["field_count"] == len(HANDLERS["files"].fields_for("publish")) == 4
    assert (await call(owner, "get-handlers", {"step_type": "ai"}))["handlers"] == {}

    one = await call(owner, "get-handlers", {"handler_slug": "wordpress", "step_type": "fetch"})
    assert list(one["handlers"]) == ["wordpress"] and one["step_type"] is None  # step_type ignored
    assert await call(owner, "get-handlers", {"handler_slug": "gopher"}) == {
        "handlers": {},
        "count": 0,
        "step_type": None,
    }
    await unchanged(runtime, owner, "get-handlers", {"handler_slug": ""}, "handler_slug_invalid")
    err = await unchanged(runtime, owner, "get-handlers", {"step_type": ["fetch"]}, "invalid_input")
    assert err["data"]["errors"][0]["field"] == "step_type"


async def test_get_handler_config_fields(runtime, owner):
    rss = await call(owner, "get-handler-config-fields", {"handler_slug": "rss"})
    assert rss["handler_slug"] == "rss"
    assert list(rss["fields"]) == ["feed_url", "max_items", "timeframe_limit", "search", "exclude_keywords"]
    assert rss["fields"]["feed_url"] == {
        "type": "string",
        "required": True,
        "secret": False,
        "description": "Feed URL: http(s), or file:///absolute/path of a feed file inside files_allowed_roots",
    }
    assert rss["fields"]["max_items"] == {
        "type": "integer",
        "required": False,
        "default": 1,
        "secret": False,
        "description": "Items taken per run (0 = unlimited)",
        "min": 0,
        "max": 100,
    }
    wp = (await call(owner, "get-handler-config-fields", {"handler_slug": "wordpress"}))["fields"]
    assert wp["application_password"]["secret"] is True and wp["application_password"]["required"] is True
    assert wp["post_status"]["enum"] == ["draft", "publish", "pending", "private"]
    assert wp["post_id_key"]["description"].endswith("(update steps only)")
    assert "max_items" not in wp  # not a fetch handler
    files = (await call(owner, "get-handler-config-fields", {"handler_slug": "files"}))["fields"]
    assert {"max_items", "pattern", "format", "overwrite"} <= set(files)
    assert files["recursive"]["default"] is False and files["pattern"]["description"].endswith("(fetch steps only)")
    for slug, handler in HANDLERS.items():
        fields = (await call(owner, "get-handler-config-fields", {"handler_slug": slug}))["fields"]
        assert fields == {n: f.public() for n, f in handler.all_fields().items()}

    err = await unchanged(runtime, owner, "get-handler-config-fields", {"handler_slug": "gopher"}, "handler_not_found")
    assert "gopher" in err["message"] and err["data"]["handler_slug"] == "gopher"
    await unchanged(runtime, owner, "get-handler-config-fields", {"handler_slug": "  "}, "handler_slug_required")
    err = await unchanged(runtime, owner, "get-handler-config-fields", {}, "invalid_input")
    assert err["data"]["errors"][0]["field"] == "handler_slug"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"handler_slug": "rss"}, {"valid": True}),
        ({"handler_slug": " rss ", "step_type": "fetch"}, {"valid": True}),
        ({"handler_slug": "files", "step_type": "update"}, {"valid": True}),
        ({"handler_slug": ""}, {"valid": False, "error": "handler_slug is required"}),
        ({"handler_slug": "gopher"}, {"valid": False, "error": "Handler 'gopher' not found"}),
        (
            {"handler_slug": "rss", "step_type": "publish"},
            {"valid": False, "error": "Handler 'rss' not found for step type 'publish'"},
        ),
        (
            {"handler_slug": "rss", "step_type": "teleport"},
            {"valid": False, "error": "Handler 'rss' not found for step type 'teleport'"},
        ),
        ({"handler_slug": "x" * 5000}, {"valid": False, "error": f"Handler '{'x' * 5000}' not found"}),
    ],
)
async def test_validate_handler_never_fails(runtime, owner, args, expected):
    before = await table_rows(runtime)
    assert await call(owner, "validate-handler", args) == expected
    assert await table_rows(runtime) == before


async def test_validate_handler_schema_errors_are_common_codes(runtime, owner):
    err = await unchanged(runtime, owner, "validate-handler", {}, "invalid_input")
    assert err["data"]["errors"][0]["field"] == "handler_slug"


async def test_catalog_tools_need_no_role(runtime):
    async with connect(runtime, NOBODY) as c:
        assert (await call(c, "get-step-types", {}))["count"] == len(STEP_TYPES)
        assert (await call(c, "get-handlers", {}))["count"] == len(HANDLERS)
        assert (await call(c, "get-handler-config-fields", {"handler_slug": "http_json"}))["fields"]["headers"][
            "secret"
        ]
        assert (await call(c, "validate-handler", {"handler_slug": "webhook", "step_type": "publish"}))["valid"]
        # the same read-only token cannot create anything
        await fail(c, "create-pipeline", {"pipeline_name": "x"}, "permission_denied")
