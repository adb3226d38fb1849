"""Publish/update handlers: files, webhook, wordpress against local targets."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from datamachine_mcp.engine.errors import StepError, classify
from datamachine_mcp.engine.handlers import PUBLISHERS, result_entry, run_publish
from datamachine_mcp.engine.handlers.file_scan import split_front_matter
from datamachine_mcp.engine.handlers.file_write import slugify
from datamachine_mcp.engine.http import Outbound
from tests.fake_servers import FakeResponse, RecordedRequest, make_context, make_snapshot, serve

pytestmark = pytest.mark.anyio

FSID = "2_5f0c7a3e-1b2c-4d5e-8f90-123456789abc_7"
PACKET: dict[str, Any] = {
    "type": "ai_response",
    "timestamp": "2026-05-01T03:12:04Z",
    "data": {"title": "Hello, Wörld: a “test”!", "body": "Line one\nLine two\n"},
    "metadata": {
        "source_type": "rss",
        "handler": "rss",
        "flow_step_id": "2_x_7",
        "item_identifier": "https://example.com/?p=1",
        "source_url": "https://example.com/a",
        "_engine_data": {"source_url": "https://example.com/a"},
    },
}


@pytest.fixture
def server():
    with serve() as s:
        yield s


@pytest.fixture
async def out(tmp_path):
    async with Outbound(make_snapshot(tmp_path), "9.9.9-test") as outbound:
        yield outbound


@pytest.fixture
def root(tmp_path):
    path = tmp_path / "files"
    path.mkdir()
    return path


def ctx(tmp_path, out, **kwargs):
    kwargs.setdefault("step_type", "publish")
    return make_context(make_snapshot(tmp_path), out, **kwargs)


async def fail(code, coro) -> StepError:
    with pytest.raises(StepError) as info:
        await coro
    assert info.value.code == code, info.value
    return info.value


def all_files(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


# -- files publish -----------------------------------------------------------------------------


async def test_files_publish_markdown_with_front_matter(root, out, tmp_path):
    result = await PUBLISHERS["files"].publish({"directory": str(root / "out")}, PACKET, ctx(tmp_path, out))
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    name = f"{today}-hello-wörld-a-test.md"
    assert result == {"status": "published", "path": name, "engine_updates": {"file_path": name}}
    text = (root / "out" / name).read_text("utf-8")
    head, body = text.split("\n---\n\n", 1)
    lines = head.split("\n")
    assert lines[0] == "---"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert list(fields) == ["title", "date", "source_url", "item_identifier", "job_id", "flow_id"]
    values = {k: json.loads(v) for k, v in fields.items()}  # each a JSON scalar
    assert values["title"] == "Hello, Wörld: a “test”!"
    assert values["date"].startswith(today) and values["date"].endswith("Z")
    assert values["source_url"] == "https://example.com/a"
    assert values["item_identifier"] == "https://example.com/?p=1"
    assert (values["job_id"], values["flow_id"]) == (41, 7)
    assert body == "Line one\nLine two\n"
    parsed, parsed_body = split_front_matter(text)
    assert parsed["title"] == "Hello, Wörld: a “test”!" and parsed_body == body
    assert all_files(root) == [f"out/{name}"]  # no temp file left behind


async def test_files_publish_json_and_template_placeholders(root, out, tmp_path):
    cfg = {"directory": str(root), "format": "json", "filename_template": "{flow_id}/{job_id}-{item_hash}-{slug}.json"}
    result = await PUBLISHERS["files"].publish(cfg, PACKET, ctx(tmp_path, out))
    item_hash = hashlib.sha256(b"https://example.com/?p=1").hexdigest()[:12]
    name = f"7/41-{item_hash}-hello-wörld-a-test.json"
    assert result["path"] == name and result["engine_updates"] == {"file_path": name}
    document = json.loads((root / name).read_text("utf-8"))
    assert list(document) == [
        "title",
        "body",
        "date",
        "source_url",
        "item_identifier",
        "job_id",
        "flow_id",
        "metadata",
    ]
    assert document["body"] == "Line one\nLine two\n"
    assert document["metadata"] == {k: v for k, v in PACKET["metadata"].items() if k != "_engine_data"}
    default_json = await PUBLISHERS["files"].publish(
        {"directory": str(root), "format": "json"}, PACKET, ctx(tmp_path, out)
    )
    assert default_json["path"].endswith("-hello-wörld-a-test.json")


async def test_files_publish_numbers_taken_names_unless_overwrite(root, out, tmp_path):
    cfg = {"directory": str(root), "filename_template": "post.md"}
    paths = [(await PUBLISHERS["files"].publish(cfg, PACKET, ctx(tmp_path, out)))["path"] for _ in range(3)]
    assert paths == ["post.md", "post-2.md", "post-3.md"]
    other = {**PACKET, "data": {"title": "Replaced", "body": "new"}}
    result = await PUBLISHERS["files"].publish({**cfg, "overwrite": True}, other, ctx(tmp_path, out))
    assert result["path"] == "post.md"
    assert (root / "post.md").read_text().endswith("\nnew\n")
    assert all_files(root) == ["post-2.md", "post-3.md", "post.md"]


@pytest.mark.parametrize(
    "template",
    ["../escape.md", "/tmp/absolute.md", "sub/../../x.md", "a\\b.md", "nul\x00.md", "{slug}/../../{job_id}.md"],
)
async def test_files_publish_refuses_escaping_templates(root, out, tmp_path, template):
    cfg = {"directory": str(root / "out"), "filename_template": template}
    err = await fail("path_not_allowed", PUBLISHERS["files"].publish(cfg, PACKET, ctx(tmp_path, out)))
    assert classify(err) == (False, None)
    assert not (tmp_path / "escape.md").exists() and all_files(root) == []
    assert all_files(tmp_path) == []


async def test_files_publish_refuses_symlink_escapes_and_directories_outside_roots(root, out, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "link")
    cfg = {"directory": str(root), "filename_template": "link/{job_id}.md"}
    await fail("path_not_allowed", PUBLISHERS["files"].publish(cfg, PACKET, ctx(tmp_path, out)))
    await fail("path_not_allowed", PUBLISHERS["files"].publish({"directory": str(outside)}, PACKET, ctx(tmp_path, out)))
    await fail(
        "path_not_allowed", PUBLISHERS["files"].publish({"directory": str(root / "link")}, PACKET, ctx(tmp_path, out))
    )
    assert list(outside.iterdir()) == []


async def test_files_publish_follows_changed_roots_setting(root, out, tmp_path):
    other = tmp_path / "other"
    snap = make_snapshot(tmp_path, files_allowed_roots=[str(other)])
    context = make_context(snap, out, step_type="publish")
    await fail("path_not_allowed", PUBLISHERS["files"].publish({"directory": str(root)}, PACKET, context))
    result = await PUBLISHERS["files"].publish({"directory": str(other / "x")}, PACKET, context)
    assert (other / "x" / result["path"]).is_file()


async def test_files_publish_dry_run_writes_nothing(root, out, tmp_path):
    (root / "post.md").write_text("taken")
    cfg = {"directory": str(root), "filename_template": "post.md"}
    result = await PUBLISHERS["files"].publish(cfg, PACKET, ctx(tmp_path, out, dry_run=True))
    assert result["status"] == "preview" and result["engine_updates"] == {}
    assert result["preview"]["path"] == "post-2.md"
    assert result["preview"]["content"].startswith('---\ntitle: "Hello, Wörld: a “test”!"\n')
    assert all_files(root) == ["post.md"]
    assert result_entry("files", result) == {
        "handler": "files",
        "status": "preview",
        "path": "post-2.md",
        "preview": result["preview"],
    }


def test_slugify():
    assert slugify("Hello, World!") == "hello-world"
    assert slugify("  ") == "untitled" and slugify("!!!") == "untitled"
    assert slugify("Ünïcödé ÇA va") == "ünïcödé-ça-va"
    assert len(slugify("word " * 40)) <= 80 and not slugify("word " * 40).endswith("-")
    assert slugify("a/b\\c..d") == "a-b-c-d"


# -- files update ------------------------------------------------------------------------------


async def test_files_update_rewrites_with_updated_at(root, out, tmp_path):
    published = await PUBLISHERS["files"].publish({"directory": str(root)}, PACKET, ctx(tmp_path, out))
    original = split_front_matter((root / published["path"]).read_text())[0]
    newer = {**PACKET, "data": {"title": "Edited title", "body": "Edited body"}}
    engine = {"file_path": published["path"]}
    result = await PUBLISHERS["files"].update(
        {"directory": str(root)}, newer, ctx(tmp_path, out, step_type="update", engine_data=engine)
    )
    assert result == {
        "status": "updated",
        "path": published["path"],
        "engine_updates": {"file_path": published["path"]},
    }
    fields, body = split_front_matter((root / published["path"]).read_text())
    assert fields["title"] == "Edited title" and body == "Edited body\n"
    assert fields["date"] == original["date"]
    assert fields["updated_at"].endswith("Z")
    assert all_files(root) == [published["path"]]


async def test_files_update_json_keeps_date(root, out, tmp_path):
    cfg = {"directory": str(root), "format": "json", "filename_template": "a.json"}
    (root / "a.json").write_text(json.dumps({"title": "old", "date": "2020-01-01T00:00:00Z"}))
    context = ctx(tmp_path, out, step_type="update", engine_data={"file_path": "a.json"})
    await PUBLISHERS["files"].update(cfg, PACKET, context)
    document = json.loads((root / "a.json").read_text())
    assert document["date"] == "2020-01-01T00:00:00Z" and "updated_at" in document
    assert document["title"] == PACKET["data"]["title"]


async def test_files_update_target_checks(root, out, tmp_path):
    cfg = {"directory": str(root)}
    err = await fail(
        "update_target_missing", PUBLISHERS["files"].update(cfg, PACKET, ctx(tmp_path, out, step_type="update"))
    )
    assert classify(err) == (False, None)
    missing = ctx(tmp_path, out, step_type="update", engine_data={"file_path": "gone.md"})
    await fail("update_target_missing", PUBLISHERS["files"].update(cfg, PACKET, missing))
    (tmp_path / "victim.md").write_text("keep")
    escape = ctx(tmp_path, out, step_type="update", engine_data={"file_path": "../victim.md"})
    await fail("path_not_allowed", PUBLISHERS["files"].update(cfg, PACKET, escape))
    absolute = ctx(tmp_path, out, step_type="update", engine_data={"file_path": str(tmp_path / "victim.md")})
    await fail("path_not_allowed", PUBLISHERS["files"].update(cfg, PACKET, absolute))
    assert (tmp_path / "victim.md").read_text() == "keep"


async def test_files_update_dry_run_and_run_publish_dispatch(root, out, tmp_path):
    (root / "p.md").write_text('---\ntitle: "x"\ndate: "2020-01-01T00:00:00Z"\n---\n\nold\n')
    context = ctx(tmp_path, out, step_type="update", engine_data={"file_path": "p.md"}, dry_run=True)
    result = await run_publish("files", {"directory": str(root)}, PACKET, context)
    assert result["status"] == "preview"
    assert 'date: "2020-01-01T00:00:00Z"' in result["preview"]["content"]
    assert "updated_at:" in result["preview"]["content"]
    assert (root / "p.md").read_text().endswith("\nold\n")


# -- webhook -----------------------------------------------------------------------------------

SECRET = "whsec-test-secret"


def verifying_receiver(secret: str):
    """A receiver that checks the timestamp window and the HMAC like a careful consumer would."""

    def handle(request: RecordedRequest) -> FakeResponse:
        timestamp = request.headers.get("x-datamachine-timestamp", "")
        if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > 300:
            return FakeResponse(401, {"error": "stale_timestamp"})
        expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + request.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("x-datamachine-signature", "")):
            return FakeResponse(401, {"error": "bad_signature"})
        return FakeResponse(200, "thanks " + "!" * 2000)

    return handle


async def test_webhook_publish_signed_delivery(server, out, tmp_path):
    url = server.route("/hook", verifying_receiver(SECRET))
    cfg = {"url": url, "secret": SECRET, "headers": {"X-Team": "blue", "X-DataMachine-Event": "spoofed"}}
    engine = {"item_identifier": "i-1", "source_url": "https://s", "post_id": 5, "job": {"job_id": 41}, "other": 1}
    context = ctx(tmp_path, out, engine_data=engine)
    result = await PUBLISHERS["webhook"].publish(cfg, PACKET, context)
    assert result["status"] == "published" and result["status_code"] == 200
    assert result["response"] == ("thanks " + "!" * 2000)[:1000]
    assert result["engine_updates"] == {}
    (request,) = server.requests
    expected_delivery = str(uuid.uuid5(uuid.NAMESPACE_URL, f"datamachine-mcp:webhook:41:{FSID}"))
    assert request.headers["content-type"] == "application/json"
    assert request.headers["x-datamachine-event"] == "datamachine.publish"
    assert request.headers["x-datamachine-delivery"] == expected_delivery
    assert request.headers["x-team"] == "blue"
    compact = json.dumps(request.json(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    assert request.body == compact  # compact UTF-8 JSON (no \\u escapes)
    assert request.json() == {
        "event": "datamachine.publish",
        "delivery_id": expected_delivery,
        "job_id": 41,
        "flow_id": 7,
        "pipeline_id": 2,
        "flow_step_id": FSID,
        "dry_run": False,
        "packet": PACKET,
        "engine": {"item_identifier": "i-1", "source_url": "https://s", "post_id": 5},
    }
    # A retry of the same step sends the same delivery id.
    await PUBLISHERS["webhook"].publish(cfg, PACKET, context)
    assert server.requests[1].headers["x-datamachine-delivery"] == expected_delivery


async def test_webhook_wrong_secret_is_rejected_by_the_receiver(server, out, tmp_path):
    url = server.route("/hook", verifying_receiver(SECRET))
    err = await fail(
        "http_auth_failed", PUBLISHERS["webhook"].publish({"url": url, "secret": "wrong"}, PACKET, ctx(tmp_path, out))
    )
    assert err.http_status == 401 and "bad_signature" in err.diagnostics["body"]
    unsigned = await fail("http_auth_failed", PUBLISHERS["webhook"].publish({"url": url}, PACKET, ctx(tmp_path, out)))
    assert unsigned.http_status == 401
    assert "x-datamachine-signature" not in server.requests[-1].headers


async def test_webhook_update_event_and_engine_keys(server, out, tmp_path):
    url = server.script("/hook", FakeResponse(204))
    cfg = {"url": url, "include_engine_data": ["published_url", "missing"]}
    context = ctx(tmp_path, out, step_type="update", engine_data={"published_url": "https://p", "post_id": 3})
    result = await PUBLISHERS["webhook"].update(cfg, PACKET, context)
    assert result["status"] == "updated" and result["status_code"] == 204
    body = server.requests[0].json()
    assert body["event"] == "datamachine.update" and body["engine"] == {"published_url": "https://p"}
    assert server.requests[0].headers["x-datamachine-event"] == "datamachine.update"


async def test_webhook_failures(server, out, tmp_path):
    context = ctx(tmp_path, out)
    server.script("/redirect", FakeResponse(301, headers={"Location": "/elsewhere"}))
    server.script("/down", FakeResponse(503, "down", {"Retry-After": "30"}))
    err = await fail("http_rejected", PUBLISHERS["webhook"].publish({"url": server.url("/redirect")}, PACKET, context))
    assert err.http_status == 301
    err = await fail(
        "http_upstream_error", PUBLISHERS["webhook"].publish({"url": server.url("/down")}, PACKET, context)
    )
    assert classify(err) == (True, "upstream") and err.retry_after == 30.0
    await fail("url_not_allowed", PUBLISHERS["webhook"].publish({"url": "ftp://x/y"}, PACKET, context))
    assert [r.route for r in server.requests] == ["/redirect", "/down"]


async def test_webhook_dry_run_previews_the_request(server, out, tmp_path):
    url = server.script("/hook", FakeResponse(200))
    cfg = {"url": url + "?token=t0ps3cr3t", "secret": SECRET, "headers": {"X-Api-Key": "hidden"}}
    result = await PUBLISHERS["webhook"].publish(cfg, PACKET, ctx(tmp_path, out, dry_run=True))
    assert server.requests == []
    preview = result["preview"]
    assert result["status"] == "preview" and preview["method"] == "POST" and preview["url"] == url
    assert preview["headers"]["X-Api-Key"] == "********"
    assert preview["headers"]["X-DataMachine-Signature"] == "********"
    assert preview["body"]["event"] == "datamachine.publish" and preview["body"]["packet"] == PACKET
    assert "hidden" not in json.dumps(result) and "t0ps3cr3t" not in json.dumps(result)


async def test_webhook_private_network_refusal(server, tmp_path):
    url = server.script("/hook", FakeResponse(200))
    snap = make_snapshot(tmp_path, outbound_allow_private_networks=False)
    async with Outbound(snap, "1") as o:
        await fail("url_not_allowed", PUBLISHERS["webhook"].publish({"url": url}, PACKET, make_context(snap, o)))
    assert server.requests == []


# -- wordpress ---------------------------------------------------------------------------------


def wp_config(server, **extra):
    return {"site_url": server.base_url, "username": "editor", "application_password": "abcd efgh ijkl", **extra}


async def test_wordpress_publish_with_basic_auth(server, out, tmp_path):
    server.script(
        "/wp-json/wp/v2/posts",
        FakeResponse(201, {"id": 123, "link": "https://blog.example/?p=123", "status": "draft"}),
    )
    cfg = wp_config(server, post_status="publish", categories=[3, 4], tags=[9])
    result = await PUBLISHERS["wordpress"].publish(cfg, PACKET, ctx(tmp_path, out))
    assert result == {
        "status": "published",
        "post_id": 123,
        "url": "https://blog.example/?p=123",
        "engine_updates": {"post_id": 123, "published_url": "https://blog.example/?p=123"},
    }
    (request,) = server.requests
    assert request.method == "POST" and request.route == "/wp-json/wp/v2/posts"
    scheme, token = request.headers["authorization"].split(" ", 1)
    assert scheme == "Basic" and base64.b64decode(token).decode() == "editor:abcd efgh ijkl"
    assert request.json() == {
        "title": PACKET["data"]["title"],
        "content": PACKET["data"]["body"],
        "status": "publish",
        "categories": [3, 4],
        "tags": [9],
    }


async def test_wordpress_custom_api_base_and_post_type(server, out, tmp_path):
    server.script("/api/wp/v2/pages", FakeResponse(201, {"id": 5, "link": "https://b/page"}))
    cfg = wp_config(server, api_base=server.url("/api/"), post_type_base="pages")
    result = await PUBLISHERS["wordpress"].publish(cfg, PACKET, ctx(tmp_path, out))
    assert result["post_id"] == 5
    assert server.requests[0].json() == {
        "title": PACKET["data"]["title"],
        "content": PACKET["data"]["body"],
        "status": "draft",
    }


async def test_wordpress_update(server, out, tmp_path):
    server.script("/wp-json/wp/v2/posts/123", FakeResponse(200, {"id": 123, "link": "https://b/?p=123"}))
    context = ctx(tmp_path, out, step_type="update", engine_data={"post_id": 123})
    result = await PUBLISHERS["wordpress"].update(wp_config(server), PACKET, context)
    assert result["status"] == "updated" and result["post_id"] == 123
    assert result["engine_updates"] == {"post_id": 123, "published_url": "https://b/?p=123"}
    assert server.requests[0].json() == {"title": PACKET["data"]["title"], "content": PACKET["data"]["body"]}
    server.script("/wp-json/wp/v2/posts/77", FakeResponse(200, {"id": 77}))
    keyed = ctx(tmp_path, out, step_type="update", engine_data={"post_id": 123, "wp_post": "77"})
    result = await PUBLISHERS["wordpress"].update(wp_config(server, post_id_key="wp_post"), PACKET, keyed)
    assert result["post_id"] == 77 and server.requests[-1].route == "/wp-json/wp/v2/posts/77"


async def test_wordpress_update_without_target(server, out, tmp_path):
    for engine in ({}, {"post_id": ""}, {"post_id": "abc"}, {"post_id": True}):
        context = ctx(tmp_path, out, step_type="update", engine_data=engine)
        err = await fail("update_target_missing", PUBLISHERS["wordpress"].update(wp_config(server), PACKET, context))
        assert classify(err) == (False, None)
    assert server.requests == []


async def test_wordpress_error_bodies_go_to_diagnostics(server, out, tmp_path):
    error = {
        "code": "rest_cannot_create",
        "message": "Sorry, you are not allowed to create posts.",
        "data": {"status": 401},
    }
    server.script("/wp-json/wp/v2/posts", FakeResponse(401, error))
    err = await fail("http_auth_failed", PUBLISHERS["wordpress"].publish(wp_config(server), PACKET, ctx(tmp_path, out)))
    assert err.diagnostics["wp_code"] == "rest_cannot_create"
    assert err.diagnostics["wp_message"] == "Sorry, you are not allowed to create posts."
    assert "not allowed to create posts" in err.message and err.http_status == 401
    server.script(
        "/wp-json/wp/v2/posts",
        FakeResponse(400, {"code": "rest_invalid_param", "message": "Invalid parameter(s): status"}),
    )
    err = await fail("http_rejected", PUBLISHERS["wordpress"].publish(wp_config(server), PACKET, ctx(tmp_path, out)))
    assert err.diagnostics["wp_code"] == "rest_invalid_param"
    server.script("/wp-json/wp/v2/posts", FakeResponse(201, "<html>not json</html>"))
    await fail("invalid_response", PUBLISHERS["wordpress"].publish(wp_config(server), PACKET, ctx(tmp_path, out)))
    server.script(
        "/wp-json/wp/v2/posts", FakeResponse(301, headers={"Location": "https://www.example/wp-json/wp/v2/posts"})
    )
    err = await fail("http_rejected", PUBLISHERS["wordpress"].publish(wp_config(server), PACKET, ctx(tmp_path, out)))
    assert "site_url" in err.message


async def test_wordpress_dry_run_masks_credentials(server, out, tmp_path):
    result = await PUBLISHERS["wordpress"].publish(wp_config(server), PACKET, ctx(tmp_path, out, dry_run=True))
    assert server.requests == []
    assert result["status"] == "preview"
    assert result["preview"]["headers"]["Authorization"] == "********"
    assert result["preview"]["url"] == server.url("/wp-json/wp/v2/posts")
    assert result["preview"]["body"]["status"] == "draft"
    assert "abcd" not in json.dumps(result)
