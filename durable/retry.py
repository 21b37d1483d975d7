"""Retry policy of a step."""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from durable import durations
from durable.durations import seconds

ON_EXHAUSTED = ("fail", "pause")
"""What ``RetryPolicy.on_exhausted`` accepts."""


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _import_class(path: str) -> type[BaseException]:
    """The class at ``module.Qualname``, trying the longest importable module first."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
            for name in parts[cut:]:
                found = getattr(found, name)
        except (ImportError, AttributeError):
            continue
        if isinstance(found, type) and issubclass(found, BaseException):
            return found
    raise ImportError(f"durable: cannot import the exception class {path!r}")


@dataclass(frozen=True)
class RetryPolicy:
    """How a failing step is retried; waits between attempts are durable timers.

    Example::

        ctx.step(charge_card, order,
                 retry=RetryPolicy(max_attempts=5, initial_interval=1.0, backoff=2.0,
                                   max_interval=60.0, non_retryable=(CardDeclined,)))

    A step given no policy follows its task's own Celery retry options (``autoretry_for``,
    ``self.retry()``), their waits durable timers; with none it is tried once, as a plain
    Celery task is.

    With ``on_exhausted="pause"`` a step whose attempts are all used pauses its run instead
    of failing: deploy a fix, then ``durable unpause`` (or ``resume``) the run and the step
    is tried once more from where it stopped::

        ctx.step(call_partner_api, order, retry=RetryPolicy(max_attempts=5,
                                                            on_exhausted="pause"))
    """

    max_attempts: int = 3
    """Attempts in all, the first included; 1 means no retry."""
    initial_interval: float | timedelta = 1.0
    """Wait before the second attempt, in seconds or as a timedelta."""
    backoff: float = 2.0
    """Factor applied to the wait after each failed attempt."""
    max_interval: float | timedelta = 60.0
    """Upper bound of any single wait."""
    non_retryable: tuple[type[BaseException], ...] = field(default_factory=tuple)
    """Exception classes (and their subclasses) that fail the step at once."""
    on_exhausted: str = "fail"
    """What the last failed attempt does: ``"fail"`` (``StepFailed`` in the workflow) or
    ``"pause"`` (the run is paused, the step waits to be tried again once it is unpaused).
    A non-retryable exception fails the step either way."""

    def __post_init__(self) -> None:
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be a whole number, at least 1")
        if attempts > 2**31 - 1:
            raise ValueError("RetryPolicy.max_attempts must be at most 2147483647")
        if not isinstance(self.backoff, int | float) or not 1 <= self.backoff <= 1e6:
            raise ValueError("RetryPolicy.backoff must be a number from 1.0 to 1e6")
        durations.checked("RetryPolicy.initial_interval", self.initial_interval)
        durations.checked("RetryPolicy.max_interval", self.max_interval)
        if self.on_exhausted not in ON_EXHAUSTED:
            raise ValueError(
                f"RetryPolicy.on_exhausted must be one of {', '.join(map(repr, ON_EXHAUSTED))}, "
                f"not {self.on_exhausted!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """The policy as stored with the step (exception classes by dotted path)."""
        stored = {
            "max_attempts": self.max_attempts,
            "initial_interval": seconds(self.initial_interval),
            "backoff": self.backoff,
            "max_interval": seconds(self.max_interval),
            "non_retryable": [_class_path(c) for c in self.non_retryable],
        }
        if self.on_exhausted != "fail":  # steps stored before it existed read as "fail"
            stored["on_exhausted"] = self.on_exhausted
        return stored

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> RetryPolicy:
        """The policy that :meth:`to_dict` stored."""
        return cls(
            max_attempts=int(stored["max_attempts"]),
            initial_interval=float(stored["initial_interval"]),
            backoff=float(stored["backoff"]),
            max_interval=float(stored["max_interval"]),
            non_retryable=tuple(_import_class(p) for p in stored.get("non_retryable") or ()),
            on_exhausted=str(stored.get("on_exhausted", "fail")),
        )


NO_RETRY: dict[str, Any] = RetryPolicy(max_attempts=1).to_dict()


def next_attempt(
    policy: dict[str, Any], failed_attempts: int, retryable: bool
) -> tuple[float | None, bool]:
    """After a failed attempt: (seconds before the next one or None to fail, pause the run).

    An exhausted policy with ``on_exhausted="pause"`` gives a retry due at once and a pause:
    the retry timer fires when the run is unpaused.
    """
    delay = retry_delay(policy, failed_attempts) if retryable else None
    if delay is None and retryable and policy.get("on_exhausted") == "pause":
        return 0.0, True
    return delay, False


def retry_delay(policy: dict[str, Any], failed_attempts: int) -> float | None:
    """Seconds to wait before the next attempt, or ``None`` when the step has no attempts left."""
    if failed_attempts >= int(policy["max_attempts"]):
        return None
    try:
        growth = float(policy["backoff"]) ** (failed_attempts - 1)
    except OverflowError:  # many attempts at a steep backoff: the cap applies
        growth = math.inf
    initial = float(policy["initial_interval"])
    delay = initial * growth if initial else 0.0
    return min(delay, float(policy["max_interval"]))


def is_retryable(policy: dict[str, Any], exc: BaseException) -> bool:
    """False when ``exc`` is an instance of one of the policy's non-retryable classes."""
    blocked = set(policy.get("non_retryable") or ())
    return not any(_class_path(cls) in blocked for cls in type(exc).__mro__)
