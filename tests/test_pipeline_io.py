"""export-pipelines and import-pipelines: the CSV format, secrets, round trips and all-or-nothing imports."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from datamachine_mcp.server.bootstrap import ProcessConfig, open_runtime
from tests.conftest import call, connect, count, fail, log_rows, table_rows
from tests.test_pipelines import (
    FEED,
    HOOK,
    USER2,
    add_flow,
    denied,
    get_pipeline,
    grant,
    make_agent,
    make_pipeline,
    unchanged,
)

pytestmark = pytest.mark.anyio
csv.field_size_limit(10 * 1024 * 1024)  # the tests parse documents with very long fields

# JSON-escaped and CSV-quoted this is one field of ~150 000 characters (beyond the csv module's default limit).
LONG_PROMPT = 'Line one\nline "two"' + '"' * 49000
HEADER = "pipeline_id,pipeline_name,step_position,step_type,step_config,flow_id,flow_name,settings"


def rows(doc: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(doc, newline="")))


def normalized(doc: str) -> list[list[Any]]:
    """The document modulo ids: pipeline and flow ids by order of appearance, step ids dropped."""
    pids: dict[str, int] = {}
    fids: dict[str, int] = {}
    out = []
    header, *body = rows(doc)
    assert ",".join(header) == HEADER
    for r in body:
        config = json.loads(r[4]) if r[4] else None
        if config is not None:
            config.pop("pipeline_step_id")
        out.append(
            [
                pids.setdefault(r[0], len(pids)),
                r[1],
                r[2],
                r[3],
                config,
                fids.setdefault(r[5], len(fids)) if r[5] else "",
                r[6],
                json.loads(r[7]) if r[7] else None,
            ]
        )
    return out


async def build_library(client, suffix: str = "") -> list[int]:
    """Two pipelines with several differently configured flows (all manual, as imports create them)."""
    news = await make_pipeline(client, f"News{suffix}", flow_config={"flow_name": "Main"})
    pid = news["pipeline_id"]
    await call(
        client,
        "add-pipeline-step",
        {"pipeline_id": pid, "step_type": "approval", "step_config": {"label": "Review"}},
    )
    await add_flow(
        client,
        pid,
        "Drain, with review",
        step_configs={
            "fetch": {
                "handler_slugs": ["http_json"],
                "handler_configs": {"http_json": {"url": FEED, "items_path": "data"}},
            },
            "ai": {"user_message": "Second prompt", "queue_mode": "drain"},
            "approval": {"flow_step_settings": {"description": "Check it", "timeout_hours": 4}},
        },
    )
    await add_flow(client, pid, "Bare")  # no settings on any step: still exported
    digest = await call(
        client,
        "create-pipeline",
        {
            "pipeline_name": f'Digest, "weekly"{suffix}',
            "steps": [
                {"step_type": "fetch", "handler_slug": "rss", "handler_config": {"feed_url": FEED}},
                {"step_type": "ai", "system_prompt": LONG_PROMPT, "temperature": 0.3},
                {
                    "step_type": "publish",
                    "handler_slug": "wordpress",
                    "handler_config": {
                        "site_url": "https://blog.example",
                        "username": "bot",
                        "application_password": "pw",
                    },
                },
            ],
            "flow_config": {"flow_name": "Weekly"},
        },
    )
    return [pid, digest["pipeline_id"]]


# --- export-pipelines ---------------------------------------------------------------------------


async def test_export_format_and_redaction(runtime, owner):
    pid, digest = await build_library(owner)
    out = await call(owner, "export-pipelines", {"pipeline_ids": [digest, pid]})
    assert (out["count"], out["format"]) == (2, "csv")
    doc = out["data"]
    assert doc.startswith(HEADER + "\n") and "\r" not in doc and doc.endswith("\n")
    table = rows(doc)
    assert all(len(r) == 8 for r in table)
    news = [r for r in table[1:] if r[0] == str(pid)]
    structure = [r for r in news if r[3]]
    assert [(r[2], r[3]) for r in structure] == [("0", "fetch"), ("1", "ai"), ("2", "publish"), ("3", "approval")]
    assert all(r[5] == r[6] == r[7] == "" for r in structure)
    assert json.loads(structure[1][4])["system_prompt"] == "You write."
    assert json.loads(structure[3][4])["label"] == "Review"
    flow_rows = [r for r in news if r[5]]
    assert all(r[3] == r[4] == "" for r in flow_rows)
    main, drain, bare = (
        (await get_pipeline(owner, pid))["flows"][0]["flow_id"],
        (await get_pipeline(owner, pid))["flows"][1]["flow_id"],
        (await get_pipeline(owner, pid))["flows"][2]["flow_id"],
    )
    by_flow = {(int(r[5]), int(r[2])): json.loads(r[7]) for r in flow_rows}
    assert by_flow[(main, 0)] == {
        "handler_slugs": ["rss"],
        "handler_configs": {"rss": {"feed_url": FEED, "max_items": 3}},
    }
    assert [q["prompt"] for q in by_flow[(main, 1)]["prompt_queue"]] == ["Summarise it"]
    assert by_flow[(main, 2)] == {"handler_slugs": ["webhook"], "handler_configs": {"webhook": {"url": HOOK}}}
    assert (main, 3) not in by_flow  # an approval step without settings has no flow row
    assert by_flow[(drain, 1)]["queue_mode"] == "drain"
    assert by_flow[(drain, 3)] == {"flow_step_settings": {"description": "Check it", "timeout_hours": 4}}
    assert by_flow[(bare, 0)] == {} and [k for k in by_flow if k[0] == bare] == [(bare, 0)]
    assert next(r[6] for r in flow_rows if int(r[5]) == drain) == "Drain, with review"
    # secrets never leave: listed, not exported
    assert "s3cret" not in doc and "__encrypted__" not in doc and '"pw"' not in doc
    weekly = (await get_pipeline(owner, digest))["flows"][0]["flow_id"]
    assert sorted(out["redacted_fields"]) == sorted(
        [
            f"pipeline {pid} / flow {main} / step 2: webhook.secret",
            f"pipeline {digest} / step 2: wordpress.application_password",
            f"pipeline {digest} / flow {weekly} / step 2: wordpress.application_password",
        ]
    )
    digest_rows = [r for r in table[1:] if r[0] == str(digest)]
    assert digest_rows[0][1] == 'Digest, "weekly"'  # RFC 4180 quoting of comma and quotes
    assert '"Digest, ""weekly"""' in doc
    # pipeline order is by id whatever the input order
    assert [r[0] for r in table[1:]] == sorted((r[0] for r in table[1:]), key=int)
    # the default exports every readable pipeline; a read writes nothing
    before = await table_rows(runtime)
    assert (await call(owner, "export-pipelines", {}))["data"] == doc
    assert await table_rows(runtime) == before


async def test_export_errors_and_scoping(runtime, owner):
    bot = await make_agent(owner)
    theirs = (await make_pipeline(owner, "Bot's", agent_id=bot))["pipeline_id"]
    async with connect(runtime, USER2) as c:
        mine = (await call(c, "create-pipeline", {"pipeline_name": "Mine", "steps": [{"step_type": "ai"}]}))[
            "pipeline_id"
        ]
        out = await call(c, "export-pipelines", {})
        assert out["count"] == 1 and {r[1] for r in rows(out["data"])[1:]} == {"Mine"}
        err = await fail(c, "export-pipelines", {"pipeline_ids": [mine, 998, 999]}, "pipeline_not_found")
        assert err["data"]["pipeline_ids"] == [998, 999]
        await denied(runtime, c, "export-pipelines", {"pipeline_ids": [mine, theirs]})
        await grant(owner, bot, 2, "viewer")
        assert (await call(c, "export-pipelines", {"pipeline_ids": [theirs]}))["count"] == 1
    for args, field in (
        ({"format": "json"}, "format"),
        ({"pipeline_ids": [0]}, "pipeline_ids.0"),
        ({"pipeline_ids": list(range(1, 502))}, "pipeline_ids"),
    ):
        err = await unchanged(runtime, owner, "export-pipelines", args, "invalid_input")
        assert err["data"]["errors"][0]["field"] == field
    empty = await call(owner, "export-pipelines", {"pipeline_ids": []})
    assert (empty["data"], empty["count"]) == (HEADER + "\n", 0)


# --- import-pipelines ---------------------------------------------------------------------------


async def test_export_delete_import_export_round_trip(runtime, owner):
    ids = await build_library(owner)
    # a pipeline without steps (one marker row) whose name needs RFC 4180 quoting for CR and LF
    await call(owner, "create-pipeline", {"pipeline_name": "Step\rless\nname"})
    first = (await call(owner, "export-pipelines", {}))["data"]
    for pid in ids:
        await call(owner, "delete-pipeline", {"pipeline_id": pid})
    stepless = (await call(owner, "get-pipelines", {"output_mode": "ids"}))["pipelines"]
    await call(owner, "delete-pipeline", {"pipeline_id": stepless[0]})
    assert await count(runtime, "datamachine_pipelines") == 0

    csv.field_size_limit(131072)  # the csv module's default: the import must cope with longer fields itself
    out = await call(owner, "import-pipelines", {"data": first})
    assert out["count"] == 3 and len(out["imported"]) == 3 and out["skipped"] == []
    assert out["flows_created"] == 5  # 3 + 1 + "Default Flow" for the stepless pipeline
    # the secrets the export removed are reported as still needed
    assert any("wordpress" in w and "application_password" in w for w in out["warnings"])
    audit = [r for r in await log_rows(runtime) if r["message"].startswith("import-pipelines")]
    assert len(audit) == 1
    second = (await call(owner, "export-pipelines", {}))["data"]
    expected = normalized(first)
    # the stepless pipeline had no flow; the import gave it "Default Flow"
    expected.append(
        [2, "Step\rless\nname", "", "", None, len({r[5] for r in expected if r[5] != ""}), "Default Flow", {}]
    )
    assert normalized(second) == expected
    imported_news = await get_pipeline(owner, out["imported"][0])
    assert [f["flow_name"] for f in imported_news["flows"]] == ["Main", "Drain, with review", "Bare"]
    assert all(f["scheduling_config"] == {"interval": "manual"} for f in imported_news["flows"])


def unmasked(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if v != "********"}


def shape(pipeline: dict[str, Any]) -> dict[str, Any]:
    """get-pipelines output modulo ids and timestamps (secrets dropped: exports never carry them)."""
    steps = sorted(pipeline["pipeline_config"].values(), key=lambda s: s["execution_order"])
    order = {s["pipeline_step_id"]: s["execution_order"] for s in steps}

    def flow_step(entry: dict[str, Any]) -> dict[str, Any]:
        out = {
            k: v for k, v in entry.items() if k not in ("flow_step_id", "pipeline_step_id", "pipeline_id", "flow_id")
        }
        out["handler_configs"] = {s: unmasked(c) for s, c in (entry.get("handler_configs") or {}).items()}
        return out

    return {
        "pipeline_name": pipeline["pipeline_name"],
        "step_count": pipeline["step_count"],
        "flow_count": pipeline["flow_count"],
        "steps": [
            {
                **{k: v for k, v in s.items() if k != "pipeline_step_id"},
                **({"handler_config": unmasked(s["handler_config"])} if "handler_config" in s else {}),
            }
            for s in steps
        ],
        "flows": [
            {
                "flow_name": f["flow_name"],
                "scheduling_config": f["scheduling_config"],
                "steps": [
                    flow_step(e) for e in sorted(f["flow_config"].values(), key=lambda e: order[e["pipeline_step_id"]])
                ],
            }
            for f in pipeline["flows"]
        ],
    }


async def test_import_from_another_database(runtime, owner, tmp_path: Path):
    other = await open_runtime(
        ProcessConfig(db=str(tmp_path / "other" / "dm.db"), data_dir=tmp_path / "other", toolsets=None)
    )
    try:
        async with connect(other) as theirs:
            # a few pipelines first, so ids differ between the two databases
            for name in ("pad-1", "pad-2"):
                await call(theirs, "create-pipeline", {"pipeline_name": name})
            ids = await build_library(theirs)
            exported = await call(theirs, "export-pipelines", {"pipeline_ids": ids})
            source = [shape(await get_pipeline(theirs, pid)) for pid in ids]
    finally:
        await other.db.dispose()
    out = await call(owner, "import-pipelines", {"data": exported["data"]})
    assert out["count"] == 2 and out["flows_created"] == 4
    here = [shape(await get_pipeline(owner, pid)) for pid in out["imported"]]
    assert here == source
    assert out["imported"] == [1, 2]


async def test_import_ownership_and_conflicts(runtime, owner):
    bot = await make_agent(owner)
    doc = (
        await call(owner, "export-pipelines", {"pipeline_ids": [(await make_pipeline(owner, "Alpha"))["pipeline_id"]]})
    )["data"]
    into_bot = await call(owner, "import-pipelines", {"data": doc, "agent_id": bot})
    row = await get_pipeline(owner, into_bot["imported"][0])
    assert row["agent_id"] == bot and [f["agent_id"] for f in row["flows"]] == [bot]
    # same name for the same owner: skipped (nothing written, no audit), or created on request
    before = await table_rows(runtime)
    skipped = await call(owner, "import-pipelines", {"data": doc, "agent_id": bot})
    assert skipped["skipped"] == [{"pipeline_name": "Alpha", "existing_pipeline_id": into_bot["imported"][0]}]
    assert (skipped["imported"], skipped["count"], skipped["flows_created"]) == ([], 0, 0)
    assert await table_rows(runtime) == before
    again = await call(owner, "import-pipelines", {"data": doc, "agent_id": bot, "on_conflict": "create"})
    assert again["count"] == 1 and again["imported"][0] != into_bot["imported"][0]

    await grant(owner, bot, 2, "operator")
    async with connect(runtime, USER2) as c:
        await denied(runtime, c, "import-pipelines", {"data": doc, "agent_id": bot})
        mine = await call(c, "import-pipelines", {"data": doc})  # Alpha exists for user 1, not for user 2
        row = await get_pipeline(c, mine["imported"][0])
        assert (row["user_id"], row["agent_id"]) == (2, None)
    await unchanged(runtime, owner, "import-pipelines", {"data": doc, "agent_id": 99}, "agent_not_found")
    await call(owner, "update-agent", {"agent_id": bot, "status": "inactive"})
    await unchanged(runtime, owner, "import-pipelines", {"data": doc, "agent_id": bot}, "agent_inactive")


async def test_pipeline_without_flow_rows_gets_default_flow(owner):
    doc = HEADER + "\n" + 'x,Solo,0,ai,"{""label"":""Think"",""custom"":1}",,,\n'
    out = await call(owner, "import-pipelines", {"data": doc})
    row = await get_pipeline(owner, out["imported"][0])
    assert [f["flow_name"] for f in row["flows"]] == ["Default Flow"]
    [step] = row["pipeline_config"].values()
    assert (step["label"], step["custom"], step["execution_order"]) == ("Think", 1, 0)


def doc_with(*lines: str) -> str:
    return HEADER + "\n" + "".join(line + "\n" for line in lines)


GOOD = '7,P,0,fetch,"{""label"":""F""}",,,'


@pytest.mark.parametrize(
    ("data", "code", "row", "fragment"),
    [
        ("", "invalid_import_data", 0, "data is required"),
        ("   \n", "invalid_import_data", 0, "data is required"),
        (
            "pipeline_id,name\n1,P\n",
            "invalid_import_data",
            0,
            "CSV header does not match the Data Machine pipeline format",
        ),
        (doc_with(GOOD, "7,P,1,ai,{not json},,,"), "invalid_import_data", 2, "step_config is not valid JSON"),
        (doc_with(GOOD, '7,P,1,ai,"[1]",,,'), "invalid_import_data", 2, "must be a JSON object"),
        (doc_with(GOOD, "7,P,1,scrape,,,,"), "invalid_import_data", 2, "unknown step_type 'scrape'"),
        (doc_with(GOOD, '7,P,3,,,9,F,"{}"'), "invalid_import_data", 2, "has no structure row"),
        (doc_with(GOOD, "7,P,0,ai,,,,"), "invalid_import_data", 2, "appears twice"),
        (doc_with(GOOD, "7,P,x,ai,,,,"), "invalid_import_data", 2, "not a non-negative integer"),
        (doc_with(GOOD, "7,,1,ai,,,,"), "invalid_import_data", 2, "pipeline_name is empty"),
        (doc_with(GOOD, "7,P,1,ai"), "invalid_import_data", 2, "expected 8 columns"),
        (doc_with(GOOD, '7,P,0,,,9,F,"{""colour"":1}"'), "invalid_import_data", 2, "unknown settings key"),
        (doc_with(GOOD, '7,P,0,,,9,F,"{""queue_mode"":""often""}"'), "invalid_import_data", 2, "queue_mode"),
        (doc_with('7,P,0,fetch,"{""handler_slug"":""nope""}",,,'), "handler_not_found", 1, "nope"),
        (doc_with(GOOD, '7,P,0,,,9,F,"{""handler_slugs"":[""nope""]}"'), "handler_not_found", 2, "nope"),
        (doc_with(GOOD, '7,P,0,,,9,F,"{""handler_slugs"":[""webhook""]}"'), "invalid_handler", 2, "webhook"),
        (
            doc_with(
                GOOD, '7,P,0,,,9,F,"{""handler_slugs"":[""rss""],""handler_configs"":{""rss"":{""max_items"":-4}}}"'
            ),
            "invalid_handler_config",
            2,
            "max_items",
        ),
        (
            doc_with('7,P,0,fetch,"{""handler_slug"":""rss"",""handler_config"":{""bogus"":1}}",,,'),
            "invalid_handler_config",
            1,
            "bogus",
        ),
    ],
)
async def test_import_errors_write_nothing(runtime, owner, data, code, row, fragment):
    await call(owner, "create-pipeline", {"pipeline_name": "Existing"})
    # a good pipeline before the bad row: all or nothing
    prefix = doc_with('1,Good,0,ai,"{}",,,').split("\n", 1)[1] if data.startswith(HEADER) else ""
    if prefix:
        data = HEADER + "\n" + prefix + data.split("\n", 1)[1]
        row += 1
    err = await unchanged(runtime, owner, "import-pipelines", {"data": data}, code)
    assert err["data"]["row"] == row, err
    assert fragment in err["message"], err


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ({}, "data"),
        ({"data": 5}, "data"),
        ({"data": "x", "format": "xml"}, "format"),
        ({"data": "x", "on_conflict": "merge"}, "on_conflict"),
        ({"data": "x", "agent_id": 0}, "agent_id"),
    ],
)
async def test_import_invalid_input(runtime, owner, args, field):
    err = await unchanged(runtime, owner, "import-pipelines", args, "invalid_input")
    assert err["data"]["errors"][0]["field"] == field
