"""Delayed and debounced starts: ``durable.start(..., start_at= | countdown= | debounce=)``.

A delayed start writes the run at once, so its id is taken and ``durable show`` shows it
waiting for its start, with a durable ``start`` timer (PostgreSQL, indexed in Redis like a
sleep's): not a broker ETA, so it survives a Redis flush and a beat restart. Nothing of the
workflow runs until ``durable beat`` fires the timer and sends the first activation.

A debounced start (``debounce=`` with a ``workflow_id``) starts the run ``debounce`` after
the last call: while the run waits for its start, each call replaces its arguments and moves
its start to now + ``debounce`` (at most ``debounce_max`` after the first call), so a burst
of calls starts one run, with the last arguments. Once the run has started or ended, a call
returns it as ``start`` does for an existing id: an ended run is never started again. A call
that meets the start timer firing at that instant loses to it, and returns the started run;
the SQL of the race is in :mod:`durable.store.delayed`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from durable.durations import checked, optional_checked
from durable.errors import WorkflowIdConflict
from durable.store import delayed as delayed_queries
from durable.store import runs as run_queries

if TYPE_CHECKING:
    from durable.core import Core

log = logging.getLogger(__name__)

# A debounce that finds the run still waiting for its start but its timer just taken (by a
# concurrent debounce of the same id) tries again with a fresh snapshot, this many times.
DEBOUNCE_ATTEMPTS = 5


@dataclass(frozen=True)
class StartTime:
    """When a run starts, as ``start`` was given it: checked, not yet resolved to a time."""

    start_at: datetime | None = None
    """An aware datetime to start at."""
    delay: float | None = None
    """Else seconds from now (PostgreSQL's clock): ``countdown``, or ``debounce``."""
    debounce: bool = False
    cap: float | None = None
    """``debounce_max``: seconds after the first call by which the run starts anyway."""

    def when(self) -> tuple[object | None, float | None, float | None]:
        """As :mod:`durable.store.delayed` takes it: (start_at, delay, cap)."""
        return self.start_at, self.delay, self.cap


def start_time(
    workflow_id: str | None,
    start_at: datetime | None = None,
    countdown: timedelta | float | None = None,
    debounce: timedelta | float | None = None,
    debounce_max: timedelta | float | None = None,
) -> StartTime | None:
    """Check ``start``'s timing options; None when the run starts now.

    Raises:
        ValueError: two of ``start_at``, ``countdown`` and ``debounce`` given, a naive or
            non-datetime ``start_at``, ``debounce`` without a ``workflow_id``, or
            ``debounce_max`` without ``debounce``; :class:`~durable.errors.InvalidDuration`
            (a ``ValueError``) for a negative, infinite or too long duration.
    """
    given = [n for n, v in (("start_at", start_at), ("countdown", countdown)) if v is not None]
    if debounce is not None:
        given.append("debounce")
    if len(given) > 1:
        raise ValueError(f"start: give one of start_at, countdown or debounce, not {given}")
    if debounce_max is not None and debounce is None:
        raise ValueError("start: debounce_max is only meaningful with debounce")
    if start_at is not None:
        return StartTime(start_at=_aware(start_at))
    if countdown is not None:
        return StartTime(delay=checked("countdown", countdown))
    if debounce is None:
        return None
    if not workflow_id:
        raise ValueError("start: debounce needs a workflow_id: the id names what is debounced")
    window = checked("debounce", debounce, positive=True)
    cap = optional_checked("debounce_max", debounce_max, positive=True)
    return StartTime(delay=window if cap is None else min(window, cap), debounce=True, cap=cap)


def _aware(value: Any) -> datetime:
    if not isinstance(value, datetime):
        raise ValueError(f"start: start_at must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(
            "start: start_at must be timezone-aware (e.g. datetime.now(UTC) + ...), "
            f"not the naive {value.isoformat()}"
        )
    return value


def start_delayed(
    core: Core,
    name: str,
    workflow_id: str,
    args: str,
    kwargs: str,
    when: StartTime,
    attributes: str | None = None,
    trace: str | None = None,
) -> None:
    """Create (or, debouncing, move) a run waiting for its start; see the module docstring.

    Arguments and attributes are JSON text, already encoded; a debounce replaces the
    arguments, and the attributes unless they are None. ``trace`` (JSON text) is the trace
    context the run's spans continue, recorded by the call that creates the run.
    Returns once the run exists, whatever its state; raises :class:`WorkflowIdConflict` if
    the id belongs to another workflow.
    """
    timeout = core.execution_timeouts.get(name)
    for _ in range(DEBOUNCE_ATTEMPTS):
        inserted = core.store(
            lambda c: delayed_queries.insert_delayed_run(
                c, workflow_id, name, args, kwargs, timeout, when.when(), attributes, trace
            )
        )
        if inserted.written:
            core.index_timers(inserted.timers)
            return
        if when.debounce:
            moved = core.store(
                lambda c: delayed_queries.debounce_run(
                    c, workflow_id, name, args, kwargs, timeout, when.when(), attributes
                )
            )
            if moved.written:
                core.index_timers(moved.timers)
                return
        row = core.store(lambda c: run_queries.get_run(c, workflow_id))
        if row is None:  # deleted meanwhile (purged): create it again
            continue
        if row.name != name:
            raise WorkflowIdConflict(workflow_id, row.name, name)
        if not when.debounce or row.status != "running" or row.start_at is None:
            return  # an existing run, reported as it is: started, ended, or not debounced
    log.warning("durable: debounce of %s kept losing to concurrent debounces", workflow_id)
