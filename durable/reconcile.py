"""Reconciliation: find every way a workflow can be stuck and, when asked, repair it.

``durable beat``'s sweep heals most of these on its own within seconds; reconciliation is the
operator's tool to see them (and the proof that nothing is stuck), and to repair them when no
beat is running. Each finding names a run (and a position), since when it is stuck, and the
action that repairs it:

- ``step-message-lost``: a step scheduled and sent, never claimed. Repair: send it again.
- ``step-worker-dead``: a step started by a worker whose lease expired. Repair: reschedule
  the step and send it.
- ``workflow-not-resumed``: a run woken (a step settled, a timer fired, a signal came) that
  no activation replayed. Repair: send the activation again.
- ``workflow-idle``: a running run with nothing in flight, no timer, no signal wait and no
  activation owed. Repair: wake the run and send an activation.
- ``step-waiting-without-timer``: a sleep or retry back-off whose timer is gone. Repair: set
  a new timer (a sleep keeps its end).
- ``timer-overdue``: an unfired timer past due (no beat is running). Repair: fire it and send
  what it made due.
- ``timer-not-indexed``: an unfired timer missing from the Redis index. Repair: index it.

A run counts as stuck only once it is later than ``grace`` (the ``redispatch_after`` setting
by default), by which time a running beat would have acted. Every repair is conditional on
the state the finder saw, so it is harmless next to a beat doing the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

from durable import deadlines
from durable.store import reconcile as queries
from durable.store import timers as timer_queries

if TYPE_CHECKING:
    from durable.core import Core

FINDINGS = (*queries.FINDERS, "timer-not-indexed")
"""Every kind of finding, in the order reported."""

REPAIRS = {
    "step-message-lost": "re-sent the step",
    "step-worker-dead": "rescheduled and re-sent the step",
    "workflow-not-resumed": "re-sent the activation",
    "workflow-idle": "woke the run and sent an activation",
    "step-waiting-without-timer": "set a new timer",
    "timer-overdue": "fired the timer",
    "timer-not-indexed": "added the timer to the index",
}
PROPOSED = {
    "step-message-lost": "send the step again",
    "step-worker-dead": "reschedule the step and send it",
    "workflow-not-resumed": "send the activation again",
    "workflow-idle": "wake the run and send an activation",
    "step-waiting-without-timer": "set a new timer",
    "timer-overdue": "fire the timer",
    "timer-not-indexed": "add the timer to the index",
}
UNNEEDED = "none: it moved on meanwhile"


@dataclass
class Finding:
    """One stuck item and what was (or would be) done about it."""

    kind: str
    workflow_id: str
    seq: int | None
    name: str
    since: datetime | None
    detail: str
    action: str
    fixed: bool = False
    timer_id: int | None = None


@dataclass
class Report:
    """The findings of one reconciliation, repaired or not."""

    findings: list[Finding]
    fix: bool
    checked_at: datetime

    def counts(self) -> dict[str, int]:
        """How many findings of each kind (every kind present, zero or not)."""
        return count(self.findings)

    @property
    def unresolved(self) -> list[Finding]:
        """The findings not repaired (all of them without ``fix``)."""
        return [f for f in self.findings if not f.fixed]

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "checked_at": self.checked_at,
            "fix": self.fix,
            "counts": self.counts(),
            "findings": [asdict(f) for f in self.findings],
        }


def count(findings: list[Finding]) -> dict[str, int]:
    """How many findings of each kind (every kind present, zero or not)."""
    counts = dict.fromkeys(FINDINGS, 0)
    for finding in findings:
        counts[finding.kind] += 1
    return counts


def _ago(since: datetime | None, now: datetime) -> str:
    if since is None:
        return "?"
    seconds = max((now - since).total_seconds(), 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


_DETAILS: dict[str, Callable[[Any, str], str]] = {
    "step-message-lost": lambda r, ago: f"scheduled, sent {r.info}x, unclaimed for {ago}",
    "step-worker-dead": lambda r, ago: f"lease of {r.info} expired {ago} ago",
    "workflow-not-resumed": lambda r, ago: (
        f"woken {ago} ago" + (f" (step {r.seq} {r.info})" if r.seq else "") + ", not replayed"
    ),
    "workflow-idle": lambda r, ago: f"nothing in flight or waiting for {ago}",
    "step-waiting-without-timer": lambda r, ago: f"{r.info} waiting {ago} with no timer",
    "timer-overdue": lambda r, ago: f"timer {r.info} due {ago} ago, not fired",
    "timer-not-indexed": lambda r, ago: f"timer {r.info} missing from the Redis index",
}


def _finding(kind: str, row: Any, now: datetime) -> Finding:
    timer_id = int(row.info) if kind.startswith("timer-") else None
    return Finding(
        kind=kind,
        workflow_id=row.workflow_id,
        seq=row.seq,
        name=row.name,
        since=row.since,
        detail=_DETAILS[kind](row, _ago(row.since, now)),
        action=PROPOSED[kind],
        timer_id=timer_id,
    )


def _not_indexed(durable: Core, rows: list[Any]) -> list[Any]:
    """The rows whose timer is not in the Redis index."""
    if not rows:
        return []
    missing = set(durable.timer_index.missing([int(row.info) for row in rows]))
    return [row for row in rows if int(row.info) in missing]


def find(durable: Core, grace: float | None = None, limit: int = 500) -> list[Finding]:
    """Every stuck item, up to ``limit`` of each kind, without changing anything.

    Args:
        durable: The app's Durable (its store, and the Redis index of timers).
        grace: Seconds an item may be late before it counts (default: ``redispatch_after``).
        limit: Most findings of each kind.
    """
    if grace is None:
        grace = durable.settings.redispatch_after.total_seconds()
    found: list[Finding] = []
    with durable.connect() as conn:
        now = datetime.now(UTC)
        for kind in queries.FINDERS:
            rows = queries.find_stuck(conn, kind, grace, limit)
            found.extend(_finding(kind, row, now) for row in rows)
        candidates = queries.timers_to_index(conn, grace, limit)
    found.extend(_finding("timer-not-indexed", r, now) for r in _not_indexed(durable, candidates))
    return found


def _keys(findings: list[Finding]) -> list[tuple[str, int]]:
    return [(f.workflow_id, int(f.seq or 0)) for f in findings]


def _mark(findings: list[Finding], done: set[Any], key: Callable[[Finding], Any]) -> None:
    for finding in findings:
        finding.fixed = key(finding) in done
        finding.action = REPAIRS[finding.kind] if finding.fixed else UNNEEDED


def _step_key(f: Finding) -> tuple[str, int | None]:
    return (f.workflow_id, f.seq)


def _repair_steps(
    durable: Core, conn: Connection, by_kind: dict[str, list[Finding]], grace: float
) -> None:
    lost = by_kind["step-message-lost"]
    dead = by_kind["step-worker-dead"]
    sent = [
        *queries.resend_scheduled(conn, _keys(lost), grace),
        *queries.reschedule_expired(conn, _keys(dead)),
    ]
    for step in sent:
        durable.send_step(step.workflow_id, step.seq, step.name, step.options)
    _mark(lost + dead, {(s.workflow_id, s.seq) for s in sent}, _step_key)


def _repair_runs(
    durable: Core, conn: Connection, by_kind: dict[str, list[Finding]], grace: float
) -> None:
    owed = by_kind["workflow-not-resumed"]
    idle = by_kind["workflow-idle"]
    woken = [
        *queries.touch_owed(conn, [f.workflow_id for f in owed], grace),
        *queries.wake_idle(conn, [f.workflow_id for f in idle]),
    ]
    for row in woken:
        durable.send_activation(row.id, row.name)
    _mark(owed + idle, {row.id for row in woken}, lambda f: f.workflow_id)


def _repair_timers(durable: Core, conn: Connection, by_kind: dict[str, list[Finding]]) -> None:
    waiting = by_kind["step-waiting-without-timer"]
    restored = queries.restore_timers(conn, _keys(waiting))
    durable.index_timers([(r.id, r.fire_at) for r in restored])
    _mark(waiting, {(r.workflow_id, r.seq) for r in restored}, _step_key)
    overdue = by_kind["timer-overdue"]
    fired = timer_queries.fire_timers(conn, [int(f.timer_id or 0) for f in overdue])
    for timer in fired:
        deadlines.after_timer(durable, timer)
    _mark(overdue, {t.timer_id for t in fired}, lambda f: f.timer_id)
    missing = by_kind["timer-not-indexed"]
    durable.index_timers([(int(f.timer_id or 0), _epoch(f.since)) for f in missing])
    _mark(missing, {f.timer_id for f in missing}, lambda f: f.timer_id)


def _epoch(moment: datetime | None) -> float:
    return moment.timestamp() if moment is not None else datetime.now(UTC).timestamp()


def repair(durable: Core, findings: list[Finding], grace: float | None = None) -> None:
    """Repair ``findings`` in place: each gets ``fixed`` and the ``action`` taken.

    Each repair applies only if the item is still stuck as it was found (``grace`` as given
    to :func:`find`); one that moved on meanwhile is left alone.
    """
    if grace is None:
        grace = durable.settings.redispatch_after.total_seconds()
    by_kind: dict[str, list[Finding]] = {kind: [] for kind in FINDINGS}
    for finding in findings:
        by_kind[finding.kind].append(finding)
    with durable.connect() as conn:
        _repair_steps(durable, conn, by_kind, grace)
        _repair_runs(durable, conn, by_kind, grace)
        _repair_timers(durable, conn, by_kind)


def reconcile(
    durable: Core, fix: bool = False, grace: float | None = None, limit: int = 500
) -> Report:
    """Find every stuck item and, with ``fix``, repair it; see the module docstring.

    Example::

        report = reconcile(durable, fix=True)
        assert not report.unresolved
    """
    checked_at = datetime.now(UTC)
    findings = find(durable, grace, limit)
    if fix and findings:
        repair(durable, findings, grace)
    return Report(findings, fix, checked_at)
