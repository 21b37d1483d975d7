"""Histories of runs this process advanced, kept in memory for the run's next step.

A worker that settles a step and schedules the run's next steps in the same statement (see
``durable.runner``) knows the run's whole history at that moment: what its claim read, this
step's outcome and the steps it just scheduled. When the next step's message reaches the same
process, its claim need not read that history again: it reads the run's wake counter, and if
the run is still at rest at the counter the history was kept for, nothing that replay looks
at has changed (every change a replay can see, a step settled, a signal, a timer, a cancel,
an admin command, increments the counter), so the kept history is the run's. The counter is
the run's version, ``wake_seq + advances`` (see ``durable.store.steps``): a settle that
advanced the run counts in ``advances``.

Bounded by ``Settings.history_cache_size`` runs, least recently used first out; a prefork
worker keeps one cache per child process. A kept run that a read returned with its
``wake_seq`` alone (``Activation.woken``) also lets a later read of that run return only the
positions its advances can have changed (:func:`first_open` on), when it was not woken
since (see ``durable.store.steps.read_first_step``). A kept history is never trusted on its
own: the claim's wake counter decides, and the settle checks the run again under its row
lock.

When a settle (or an activation that did nothing else) scheduled exactly one step and left
nothing else open, the cache also keeps that step as it was written (name, arguments,
options): if its first delivery reaches this process, the step can run without a claim at
all (see ``durable.runner``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import replace
from datetime import datetime

from durable.effects import Effects
from durable.store.records import StepRecord
from durable.store.runs import Activation
from durable.store.steps import NewStep

# Positions that are over: a run whose history holds nothing else waits on its new steps only.
_SETTLED = frozenset({"completed", "failed"})


class HistoryCache:
    """The runs (with their histories) this process advanced, by workflow id."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._runs: OrderedDict[str, Activation] = OrderedDict()
        self._fresh: dict[str, NewStep] = {}
        self._lock = threading.Lock()  # a threads pool settles steps concurrently

    def held(self, workflow_id: str) -> Activation | None:
        """The kept run of ``workflow_id`` as it is, if any (its use is checked by the caller)."""
        with self._lock:
            return self._runs.get(workflow_id)

    def wake_of(self, workflow_id: str) -> int | None:
        """The wake counter the kept history of ``workflow_id`` is valid at, if any."""
        with self._lock:
            run = self._runs.get(workflow_id)
            return None if run is None else run.wake_seq

    def get(self, workflow_id: str, wake_seq: int, created_at: datetime) -> Activation | None:
        """The kept run if it is that run (``created_at``) at ``wake_seq``; else None.

        A run that does not match is dropped.
        """
        with self._lock:
            run = self._runs.get(workflow_id)
            if run is None:
                return None
            if run.wake_seq != wake_seq or run.created_at != created_at:
                del self._runs[workflow_id]
                self._fresh.pop(workflow_id, None)
                return None
            self._runs.move_to_end(workflow_id)
            return run

    def keep_advanced(
        self,
        run: Activation,
        steps: list[StepRecord],
        new: list[NewStep],
        settled_at: datetime | None,
        first: bool = True,
    ) -> bool:
        """Keep ``run`` as it is after a settle advanced it: one wake later, with ``new``.

        ``steps`` is the history the in-memory replay used (the settled step's commit time
        still unknown there: ``settled_at`` fills it in). ``first``: the settle wrote the
        new steps (they were not there already), so their messages are first dispatches.
        Returns whether the one new step is a first dispatch and the run's one open
        position, which its message then says (it may run unclaimed, see ``durable.runner``),
        whether or not this cache keeps it.
        """
        sole = first and len(new) == 1 and all(r.status in _SETTLED for r in steps)
        if self.size > 0:
            history = [_with_time(record, settled_at) for record in steps]
            history.extend(_scheduled(step) for step in new)
            kept = replace(run, wake_seq=run.wake_seq + 1, steps=history)
            self._keep(kept, new[0] if sole else None)
        return sole

    def keep_at_rest(self, run: Activation, effects: Effects) -> bool:
        """Keep ``run`` as an activation just released it, if it then waits on one new step.

        Only when every position of the history it read was already over and the one new
        step is the next position: then nothing else moved during the activation (no local
        step, sleep, signal, event or child recorded), and ``run``'s history plus that step
        is the run's at the wake counter the release left it at rest. Returns whether the
        step qualifies (its message then says it may run unclaimed, see :meth:`take_fresh`),
        whether or not this cache keeps it.
        """
        new = effects.schedules
        if len(new) != 1 or len(effects.dispatches) != 1:
            return False
        if effects.timers or effects.activations or run.cancel_requested:
            return False
        if not all(record.status in _SETTLED for record in run.steps):
            return False
        if new[0].seq != max((record.seq for record in run.steps), default=0) + 1:
            return False
        if self.size > 0:
            history = [_with_time(record, None) for record in run.steps]
            history.append(_scheduled(new[0]))
            self._keep(replace(run, steps=history), new[0])
        return True

    def _keep(self, run: Activation, fresh: NewStep | None) -> None:
        """Keep ``run`` (and ``fresh``, its one new step, for :meth:`take_fresh`)."""
        with self._lock:
            self._runs[run.workflow_id] = run
            self._runs.move_to_end(run.workflow_id)
            if fresh is not None:
                self._fresh[run.workflow_id] = fresh
            else:
                self._fresh.pop(run.workflow_id, None)
            while len(self._runs) > self.size:
                gone, _ = self._runs.popitem(last=False)
                self._fresh.pop(gone, None)

    def take_fresh(self, workflow_id: str, seq: int) -> tuple[Activation, NewStep] | None:
        """The kept run and its step ``seq`` if this process scheduled it alone; else None.

        Alone: as the run's only open position. Once: the step is forgotten here whatever
        happens next.
        """
        with self._lock:
            step = self._fresh.pop(workflow_id, None)
            run = self._runs.get(workflow_id)
            if step is None or run is None or step.seq != seq:
                return None
            self._runs.move_to_end(workflow_id)
            return run, step

    def drop(self, workflow_id: str) -> None:
        """Forget ``workflow_id`` (it moved on some other way)."""
        with self._lock:
            self._runs.pop(workflow_id, None)
            self._fresh.pop(workflow_id, None)


def first_open(steps: list[StepRecord]) -> int:
    """The lowest position of ``steps`` not over (past the last if every one is).

    Positions below it are settled, and a settle never changes a settled position: from
    there on is all that the run's advances can have changed since ``steps`` was read.
    """
    open_positions = [r.seq for r in steps if r.status not in _SETTLED]
    return min(open_positions, default=max((r.seq for r in steps), default=0) + 1)


def alone(steps: list[StepRecord], seq: int) -> bool:
    """Whether step ``seq`` is the last position of ``steps`` and every other one is over."""
    return all(r.status in _SETTLED for r in steps if r.seq != seq) and seq == max(
        (r.seq for r in steps), default=seq
    )


def _scheduled(step: NewStep) -> StepRecord:
    """The history record of a remote step just scheduled."""
    return StepRecord(step.seq, "task", step.name, "scheduled")


def _with_time(record: StepRecord, settled_at: datetime | None) -> StepRecord:
    """``record`` with its commit time, once the statement settling it has committed."""
    if record.settling:
        return replace(record, completed_at=settled_at, settling=False)
    return record
