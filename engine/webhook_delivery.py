"""An inbound webhook request as the engine sees it (the raw body, lower-case headers), what it is answered
(``WebhookRefused``, ``Triggered``), and how its body and headers are read; shared by flow triggers and
webhook gates."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Header names never copied into the run: credentials and anything that looks like one.
_DROPPED = frozenset({"authorization", "cookie", "proxy-authorization"})
_SECRETISH = re.compile(r"secret|token|sig|hmac|signature|auth|password|bearer|api[-_]?key")


class WebhookRefused(Exception):
    """Answer the request with ``status`` and ``{"error": code}`` (``retry_after`` as a Retry-After header)."""

    def __init__(self, status: int, code: str, *, retry_after: int | None = None) -> None:
        super().__init__(f"{status} {code}")
        self.status = status
        self.code = code
        self.retry_after = retry_after


@dataclass(frozen=True)
class Delivery:
    """One inbound request: the raw body (verified before it is parsed), headers with lower-case names."""

    body: bytes
    headers: Mapping[str, str]
    remote_ip: str | None = None


@dataclass(frozen=True)
class Triggered:
    job_id: int | None  # None: no run was needed (``skipped`` names why)
    flow_id: int
    status: str
    replayed: bool
    skipped: str | None = None


def parse_payload(body: bytes, *, containers_only: bool) -> Any:
    """The JSON body (empty → ``{}``); 400 ``invalid_json`` otherwise (and for scalars when a trigger
    payload must be an object or array)."""
    if not body.strip():
        return {}
    try:
        value = json.loads(body)
    except ValueError:
        raise WebhookRefused(400, "invalid_json") from None
    if containers_only and not isinstance(value, dict | list):
        raise WebhookRefused(400, "invalid_json")
    return value


def kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers a run may see: no credentials, nothing named like a secret."""
    return {name: value for name, value in headers.items() if name not in _DROPPED and not _SECRETISH.search(name)}
