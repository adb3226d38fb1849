"""``wordpress`` publish/update handler: WordPress REST API with an application password.

*Publish*: ``POST {api_base}/wp/v2/{post_type_base}`` with ``{title, content, status,
categories?, tags?}`` → ``engine_updates {post_id, published_url}``. *Update*: ``POST
…/{post_type_base}/{post_id}`` with ``{title, content}``, the id read from
``engine_data[post_id_key]`` (default ``post_id``). WordPress error bodies ``{code, message}``
go into the error's ``diagnostics`` (``wp_code``, ``wp_message``) and message.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from datamachine_mcp.engine.catalog import PUBLISHING, UPDATE, FieldSpec, HandlerSpec
from datamachine_mcp.engine.errors import StepError
from datamachine_mcp.engine.handlers.base import (
    HandlerContext,
    PublishResult,
    packet_title_body,
    with_defaults,
)
from datamachine_mcp.engine.http import Response, display_url, status_error
from datamachine_mcp.storage.crypto import MASK


def endpoint(cfg: dict[str, Any]) -> str:
    api_base = cfg.get("api_base") or f"{str(cfg['site_url']).rstrip('/')}/wp-json"
    base = str(cfg.get("post_type_base") or "posts").strip("/")
    return f"{api_base.rstrip('/')}/wp/v2/{base}"


def _auth(cfg: dict[str, Any]) -> str:
    token = f"{cfg['username']}:{cfg['application_password']}".encode()
    return "Basic " + base64.b64encode(token).decode("ascii")


def _wp_error(response: Response, url: str) -> StepError:
    message = None
    diagnostics: dict[str, Any] = {}
    try:
        body = json.loads(response.content)
    except ValueError:
        body = None
    if isinstance(body, dict):
        if isinstance(body.get("code"), str):
            diagnostics["wp_code"] = body["code"]
        if isinstance(body.get("message"), str):
            diagnostics["wp_message"] = body["message"]
            message = body["message"]
            if "wp_code" in diagnostics:
                message = f"{body['message']} ({body['code']})"
    if 300 <= response.status < 400 and message is None:
        location = response.headers.get("location")
        message = "WordPress redirected the request; check site_url/api_base" + (
            f" (Location: {display_url(location)})" if location else ""
        )
    return status_error(
        response.status,
        method="POST",
        url=url,
        headers=response.headers,
        body=response.content,
        message=message,
        diagnostics=diagnostics,
    )


def _post(response: Response, url: str) -> tuple[Any, str | None]:
    try:
        document = json.loads(response.content)
    except ValueError:
        document = None
    if not isinstance(document, dict) or document.get("id") in (None, ""):
        raise StepError(
            "invalid_response",
            f"POST {display_url(url)} returned HTTP {response.status} without a post id",
            http_status=response.status,
            diagnostics={"url": display_url(url), "body": response.text[:1000]},
        )
    link = document.get("link")
    return document["id"], link if isinstance(link, str) and link else None


class WordPressHandler:
    slug = "wordpress"

    async def _call(
        self, cfg: dict[str, Any], url: str, payload: dict[str, Any], ctx: HandlerContext
    ) -> tuple[Any, str | None] | PublishResult:
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        headers = {"Authorization": _auth(cfg), "Accept": "application/json"}
        if ctx.dry_run:
            preview = {
                "method": "POST",
                "url": url,
                "headers": {"Authorization": MASK, "Content-Type": "application/json"},
                "body": payload,
            }
            return {"status": "preview", "url": url, "preview": preview, "engine_updates": {}}
        response = await ctx.outbound.post_json(url, body, headers=headers, check=False)
        if not 200 <= response.status < 300:
            raise _wp_error(response, url)
        return _post(response, url)

    async def publish(self, config: dict[str, Any], packet: dict[str, Any], ctx: HandlerContext) -> PublishResult:
        cfg = with_defaults(self.slug, "publish", config)
        title, content = packet_title_body(packet)
        payload: dict[str, Any] = {"title": title, "content": content, "status": cfg["post_status"]}
        if cfg.get("categories"):
            payload["categories"] = list(cfg["categories"])
        if cfg.get("tags"):
            payload["tags"] = list(cfg["tags"])
        url = endpoint(cfg)
        outcome = await self._call(cfg, url, payload, ctx)
        if isinstance(outcome, dict):
            return outcome
        post_id, link = outcome
        updates: dict[str, Any] = {"post_id": post_id}
        if link:
            updates["published_url"] = link
        result: PublishResult = {"status": "published", "post_id": post_id, "engine_updates": updates}
        if link:
            result["url"] = link
        return result

    async def update(self, config: dict[str, Any], packet: dict[str, Any], ctx: HandlerContext) -> PublishResult:
        cfg = with_defaults(self.slug, "update", config)
        key = cfg.get("post_id_key") or "post_id"
        post_id = ctx.engine_data.get(key)
        if isinstance(post_id, str) and post_id.strip().isdigit():
            post_id = int(post_id.strip())
        if isinstance(post_id, bool) or not isinstance(post_id, int) or post_id <= 0:
            detail = "is not set" if post_id in (None, "") else f"is not a post id ({post_id!r})"
            raise StepError("update_target_missing", f"engine_data.{key} {detail}: nothing to update", retryable=False)
        title, content = packet_title_body(packet)
        url = f"{endpoint(cfg)}/{post_id}"
        outcome = await self._call(cfg, url, {"title": title, "content": content}, ctx)
        if isinstance(outcome, dict):
            return outcome
        returned_id, link = outcome
        updates: dict[str, Any] = {"post_id": returned_id}
        if link:
            updates["published_url"] = link
        result: PublishResult = {"status": "updated", "post_id": returned_id, "engine_updates": updates}
        if link:
            result["url"] = link
        return result


HANDLER = HandlerSpec(
    "wordpress",
    "WordPress",
    "Create (publish) or edit (update) posts through the WordPress REST API with an application password.",
    PUBLISHING,
    {
        "site_url": FieldSpec("string", "Site URL, e.g. https://example.com", required=True, kind="url"),
        "username": FieldSpec("string", "WordPress user name", required=True),
        "application_password": FieldSpec(
            "string", "Application password (stored encrypted)", required=True, secret=True
        ),
        "post_type_base": FieldSpec("string", "REST base of the post type", default="posts"),
        "post_status": FieldSpec(
            "string", "Status of new posts", default="draft", enum=("draft", "publish", "pending", "private")
        ),
        "categories": FieldSpec("array", "Category term ids", items="integer"),
        "tags": FieldSpec("array", "Tag term ids", items="integer"),
        "api_base": FieldSpec("string", "REST API base (default {site_url}/wp-json)", kind="url"),
        "post_id_key": FieldSpec(
            "string", "engine_data key holding the post id to update", default="post_id", step_types=(UPDATE,)
        ),
    },
    code=WordPressHandler(),
    position=60,
)
