"""Step errors and their retry classification (docs/engine.md, The step contract; Retryable classification).

Handlers and providers raise :class:`StepError` with a stable ``code`` (the job's failure reason)
and optional retry hints. :func:`classify` decides whether a failure is retryable and its retry
class (``transport``, ``rate_limit``, ``upstream``), rule by rule as docs/engine.md, Retryable
classification lists them.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

MAX_RETRY_AFTER = 86_400.0

TRANSPORT_CODES = frozenset({"http_timeout", "http_connection_error"})
UPSTREAM_STATUSES = frozenset({408, 500, 502, 503, 504, 529})
UPSTREAM_CODES = frozenset({"step_timeout", "sampling_unavailable"})
HEURISTIC_WORDS = (
    "rate limit",
    "429",
    "timeout",
    "timed out",
    "temporar",
    "try again",
    "throttle",
    "overloaded",
    "502",
    "503",
    "504",
)


class CodedError(Exception):
    """A refusal the caller can act on: a stable snake_case ``code``, one ``message`` sentence that names
    the fix, and ``data``. The root of every caller error (abilities, configs, plans, schedules,
    resources); the ability runner alone turns one into what the client sees (``payload()``)."""

    def __init__(self, code: str, message: str, **data: Any) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.data = data

    def payload(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "data": self.data}


class StepError(Exception):
    """A step or handler failure with a stable code: the ``error`` of a step result.

    ``retryable``/``error_class`` are explicit overrides (rule 1); left ``None``, the
    rules decide from ``code`` and ``http_status``. ``retry_after`` is in seconds. ``provider``
    names the AI provider whose call failed: only such errors (and unexpected exceptions) get the
    message heuristic of rule 5.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool | None = None,
        retry_after: float | None = None,
        http_status: int | None = None,
        diagnostics: dict[str, Any] | None = None,
        error_class: str | None = None,
        provider: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after
        self.http_status = http_status
        self.diagnostics = diagnostics
        self.error_class = error_class
        self.provider = provider

    def to_dict(self) -> dict[str, Any]:
        """The ``error`` object of a step result: ``{code, message, retryable, class?, retry_after?, …}``."""
        retryable, error_class = classify(self)
        out: dict[str, Any] = {"code": self.code, "message": self.message, "retryable": retryable}
        if error_class is not None:
            out["class"] = error_class
        if self.retry_after is not None:
            out["retry_after"] = self.retry_after
        if self.http_status is not None:
            out["http_status"] = self.http_status
        if self.diagnostics:
            out["diagnostics"] = self.diagnostics
        return out


HandlerError = StepError  # one error type; handler code may use either name


def _status_class(status: int | None) -> str | None:
    if status == 429:
        return "rate_limit"
    if status in UPSTREAM_STATUSES:
        return "upstream"
    return None


_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE)


def _heuristic(message: str) -> bool:
    # Addresses are not words: a URL whose port reads "50429" must not make a 401 look like a rate limit.
    lowered = _URL.sub(" ", message).lower()
    return any(word in lowered for word in HEURISTIC_WORDS)


def _rules(code: str | None, status: int | None, message: str, heuristic: bool) -> tuple[bool, str | None]:
    """Rules 2-6 of docs/engine.md, Retryable classification."""
    if code in TRANSPORT_CODES:
        return True, "transport"
    if code == "http_rate_limited":
        return True, "rate_limit"
    status_class = _status_class(status)
    if status_class is not None:
        return True, status_class
    if code in UPSTREAM_CODES:
        return True, "upstream"
    if heuristic and _heuristic(message):
        return True, "upstream"
    return False, None


def classify(error: BaseException | Mapping[str, Any]) -> tuple[bool, str | None]:
    """``(retryable, error_class)`` of a failure, first matching rule wins.

    Accepts a :class:`StepError`, any other exception (an unexpected one: httpx timeouts and
    transport errors are transport failures, the rest gets the message heuristic) or a stored
    error mapping ``{code, message, retryable?, class?, http_status?, provider?, diagnostics?}``.
    Provider errors (``provider`` set, or ``diagnostics.provider``) and ``step_exception`` errors
    get the message heuristic of rule 5.
    """
    if isinstance(error, StepError):
        from_provider = error.provider is not None or bool((error.diagnostics or {}).get("provider"))
        heuristic = from_provider or error.code == "step_exception"
        derived = _rules(error.code, error.http_status, error.message, heuristic=heuristic)
        if error.retryable is not None:
            return error.retryable, error.error_class or (derived[1] if error.retryable else None)
        if error.error_class is not None and derived[0]:
            return True, error.error_class
        return derived
    if isinstance(error, Mapping):
        code = error.get("code")
        status = error.get("http_status")
        message = str(error.get("message") or "")
        explicit = error.get("retryable")
        diagnostics = error.get("diagnostics")
        from_provider = bool(error.get("provider")) or (
            isinstance(diagnostics, Mapping) and bool(diagnostics.get("provider"))
        )
        derived = _rules(code, status, message, heuristic=from_provider or code == "step_exception")
        if isinstance(explicit, bool):
            return explicit, error.get("class") or (derived[1] if explicit else None)
        return derived
    import httpx  # here, not at the top: every layer imports this module, few processes make requests

    if isinstance(error, httpx.TimeoutException | TimeoutError):
        return True, "transport"
    if isinstance(error, httpx.TransportError):
        return True, "transport"
    if _heuristic(str(error)):
        return True, "upstream"
    return False, None


def parse_retry_after(value: str | float | int | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` value (delta-seconds or an HTTP date), clamped to 0..86,400."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip()
        if not text:
            return None
        try:
            seconds = float(text)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(text)
            except (TypeError, ValueError, IndexError):
                return None
            if when is None:
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            current = now or datetime.now(UTC)
            seconds = (when - current).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, min(MAX_RETRY_AFTER, seconds))
