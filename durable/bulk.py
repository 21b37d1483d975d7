"""Cancel, retry, resume, purge, pause or unpause every run ``durable list``'s filters select.

The on-call engineer's tool for thousands of runs: count and sample them first
(:func:`preview`), then act on them a batch at a time (:func:`run`). Each batch is one
transaction: it locks the batch's runs that still match (a run that moved on since it was
selected, or that another process acted on, is skipped and counted), acts on each, commits,
and only then sends the messages the action owes (activations, re-sent steps, timers to
index). No lock is held across batches. Interrupted, the batches committed stay done; a
batch cut short is rolled back; run again, the runs acted on no longer match (a cancelled
run is asked to stop, a retried one is running, a purged one is gone, a paused one no longer
matches ``pause``) and the rest are done.
Messages lost to an interruption between a commit and its sends are re-sent by the
recovery sweep of ``durable beat`` (or ``durable reconcile --fix``), as after any crash.

Example::

    where = bulk.RunFilter(name="orders.fulfill", waiting="signal", since=timedelta(days=1),
                           attributes=["customer=42"])
    print(bulk.preview(durable, "cancel", where).matched)
    done = bulk.run(durable, "cancel", where, batch_size=100)
    done.acted, done.skipped, done.failed
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from durable import attributes as attribute_rules
from durable.admin import WAITING
from durable.attributes import AttributeFilter
from durable.store import admin as admin_queries
from durable.store import bulk as queries
from durable.store import delayed, tree
from durable.store import engine as store_engine

if TYPE_CHECKING:
    from durable.core import Core

T = TypeVar("T")

ACTIONS = ("cancel", "retry", "resume", "purge", "pause", "unpause")
"""What :func:`run` can do to the runs it selects."""

PAST = {
    "cancel": "cancelled",
    "retry": "retried",
    "resume": "resumed",
    "purge": "purged",
    "pause": "paused",
    "unpause": "unpaused",
}
"""Each action's past participle, as the summaries print it."""


@dataclass(frozen=True)
class RunFilter:
    """Which runs a bulk action selects: the filters of ``durable list``, and an age.

    Each action adds what it needs: ``cancel`` takes running runs not yet asked to stop,
    ``resume`` running runs, ``retry`` failed runs, ``purge`` finished runs, ``pause``
    running runs not paused, ``unpause`` paused runs.
    """

    status: str | None = None
    """Only runs in this status."""
    name: str | None = None
    """Only runs of this workflow."""
    since: datetime | timedelta | None = None
    """Only runs created at or after this time, or within this long before now."""
    waiting: str | None = None
    """Only running runs waiting on a ``step``, a ``timer`` or a ``signal``."""
    older_than: timedelta | None = None
    """Only runs that finished longer ago than this."""
    paused: bool = False
    """Only paused runs."""
    attributes: Mapping[str, Any] | Sequence[AttributeFilter | str] | None = None
    """Only runs whose attributes match: a mapping (equality on each key) or filters
    (``"amount>=100"``, see :mod:`durable.attributes`)."""

    def is_empty(self) -> bool:
        """Whether no filter is set: the action would take every run it applies to."""
        return replace(self, attributes=self.attributes or None) == RunFilter()

    def pinned(self, now: datetime | None = None) -> RunFilter:
        """This filter with ``since`` as a time, so every batch selects by the same one."""
        if not isinstance(self.since, timedelta):
            return self
        return replace(self, since=(now or datetime.now(UTC)) - self.since)

    def criteria(self) -> queries.Criteria:
        """The store's form of the filter (``since`` pinned first)."""
        if self.waiting is not None and self.waiting not in WAITING:
            raise ValueError(f"waiting must be one of {', '.join(WAITING)}, not {self.waiting!r}")
        since = self.pinned().since
        assert not isinstance(since, timedelta)
        older = None if self.older_than is None else self.older_than.total_seconds()
        on_attributes = tuple(attribute_rules.filters_from(self.attributes))
        return queries.Criteria(
            self.status,
            self.name,
            since,
            self.waiting,
            older,
            paused=self.paused,
            attributes=on_attributes,
        )


@dataclass(frozen=True)
class Preview:
    """What :func:`preview` found: how many runs match, and the first ids of them."""

    action: str
    matched: int
    sample: list[str]


@dataclass(frozen=True)
class Batch:
    """One committed batch of :func:`run`."""

    number: int
    acted: list[str]
    skipped: list[str]
    """Selected, but changed before the batch locked them: no longer matching."""
    failed: dict[str, str]
    """Runs whose action raised a database error (rolled back alone), with that error."""


@dataclass
class Outcome:
    """The totals of :func:`run`."""

    action: str
    acted: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    batches: int = 0

    def add(self, batch: Batch) -> None:
        """Count ``batch`` in."""
        self.acted += len(batch.acted)
        self.skipped += len(batch.skipped)
        self.failed.update(batch.failed)
        self.batches += 1


def _check(action: str) -> None:
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")


def preview(target: Core | str, action: str, where: RunFilter, sample: int = 10) -> Preview:
    """How many runs ``action`` would apply to, and the ids of the first ``sample`` of them.

    Writes nothing. Runs are taken in id order, as :func:`run` takes them.

    Args:
        target: The ``Durable``, or the store's database URL.
        action: One of :data:`ACTIONS`.
        where: Which runs.
        sample: How many ids to return.
    """
    _check(action)
    criteria = where.criteria()

    def read(conn: Connection) -> Preview:
        matched = queries.count_matching(conn, action, criteria)
        ids = queries.select_matching(conn, action, criteria, None, sample) if sample else []
        return Preview(action, matched, ids)

    return _read(target, read)


# -- acting on one run, inside the batch's transaction; each returns the sends it owes ----

Send = Callable[["Core"], None]


def _cancel(conn: Connection, wid: str) -> Send | None:
    if delayed.cancel_pending(conn, wid):  # not started yet: ended at once, nothing to send
        return lambda core: None
    flagged = tree.request_cancel(conn, wid)

    def send(core: Core) -> None:
        for run_id, name in flagged:
            core.send_activation(run_id, name)

    return send if flagged else None


def _resume(conn: Connection, wid: str, unpause: bool = False) -> Send | None:
    done = admin_queries.resume_run(conn, wid, unpause=unpause)
    if done is None or not done.woken:
        return None

    def send(core: Core) -> None:
        core.index_timers(done.timers)
        for step in done.steps:
            core.send_step(wid, step["seq"], step["name"], step["options"] or {})
        core.send_activation(wid, done.name)

    return send


def _retry(conn: Connection, wid: str) -> Send | None:
    done = admin_queries.retry_run(conn, wid)
    if done is None or not done.retried:
        return None
    return lambda core: core.send_activation(wid, done.name)


def _pause(conn: Connection, wid: str) -> Send | None:
    done = admin_queries.pause_run(conn, wid)
    if done is None or not done.changed:
        return None
    return lambda core: core.histories.drop(wid)  # nothing runs unclaimed from here


def _unpause(conn: Connection, wid: str) -> Send | None:
    return _resume(conn, wid, unpause=True)


_ACT: dict[str, Callable[[Connection, str], Send | None]] = {
    "cancel": _cancel,
    "resume": _resume,
    "retry": _retry,
    "pause": _pause,
    "unpause": _unpause,
}


def _act_on_each(conn: Connection, action: str, ids: list[str], batch: Batch) -> list[Send]:
    sends = []
    for wid in ids:
        try:
            with conn.begin_nested():  # a run that fails is rolled back alone
                send = _ACT[action](conn, wid)
        except SQLAlchemyError as exc:
            batch.failed[wid] = (str(getattr(exc, "orig", None) or exc).splitlines() or ["?"])[0]
            continue
        if send is None:
            batch.skipped.append(wid)
        else:
            batch.acted.append(wid)
            sends.append(send)
    return sends


@contextmanager
def _transaction(target: Core | str) -> Iterator[Connection]:
    if not isinstance(target, str):
        with target.transaction() as conn:
            yield conn
        return
    engine = store_engine.get_engine(target)
    conn = store_engine.with_retry(target, engine.connect)
    try:
        with conn.begin():
            yield conn
    finally:
        conn.close()


def act(
    target: Core | str, action: str, ids: list[str], where: RunFilter, number: int = 1
) -> Batch:
    """Apply ``action`` to those of ``ids`` that still match ``where``, in one transaction.

    The matching runs are locked, acted on and committed together; then the messages the
    action owes are sent. Runs that no longer match are skipped.

    Args:
        target: The ``Durable`` (cancel, retry, resume and unpause send messages), or for
            ``purge`` and ``pause`` the store's database URL.
        action: One of :data:`ACTIONS`.
        ids: Run ids, as :func:`durable.store.bulk.select_matching` gave them.
        where: The filter they were selected by (``since`` pinned).
        number: The batch's number, for the report.
    """
    _check(action)
    if isinstance(target, str) and action not in ("purge", "pause"):
        raise ValueError(f"{action} sends messages: it needs the Durable, not a database URL")
    criteria = where.criteria()
    batch = Batch(number, [], [], {})
    with _transaction(target) as conn:
        locked = queries.lock_matching(conn, action, criteria, ids)
        still = set(locked)
        batch.skipped.extend(wid for wid in ids if wid not in still)
        if action == "purge":
            queries.purge_ids(conn, locked)
            batch.acted.extend(locked)
            sends: list[Send] = []
        else:
            sends = _act_on_each(conn, action, locked, batch)
    if not isinstance(target, str):
        for send in sends:
            send(target)
    return batch


def run(
    target: Core | str,
    action: str,
    where: RunFilter,
    batch_size: int = 100,
    on_batch: Callable[[Batch], Any] | None = None,
) -> Outcome:
    """Apply ``action`` to every run ``where`` selects, ``batch_size`` runs per transaction.

    Runs are taken in id order; each batch is selected, then locked, acted on and committed
    (:func:`act`), and ``on_batch`` is called with it. Safe to interrupt and run again.

    Args:
        target: The ``Durable`` (cancel, retry, resume and unpause send messages), or for
            ``purge`` and ``pause`` the store's database URL.
        action: One of :data:`ACTIONS`.
        where: Which runs; an empty filter takes every run the action applies to.
        batch_size: Runs per transaction.
        on_batch: Called after each committed batch (to report progress).

    Returns:
        The totals: runs acted on, skipped (changed meanwhile), failed (with their errors).
    """
    _check(action)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, not {batch_size}")
    where = where.pinned()
    criteria = where.criteria()
    outcome = Outcome(action)
    after: str | None = None
    while True:
        ids = _select(target, action, criteria, after, batch_size)
        if not ids:
            return outcome
        batch = act(target, action, ids, where, outcome.batches + 1)
        outcome.add(batch)
        if on_batch is not None:
            on_batch(batch)
        after = ids[-1]


def _select(
    target: Core | str, action: str, criteria: queries.Criteria, after: str | None, size: int
) -> list[str]:
    return _read(target, lambda c: queries.select_matching(c, action, criteria, after, size))


def _read(target: Core | str, fn: Callable[[Connection], T]) -> T:
    """``fn`` on an autocommit connection, retried if the connection fails."""
    if not isinstance(target, str):
        return target.store(fn)
    url = target

    def attempt() -> T:
        with store_engine.autocommit(url).connect() as conn:
            return fn(conn)

    return store_engine.with_retry(url, attempt)
