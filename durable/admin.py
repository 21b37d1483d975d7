"""The operator's tools as library functions; the ``durable`` command calls these.

Reading (``list_runs``, ``describe_run``, ``list_timers``) and deleting (``purge``) take a
connection to the store; repairing (``resume``, ``retry``, ``fork``) and holding
(``pause``, ``unpause``) take the ``Durable``,
because it sends the activation once the store is written. Every write is one statement.

Example::

    with durable.connect() as conn:
        stuck = admin.list_runs(conn, status="running", waiting="signal")
        big = admin.list_runs(conn, attributes=["customer=42", "amount>=100"])
    new_id = admin.fork(durable, "order-o-1", from_step=4)   # rerun from step 4 on
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

from durable import attributes as attribute_rules
from durable import durations
from durable.attributes import AttributeFilter
from durable.errors import (
    InvalidLimit,
    LimitNotFound,
    WorkflowIdTaken,
    WorkflowNotFailed,
    WorkflowNotFound,
    WorkflowNotRunning,
)
from durable.ids import check_id
from durable.limits import check_concurrency, parse_rate
from durable.store import admin as queries
from durable.store import history, run_limits, runs, signals, steps, timers
from durable.store import limits as limit_queries

if TYPE_CHECKING:
    from durable.core import Core

WAITING = tuple(queries.WAITING_FILTERS)
"""What ``list_runs(waiting=...)`` accepts: ``step``, ``timer``, ``signal``, ``queued``."""

MAX_STEP = 2**31 - 1
"""Highest step number PostgreSQL can hold."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_duration(text: str) -> timedelta:
    """``"90"`` (seconds), ``"45s"``, ``"30m"``, ``"12h"``, ``"7d"``, ``"2w"`` or ``"1d12h"``.

    Raises:
        ValueError: ``text`` is none of these, or longer than a century
            (:class:`~durable.errors.InvalidDuration`).
    """
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return timedelta(seconds=durations.checked("duration", float(value)))
    parts = _DURATION.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"{text[:40]!r} is not a duration like 90s, 30m, 12h, 7d or 1d12h")
    total = sum(float(n) * _UNITS[u] for n, u in parts)
    return timedelta(seconds=durations.checked("duration", total))


# -- reading -----------------------------------------------------------------------------------


def _waiting(row: Any) -> dict[str, Any] | None:
    """What a running run waits on; None once it has finished.

    One of ``start`` (a delayed start, ``until`` its time), ``queued`` (a run queued for a
    slot of its limit, ``name`` the limit's), ``step``, ``timer``, ``signal``,
    ``child``, ``activation`` (woken, not replayed yet) or ``nothing`` (stuck: see
    ``durable reconcile``).
    """
    if row.status != "running":
        return None
    if row.start_at is not None:
        return {"on": "start", "seq": None, "name": None, "until": row.start_at}
    if row.queued:
        return {"on": "queued", "seq": None, "name": row.limit_name, "until": None}
    pending = row.pending
    if pending is None:
        on = "activation" if row.owed else ("timer" if row.next_timer else "nothing")
        return {"on": on, "seq": None, "name": None, "until": row.next_timer}
    kind, status = pending["kind"], pending["status"]
    if status != "waiting":
        on = "step"
    elif kind in ("sleep", "task", "local"):
        on = "timer"
    else:
        on = kind
    until = row.next_timer if on in ("timer", "signal") else None
    return {"on": on, "seq": pending["seq"], "name": pending["name"], "until": until}


def list_runs(
    conn: Connection,
    *,
    status: str | None = None,
    name: str | None = None,
    since: datetime | timedelta | None = None,
    waiting: str | None = None,
    paused: bool = False,
    attributes: Mapping[str, Any] | Sequence[AttributeFilter | str] | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    """Runs, newest first, each with what it waits on (``waiting``, None once finished).

    Args:
        conn: A connection to the store.
        status: Only runs in this status.
        name: Only runs of this workflow.
        since: Only runs created at or after this time, or within this long before now.
        waiting: Only running runs waiting on a ``step``, a ``timer`` or a ``signal``.
        paused: Only paused runs (``durable pause``).
        attributes: Only runs whose attributes match: a mapping (equality on each key, one
            containment the GIN index serves) or filters such as ``"amount>=100"``
            (:func:`durable.attributes.parse_filter`), all of which must hold.
        limit: Most runs returned.

    Raises:
        ValueError: ``waiting`` is unknown, ``limit`` below 1, or an attribute filter is
            malformed (:class:`~durable.errors.InvalidAttributes`).
    """
    if waiting is not None and waiting not in WAITING:
        raise ValueError(f"waiting must be one of {', '.join(WAITING)}, not {waiting!r}")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    filters = attribute_rules.filters_from(attributes)
    if isinstance(since, timedelta):
        since = datetime.now(UTC) - since
    rows = queries.list_runs(
        conn,
        status=status,
        name=name,
        since=since,
        waiting=waiting,
        paused=paused,
        attributes=filters,
        limit=limit,
    )
    return [{**summary(row), "waiting": _waiting(row)} for row in rows]


@dataclass(frozen=True)
class Waiting:
    """What a running run waits on (see :func:`list_runs`)."""

    on: str
    """``step``, ``timer``, ``signal``, ``child``, ``activation`` or ``nothing`` (stuck)."""
    seq: int | None
    """The position waiting, if one is."""
    name: str | None
    """That position's step, signal or child workflow name."""
    until: datetime | None
    """When its timer fires (a sleep, a retry's back-off, a signal's timeout)."""


@dataclass(frozen=True)
class RunInfo:
    """A run as :meth:`durable.Durable.list_runs` returns it."""

    id: str
    name: str
    status: str
    """``running``, ``completed``, ``failed`` or ``cancelled``."""
    paused: bool
    """Held by ``durable pause`` (its status stays ``running``)."""
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    attributes: dict[str, Any]
    """The run's searchable attributes."""
    waiting: Waiting | None
    """What a running run waits on; None once it has finished."""

    @classmethod
    def of(cls, data: dict[str, Any]) -> RunInfo:
        """The record of one of :func:`list_runs`'s dicts."""
        waiting = data["waiting"]
        return cls(
            id=data["id"],
            name=data["name"],
            status=data["status"],
            paused=data["paused"],
            created_at=data["created_at"],
            updated_at=data["updated_at"],
            finished_at=data["finished_at"],
            attributes=data["attributes"],
            waiting=None if waiting is None else Waiting(**waiting),
        )


def summary(row: Any) -> dict[str, Any]:
    """A run's identity, times and attributes, as ``durable list`` shows them."""
    return {
        "id": row.id,
        "name": row.name,
        "status": row.status,
        "paused": bool(row.paused),
        "created_at": row.created_at,
        "updated_at": row.updated_at,
        "finished_at": row.finished_at,
        "attributes": dict(row.attributes or {}),
    }


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else round((end - start).total_seconds(), 6)


def _attempts(events: list[Any]) -> dict[int, list[dict[str, Any]]]:
    """Each step's attempts, from its history: when each began and ended, and how."""
    out: dict[int, list[dict[str, Any]]] = {}
    ends = {
        "step completed": "completed",
        "step failed": "failed",
        "retry scheduled": "failed, retrying",
        "step attempt": "failed, retrying",
        "step lease expired": "worker lost",
    }
    for h in events:
        if h.seq is None or (h.event != "step started" and h.event not in ends):
            continue
        detail = h.detail if isinstance(h.detail, dict) else {}
        tries = out.setdefault(h.seq, [])
        if h.event == "step started":
            tries.append({"attempt": detail.get("attempt"), "worker": detail.get("worker")})
            tries[-1].update(started_at=h.at, ended_at=None, outcome="running", error=None)
            continue
        if not tries or tries[-1]["ended_at"] is not None:  # a local step: no start event
            tries.append({"attempt": detail.get("attempt"), "worker": None, "started_at": None})
        tries[-1].update(ended_at=h.at, outcome=ends[h.event], error=detail.get("error"))
        tries[-1]["duration"] = _seconds(tries[-1]["started_at"], h.at)
    for tries in out.values():
        for attempt in tries:
            attempt.setdefault("duration", None)
    return out


def _step(row: Any, attempts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "kind": row.kind,
        "name": row.name,
        "status": row.status,
        "attempts": row.attempts,
        "args": row.args,
        "kwargs": row.kwargs,
        "result": row.result,
        "error": row.error,
        "created_at": row.created_at,
        "started_at": row.started_at,
        "completed_at": row.completed_at,
        "duration": _seconds(row.started_at or row.created_at, row.completed_at),
        "attempt_history": attempts,
    }


def describe_run(conn: Connection, workflow_id: str) -> dict[str, Any]:
    """Everything ``durable show`` prints about a run, as JSON-ready data.

    Args:
        conn: A connection to the store.
        workflow_id: The run's id.

    Returns:
        The run's fields (``start_at`` while a delayed start is not due yet); its ``steps``
        (each with ``attempts``, ``duration`` in seconds, ``result``, ``error``, an
        ``attempt_history`` and its ``limit``: None, or the limit's name, the step's ``key``,
        ``priority`` and, while it is queued, its ``position`` in its key's queue, 1 being
        admitted next); ``limit``: None, or for a run of a workflow declared with a limit
        its ``limit``, ``key``, ``priority``, ``queued`` and, while queued, its
        ``position``; ``events`` (key to latest value); ``signals``; ``timers`` (with
        ``lateness`` in seconds once fired); and ``history``.

    Raises:
        WorkflowNotFound: no run has this id.
    """
    row = runs.get_run(conn, workflow_id)
    if row is None:
        raise WorkflowNotFound(workflow_id)
    events = history.list_history(conn, row.id)
    attempts = _attempts(events)
    limited = limit_queries.step_limits(conn, row.id)
    return {
        **summary(row),
        "args": row.args,
        "kwargs": row.kwargs,
        "result": row.result,
        "error": row.error,
        "parent_id": row.parent_id,
        "cancel_requested": row.cancel_requested,
        "start_at": row.start_at,
        "limit": run_limits.run_limit(conn, row.id),
        "steps": [
            {**_step(s, attempts.get(s.seq, [])), "limit": limited.get(s.seq)}
            for s in steps.list_steps(conn, row.id)
        ],
        "events": signals.list_events(conn, row.id),
        "signals": [
            {
                "id": s.id,
                "name": s.name,
                "payload": s.payload,
                "sent_at": s.sent_at,
                "consumed_seq": s.consumed_seq,
                "consumed_at": s.consumed_at,
            }
            for s in signals.list_signals(conn, row.id)
        ],
        "timers": [
            {
                "id": t.id,
                "seq": t.seq,
                "purpose": t.purpose,
                "fire_at": t.fire_at,
                "fired_at": t.fired_at,
                # A timer settled before its time (a signal came first) was not late.
                "lateness": max(_seconds(t.fire_at, t.fired_at) or 0.0, 0.0)
                if t.fired_at
                else None,
            }
            for t in timers.list_timers(conn, row.id)
        ],
        "history": [
            {"at": h.at, "seq": h.seq, "event": h.event, "detail": h.detail} for h in events
        ],
    }


def list_timers(
    conn: Connection, *, pending: bool = True, workflow_id: str | None = None, limit: int = 100
) -> list[dict[str, Any]]:
    """Timers, soonest first: unfired ones unless ``pending`` is False."""
    rows = queries.list_timers(conn, pending=pending, workflow_id=workflow_id, limit=limit)
    return [
        {
            "id": r.id,
            "workflow_id": r.workflow_id,
            "workflow_name": r.workflow_name,
            "seq": r.seq,
            "step": r.step_name,
            "purpose": r.purpose,
            "fire_at": r.fire_at,
            "fired_at": r.fired_at,
        }
        for r in rows
    ]


# -- repairing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resumed:
    """What :func:`resume` sent."""

    workflow_id: str
    steps: list[int]
    """The positions whose step message was sent again."""
    timers: int
    """How many unfired timers were put back in the Redis index."""


def resume(durable: Core, workflow_id: str) -> Resumed:
    """Re-dispatch a running run: wake it and send its activation again.

    A paused run is unpaused (see :func:`unpause`). Its scheduled steps are sent again
    too (a step whose worker died is first put back to scheduled) and its unfired timers
    re-indexed in Redis. Duplicates are harmless: a step message for a claimed step and an
    activation of a leased run do nothing.

    Raises:
        WorkflowNotFound: no run has this id.
        WorkflowNotRunning: the run has ended (``retry`` a failed one).
    """
    done = durable.store(lambda c: queries.resume_run(c, workflow_id))
    if done is None:
        raise WorkflowNotFound(workflow_id)
    if not done.woken:
        raise WorkflowNotRunning(workflow_id, done.status, "resume")
    durable.index_timers(done.timers)
    for step in done.steps:
        durable.send_step(workflow_id, step["seq"], step["name"], step["options"] or {})
    durable.send_activation(workflow_id, done.name)
    return Resumed(workflow_id, sorted(s["seq"] for s in done.steps), len(done.timers))


def pause(durable: Core, workflow_id: str) -> bool:
    """Pause a running run: nothing moves it until :func:`unpause`.

    Its steps are not dispatched (a step already running finishes and its result is kept),
    its timers do not fire, the sweeps leave it alone, and signals sent to it are kept. Its
    status stays ``running``. Returns False when it was paused already (nothing changes).

    Raises:
        WorkflowNotFound: no run has this id.
        WorkflowNotRunning: the run has ended.
    """
    done = durable.store(lambda c: queries.pause_run(c, workflow_id))
    durable.histories.drop(workflow_id)  # no step of it runs unclaimed from this process
    if done is None:
        raise WorkflowNotFound(workflow_id)
    if done.status != "running":
        raise WorkflowNotRunning(workflow_id, done.status, "pause")
    return done.changed


def unpause(durable: Core, workflow_id: str) -> Resumed | None:
    """Let a paused run go on where it stopped; None when it was not paused (nothing changes).

    What came due while it was paused is dispatched now: its unfired timers are put back in
    the Redis index (a due one fires at once), its scheduled steps are sent (a step whose
    worker died is rescheduled first), and its activation replays what it was sent meanwhile.

    Raises:
        WorkflowNotFound: no run has this id.
        WorkflowNotRunning: the run has ended.
    """
    done = durable.store(lambda c: queries.resume_run(c, workflow_id, unpause=True))
    if done is None:
        raise WorkflowNotFound(workflow_id)
    if done.status != "running":
        raise WorkflowNotRunning(workflow_id, done.status, "unpause")
    if not done.woken:
        return None
    durable.index_timers(done.timers)
    for step in done.steps:
        durable.send_step(workflow_id, step["seq"], step["name"], step["options"] or {})
    durable.send_activation(workflow_id, done.name)
    return Resumed(workflow_id, sorted(s["seq"] for s in done.steps), len(done.timers))


def retry(durable: Core, workflow_id: str) -> queries.Retried:
    """Run a failed run again from its first position that did not complete.

    That position and all after it are deleted and run again; earlier results are kept.
    A run of a workflow declared with a limit is queued again for a slot of its key, and
    admitted as any queued run is.

    Raises:
        WorkflowNotFound: no run has this id.
        WorkflowNotFailed: the run is running, completed or cancelled.
    """
    done = durable.store(lambda c: queries.retry_run(c, workflow_id))
    if done is None:
        raise WorkflowNotFound(workflow_id)
    if not done.retried:
        raise WorkflowNotFailed(workflow_id, done.status)
    if done.limit is not None:
        durable.admit_runs([done.limit])
    else:
        durable.send_activation(workflow_id, done.name)
    return done


def fork(
    durable: Core, workflow_id: str, from_step: int, new_id: str | None = None
) -> tuple[str, int]:
    """Start a new run of the same workflow and arguments, reusing results before ``from_step``.

    Completed positions before ``from_step`` are copied with their results, and the run's
    attributes as they are; the new run executes everything from ``from_step`` on. Returns
    the new id (``<id>-fork-<random>`` unless given) and how many positions were copied.

    Raises:
        WorkflowNotFound: no run has this id.
        WorkflowIdTaken: ``new_id`` exists.
        ValueError: ``from_step`` is below 1 or past any position.
        InvalidIdentifier: ``new_id`` breaks the rules of :mod:`durable.ids`.
    """
    if not 1 <= from_step <= MAX_STEP:
        raise ValueError(f"from_step must be between 1 and {MAX_STEP}, not {from_step}")
    target = check_id(new_id, "new workflow id") if new_id is not None else None
    target = target or f"{workflow_id}-fork-{uuid.uuid4().hex[:8]}"
    done = durable.store(lambda c: queries.fork_run(c, workflow_id, target, from_step))
    if done is None:
        raise WorkflowNotFound(workflow_id)
    if not done.created:
        raise WorkflowIdTaken(target)
    durable.send_activation(target, done.name)
    return target, done.copied


def purge(conn: Connection, older_than: timedelta, dry_run: bool = False) -> int:
    """Delete runs that finished more than ``older_than`` ago, with everything they recorded.

    Steps, timers, history, signals and events go with their run. Running runs are never
    touched. With ``dry_run`` only count them. Returns how many runs (would) go.
    """
    age = older_than.total_seconds()
    if dry_run:
        return queries.count_purgeable(conn, age)
    total = 0
    batch = 1000
    while True:
        deleted = queries.purge_runs(conn, age, batch)
        total += deleted
        if deleted < batch:
            return total


def rate_text(interval: float | None) -> str | None:
    """A rate's interval between starts as starts per period: 0.2 -> ``"5/s"``."""
    if interval is None or interval <= 0:
        return None
    for unit, seconds in (("s", 1.0), ("m", 60.0), ("h", 3600.0), ("d", 86400.0)):
        if seconds / interval >= 1 or unit == "d":
            return f"{seconds / interval:.4g}/{unit}"
    return None


def list_limits(conn: Connection, name: str | None = None) -> list[dict[str, Any]]:
    """The registered concurrency limits and their use, as ``durable limits`` shows them.

    Each: ``name``, ``concurrency`` (as the code declares it), ``override`` (set by
    :func:`set_limit`, wins while set), ``effective``, ``rate`` (declared, per second,
    minute, hour or day, e.g. ``"5/s"``; None without one), ``rate_override`` (set by
    :func:`set_limit`, wins while set; None: none), ``running`` (slots held) and ``queued``
    over every key, and ``keys``: the busiest 20 keys with theirs. A limit is registered
    when a step under it is first admitted, or a run of a workflow declared with it started.

    Raises:
        LimitNotFound: ``name`` is given and no limit has it.
    """
    found = limit_queries.limit_use(conn, name)
    if name is not None and not found:
        raise LimitNotFound(name)
    return [
        {
            "name": use.name,
            "concurrency": use.concurrency,
            "override": use.override,
            "effective": use.effective,
            "rate": rate_text(use.rate_interval),
            "rate_override": rate_text(use.rate_override),
            "running": use.running,
            "queued": use.queued,
            "keys": use.keys,
        }
        for use in found
    ]


class Keep(Enum):
    """The type of :data:`KEEP`."""

    KEEP = "keep"


KEEP = Keep.KEEP
"""For :func:`set_limit`: leave this override as it is."""


def override_limit(
    conn: Connection, name: str, concurrency: int | Keep | None, rate: str | Keep | None = KEEP
) -> None:
    """Write a limit's run-time overrides only; the beat's sweep admits what now fits.

    Raises:
        LimitNotFound: no limit has this name.
        InvalidLimit: ``concurrency`` is negative or not an integer, ``rate`` is malformed,
            or the limit declares no rate (only a declared rate can be overridden).
    """
    if concurrency is not None and not isinstance(concurrency, Keep):
        check_concurrency(name, concurrency, allow_zero=True)
    interval = None
    if isinstance(rate, str):
        count, period = parse_rate(name, rate)
        interval = period / count
    exists, declared = limit_queries.declared_rate(conn, name)
    if not exists:
        raise LimitNotFound(name)
    if interval is not None and declared is None:
        raise InvalidLimit(name, "declares no rate: --rate overrides a declared rate only")
    written = limit_queries.set_override(
        conn,
        name,
        None if isinstance(concurrency, Keep) else concurrency,
        interval,
        set_concurrency=not isinstance(concurrency, Keep),
        set_rate=not isinstance(rate, Keep),
    )
    if not written:
        raise LimitNotFound(name)


def set_limit(
    durable: Core, name: str, concurrency: int | Keep | None, rate: str | Keep | None = KEEP
) -> int:
    """Override a limit's concurrency or rate at run time (None: back to the code's).

    Example::

        set_limit(durable, "partner-api", 2)                      # 2 slots per key
        set_limit(durable, "partner-api", KEEP, rate="50/m")      # half the declared rate
        set_limit(durable, "partner-api", None, rate=None)        # both as declared

    An override wins over the declaration until cleared; a concurrency of 0 admits nothing
    (a pause). Steps and runs already holding slots keep them when the limit is lowered;
    raised, the queued steps and runs that now fit are admitted and sent at once. A rate
    override applies to a limit that declares a rate, from its next start on. Returns how
    many were admitted.

    Raises:
        LimitNotFound: no limit has this name.
        InvalidLimit: ``concurrency`` is negative or not an integer, ``rate`` is malformed,
            or the limit declares no rate.
    """
    durable.store(lambda c: override_limit(c, name, concurrency, rate))
    keys = durable.store(lambda c: limit_queries.queued_keys(c, name))
    run_keys = durable.store(lambda c: run_limits.queued_keys(c, name))
    return (durable.admit(keys) if keys else 0) + durable.admit_runs(run_keys)
