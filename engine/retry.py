"""The retry policy in one object: which failures are retried, after how long, and what is recorded.

A retryable failure with attempts left (``attempts`` counts starts of the current step) is requeued after
``base · 2^(attempts − 1)`` seconds, capped at ``retry_max_delay_seconds``; transport failures use the
shorter transport base; a Retry-After value is a floor (clamped to a day). Lease expiry is retried like a
transport failure. No jitter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from datamachine_mcp.engine.errors import classify
from datamachine_mcp.storage.timeutil import iso

HISTORY = 10
RETRY_AFTER_CAP = 86400.0


@dataclass(frozen=True)
class Decision:
    retry: bool
    retryable: bool
    error_class: str | None
    delay: int = 0


@dataclass(frozen=True)
class RetryPolicy:
    base_seconds: int = 60
    transport_base_seconds: int = 15
    max_delay_seconds: int = 3600

    @classmethod
    def from_settings(cls, settings: Any) -> RetryPolicy:
        return cls(
            base_seconds=settings.int("retry_base_seconds"),
            transport_base_seconds=settings.int("retry_transport_base_seconds"),
            max_delay_seconds=settings.int("retry_max_delay_seconds"),
        )

    def delay(self, error_class: str | None, attempts: int, retry_after: float | None = None) -> int:
        transport = error_class in ("transport", "lease_expired")
        base = self.transport_base_seconds if transport else self.base_seconds
        delay = min(self.max_delay_seconds, base * 2 ** max(0, attempts - 1))
        if retry_after is not None:
            delay = max(delay, min(float(retry_after), RETRY_AFTER_CAP))
        return int(delay)

    def decide(self, error: dict[str, Any], attempts: int, max_attempts: int) -> Decision:
        """For a failed step: retry (with its delay) or fail."""
        retryable, error_class = classify(error)
        if retryable and attempts < max_attempts:
            return Decision(True, True, error_class, self.delay(error_class, attempts, error.get("retry_after")))
        return Decision(False, retryable, error_class)

    @staticmethod
    def record_retry(
        data: dict[str, Any],
        *,
        flow_step_id: str | None,
        attempt: int,
        error_class: str | None,
        delay: int,
        now: datetime,
        code: str,
        message: str | None = None,
    ) -> datetime:
        """Note a scheduled retry in ``data["retry"]``; returns when it runs."""
        run_at = now + timedelta(seconds=delay)
        retry = dict(data.get("retry") or {})
        history = list(retry.get("history") or [])
        history.append(
            {
                "flow_step_id": flow_step_id,
                "attempt": attempt,
                "class": error_class,
                "delay_seconds": delay,
                "at": iso(now),
                "error": code,
            }
        )
        retry.update(
            total_retries=int(retry.get("total_retries", 0)) + 1,
            last_class=error_class,
            next_retry_at=iso(run_at),
            history=history[-HISTORY:],
        )
        if message is not None:
            retry.update(last_error=message[:500], exhausted=False)
        data["retry"] = retry
        return run_at

    @staticmethod
    def record_exhausted(data: dict[str, Any], error_class: str | None, message: str) -> None:
        retry = dict(data.get("retry") or {})
        retry.update(exhausted=True, last_class=error_class, last_error=message[:500])
        data["retry"] = retry
