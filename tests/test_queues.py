"""Prompt queues: queue-add, queue-list, queue-remove, queue-clear, queue-mode (docs/engine.md, Queues)."""

from __future__ import annotations

import json

import pytest

from datamachine_mcp.abilities.queue_similarity import tokenize
from tests.conftest import call, log_rows, table_rows
from tests.test_flows import AI, FETCH, PUBLISH, audits, invalid_fields, make_flow, make_pipeline, raw_config, unchanged

pytestmark = pytest.mark.anyio


async def _setup(runtime, owner):
    pid, psids = await make_pipeline(runtime, (FETCH, AI, PUBLISH))
    fid = (await make_flow(owner, pid))["flow_id"]
    return fid, [f"{p}_{fid}" for p in psids]


def _target(fid: int, fsid: str, **extra):
    return {"flow_id": fid, "flow_step_id": fsid, **extra}


async def test_queue_lifecycle(runtime, owner):
    fid, (fetch, ai, _publish) = await _setup(runtime, owner)
    prompts = ["Write about solar panels", "Explain tidal energy", "Compare heat pumps and boilers"]
    for n, prompt in enumerate(prompts, 1):
        out = await call(owner, "queue-add", _target(fid, ai, prompt=f"  {prompt} "))
        assert (out["queue_length"], out["queue_mode"], out["entry"]["prompt"]) == (n, "static", prompt)
        assert out["entry"]["added_at"].endswith("Z")
    listed = await call(owner, "queue-list", _target(fid, ai))
    assert [(e["index"], e["prompt"]) for e in listed["queue"]] == list(enumerate(prompts))
    assert (listed["total"], listed["per_page"], listed["offset"], listed["queue_mode"]) == (3, 50, 0, "static")
    page = await call(owner, "queue-list", _target(fid, ai, per_page=1, offset=2))
    assert [(e["index"], e["prompt"]) for e in page["queue"]] == [(2, prompts[2])] and page["total"] == 3
    stored = (await raw_config(runtime, fid))[ai]["prompt_queue"]
    assert [set(e) for e in stored] == [{"prompt", "added_at"}] * 3

    out = await call(owner, "queue-remove", _target(fid, ai, index=1))
    assert out["removed_prompt"]["prompt"] == prompts[1] and out["queue_length"] == 2
    err = await unchanged(runtime, owner, "queue-remove", _target(fid, ai, index=2), "queue_index_out_of_range")
    assert err["message"] == "Index 2 is out of range. Queue has 2 item(s)."

    out = await call(owner, "queue-mode", _target(fid, ai, mode="drain"))
    assert (out["queue_mode"], out["previous_mode"]) == ("drain", "static")
    before = await table_rows(runtime)
    out = await call(owner, "queue-mode", _target(fid, ai, mode="drain"))
    assert out["previous_mode"] == "drain" and await table_rows(runtime) == before  # no-op
    out = await call(owner, "queue-mode", _target(fid, fetch, mode="loop"))  # fetch steps have a patch queue
    assert (await raw_config(runtime, fid))[fetch]["queue_mode"] == "loop"

    out = await call(owner, "queue-clear", _target(fid, ai))
    assert out["cleared_count"] == 2
    assert (await raw_config(runtime, fid))[ai]["prompt_queue"] == []
    before = await table_rows(runtime)
    out = await call(owner, "queue-clear", _target(fid, ai))
    assert out["cleared_count"] == 0 and await table_rows(runtime) == before

    # one audit row per change, never with the prompt text
    rows = [
        r for tool in ("queue-add", "queue-remove", "queue-mode", "queue-clear") for r in await audits(runtime, tool)
    ]
    assert len(rows) == 3 + 1 + 2 + 1
    logged = json.dumps(await log_rows(runtime))
    assert not any(p in logged for p in prompts)


async def test_prompt_tools_need_an_ai_step_and_queue_mode_an_ai_or_fetch_step(runtime, owner):
    fid, (fetch, ai, publish) = await _setup(runtime, owner)
    for tool, extra in [
        ("queue-add", {"prompt": "x"}),
        ("queue-list", {}),
        ("queue-remove", {"index": 0}),
        ("queue-clear", {}),
    ]:
        err = await unchanged(runtime, owner, tool, _target(fid, fetch, **extra), "invalid_queue_step")
        assert err["message"] == "Prompt queues exist only on ai steps"
    await unchanged(runtime, owner, "queue-mode", _target(fid, publish, mode="drain"), "invalid_queue_step")
    err = await unchanged(runtime, owner, "queue-add", _target(fid, ai, prompt="   "), "prompt_required")
    assert "prompt" in err["message"]


async def test_queue_lookup_errors_in_order(runtime, owner):
    fid, (_fetch, ai, _) = await _setup(runtime, owner)
    other = (await make_flow(owner, (await make_pipeline(runtime))[0]))["flow_id"]
    psid = ai.rsplit("_", 1)[0]
    cases = [
        (_target(fid, "", prompt="x"), "invalid_flow_step_id", "flow_step_id must be a non-empty string"),
        (_target(fid, "junk", prompt="x"), "invalid_flow_step_id", None),
        (_target(fid, f"{psid}_555", prompt="x"), "flow_not_found", None),
        (_target(fid, f"{psid}_{other}", prompt="x"), "flow_step_not_found", "Flow step not found in flow config"),
        (_target(other, ai, prompt="x"), "invalid_flow_step_id", "flow_step_id does not belong to this flow"),
    ]
    for args, code, message in cases:
        err = await unchanged(runtime, owner, "queue-add", args, code)
        if message:
            assert err["message"] == message
    for tool, args, field in [
        ("queue-add", {"flow_step_id": ai, "prompt": "x"}, "flow_id"),
        ("queue-add", _target(fid, ai), "prompt"),
        ("queue-add", _target(fid, ai, prompt="x" * 20001), "prompt"),
        ("queue-list", _target(fid, ai, per_page=201), "per_page"),
        ("queue-remove", _target(fid, ai, index=-1), "index"),
        ("queue-mode", _target(fid, ai, mode="shuffle"), "mode"),
        ("queue-clear", _target("1.0", ai), "flow_id"),
    ]:
        err = await unchanged(runtime, owner, tool, args, "invalid_input")
        assert field in invalid_fields(err), (tool, err)


def test_tokenize_uses_dm_stop_words_and_drops_short_words():
    assert tokenize("It's a B2B API, not an SDK!") == {"b2b", "api", "sdk"}
    assert (
        tokenize("The History of the Roman Empire")
        == tokenize("history: roman empire")
        == {"history", "roman", "empire"}
    )
    assert tokenize("what why how who where which that this you your") == set()


async def test_near_duplicates_are_rejected_with_the_best_match(runtime, owner):
    fid, (_, ai, _) = await _setup(runtime, owner)
    await call(owner, "queue-add", _target(fid, ai, prompt="The history of the Roman empire"))
    base = "alpha bravo charlie delta echo foxtrot golf hotel india juliet"
    await call(owner, "queue-add", _target(fid, ai, prompt=base))
    await call(owner, "queue-add", _target(fid, ai, prompt="alpha bravo charlie delta echo foxtrot zulu"))
    new = "Alpha, bravo, charlie, delta, echo, foxtrot, golf, hotel, india and kilo"  # 9 of 11 words shared
    err = await unchanged(runtime, owner, "queue-add", _target(fid, ai, prompt=new), "duplicate_rejected")
    assert err["message"] == f'Rejected: "{new}" is 82% similar to queued item "{base}" (index 1).'
    data = err["data"]
    assert data["match"] == {"index": 1, "prompt": base, "similarity": 0.818}
    assert (data["source"], data["strategy"], data["reason"]) == ("queue", "jaccard", err["message"])
    # stop words and punctuation do not make prompts different
    await unchanged(
        runtime, owner, "queue-add", _target(fid, ai, prompt="History: Roman Empire!"), "duplicate_rejected"
    )
    # below the 0.65 threshold is accepted (6 of 10 words shared = 0.6)
    await call(
        owner, "queue-add", _target(fid, ai, prompt="alpha bravo charlie delta echo foxtrot xray yankee whiskey")
    )
    # skip_validation accepts a near-duplicate
    out = await call(owner, "queue-add", _target(fid, ai, prompt=new, skip_validation=True))
    assert out["queue_length"] == 5
