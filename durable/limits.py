"""Flow control: at most N steps (or runs) of a key running at once, and R starts per period.

A :class:`Limit` is named, and its key is computed from a step's arguments where the step is
scheduled (in the workflow's activation) and stored on the step's row. A limited step is
written ``queued``; it is admitted (``scheduled`` and sent) when its key holds fewer than
the limit's concurrency slots (and, with a ``rate``, a start is free in its Redis bucket,
:mod:`durable.rate`), highest ``priority`` first, then oldest first. The admission and its
release live in :mod:`durable.store.limits` and ``Core.admit``; this module only describes a
step's limit as its options store it. Example::

    charges = Limit("charges", concurrency=1, key=lambda order: order["customer"])
    ctx.step(charge_card, order, limit=charges)

A workflow declares one for its runs (concurrency only): a run over it is written
``queued`` and admitted when a run of its key ends (:mod:`durable.store.run_limits`)::

    @durable.workflow("reports.build", limit=Limit("reports", 2, key=lambda tenant: tenant))
    def build(ctx, tenant): ...
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from durable.errors import InvalidLimit, LimitKeyError

MAX_KEY_LENGTH = 200
"""Longest key a key function may return."""

MAX_PRIORITY = 2**31 - 1
"""Priorities are PostgreSQL integers: from ``-MAX_PRIORITY`` to ``MAX_PRIORITY``."""

GLOBAL_KEY = "*"
"""The key of a limit without a key function: one queue for every step under it."""


_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"([0-9]+)/([0-9]*)([smhd])")


def parse_rate(name: str, rate: object) -> tuple[int, float]:
    """``"100/m"`` as (100 starts, per 60 seconds); :class:`InvalidLimit` if malformed.

    The period is ``s``, ``m``, ``h`` or ``d``, with an optional count (``"10/5s"``).
    """
    found = _RATE.fullmatch(rate.strip()) if isinstance(rate, str) else None
    if found is None:
        shown = repr(rate)[:40]
        raise InvalidLimit(name, f"rate must be like '100/m' or '5/s', not {shown}")
    count, many, unit = int(found[1]), int(found[2] or 1), found[3]
    if count < 1 or many < 1 or count > MAX_PRIORITY:
        raise InvalidLimit(name, f"rate {rate!r} must allow at least 1 start per period")
    return count, many * _PERIODS[unit]


def check_concurrency(name: str, concurrency: object, allow_zero: bool = False) -> int:
    """``concurrency`` as a slot count, or :class:`InvalidLimit` naming what is wrong.

    ``allow_zero``: an operator's override may be 0, which admits nothing (pauses the limit).
    """
    least = 0 if allow_zero else 1
    if isinstance(concurrency, bool) or not isinstance(concurrency, int):
        raise InvalidLimit(name, f"concurrency must be an integer, not {concurrency!r}")
    if not least <= concurrency <= MAX_PRIORITY:
        raise InvalidLimit(
            name, f"concurrency must be between {least} and {MAX_PRIORITY}, not {concurrency}"
        )
    return concurrency


def check_priority(name: str, priority: object) -> int:
    """``priority`` as stored, or :class:`InvalidLimit`."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidLimit(name, f"priority must be an integer, not {priority!r}")
    if abs(priority) > MAX_PRIORITY:
        raise InvalidLimit(name, f"priority must be within +/-{MAX_PRIORITY}, not {priority}")
    return priority


@dataclass(frozen=True)
class Limit:
    """At most ``concurrency`` steps of one key running at once, across every worker.

    Example::

        partner_api = Limit("partner-api", concurrency=5, rate="100/m")
        charges = Limit("charges", concurrency=1, key=lambda order: order["customer"])

        ctx.step(call_partner, payload, limit=partner_api)
        ctx.step(charge_card, order, limit=charges, priority=10)

        @app.task(durable_limit=charges)  # every step of this task, in any workflow
        def refund(order): ...
    """

    name: str
    """The limit's name: steps under limits of one name share its slots, per key."""
    concurrency: int | None = None
    """Slots per key, at least 1; ``durable limits set`` can override it at run time.
    None: no concurrency limit (``rate`` only)."""
    key: Callable[..., str] | None = None
    """A function of the step's arguments returning the key (a string); None: one key for
    every step under the limit. It must be deterministic: it runs once, when the step is
    scheduled, and the key is stored with the step."""
    rate: str | None = None
    """At most this many starts per period per key, across every worker: ``"100/m"``,
    ``"5/s"``, ``"10/5s"``; starts are spaced evenly over the period (no burst)."""

    def __post_init__(self) -> None:
        """Check the definition where it is written."""
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > 200:
            raise InvalidLimit("", f"name must be a non-empty string, not {self.name!r}")
        if self.concurrency is None and self.rate is None:
            raise InvalidLimit(self.name, "give concurrency=, rate= or both")
        if self.concurrency is not None:
            check_concurrency(self.name, self.concurrency)
        if self.rate is not None:
            parse_rate(self.name, self.rate)
        if self.key is not None and not callable(self.key):
            raise InvalidLimit(self.name, f"key must be a function, not {self.key!r}")

    def key_of(self, args: list[Any], kwargs: dict[str, Any]) -> str:
        """The key for a step called with ``args`` and ``kwargs``; :class:`LimitKeyError`."""
        if self.key is None:
            return GLOBAL_KEY
        try:
            key = self.key(*args, **kwargs)
        except Exception as exc:
            reason = " ".join(str(exc).split())[:200]
            raise LimitKeyError(self.name, f"raised {type(exc).__name__}: {reason}") from exc
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
            raise LimitKeyError(
                self.name,
                f"must return a non-empty string of at most {MAX_KEY_LENGTH} "
                f"characters, returned {key!r:.60}",
            )
        return key

    @property
    def interval(self) -> float | None:
        """Seconds between two starts of one key under ``rate``; None without a rate."""
        if self.rate is None:
            return None
        count, period = parse_rate(self.name, self.rate)
        return period / count

    def check_for_workflow(self) -> Limit:
        """This limit, checked for a workflow's runs: a concurrency, no rate.

        A workflow's limit counts running runs; its runs' starts are not rate-limited (limit
        their steps with a rate instead).
        """
        if self.concurrency is None or self.rate is not None:
            raise InvalidLimit(
                self.name,
                "a workflow's limit takes concurrency= (and key=) only; put a rate on its steps",
            )
        return self

    def for_run(
        self, args: list[Any], kwargs: dict[str, Any], priority: int
    ) -> tuple[str, str, int]:
        """A run's (limit name, key, priority) as stored, for a workflow's limit."""
        return self.name, self.key_of(args, kwargs), check_priority(self.name, priority)

    def for_step(self, args: list[Any], kwargs: dict[str, Any], priority: int) -> dict[str, Any]:
        """The step's ``limit`` option as stored (with a rate, its interval too)."""
        stored: dict[str, Any] = {
            "name": self.name,
            "key": self.key_of(args, kwargs),
            "concurrency": self.concurrency,
            "priority": check_priority(self.name, priority),
        }
        if self.rate is not None:
            stored["rate"], stored["interval"] = self.rate, self.interval
        return stored
