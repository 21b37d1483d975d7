"""The client: starting runs and talking to them from outside.

These are the bodies of ``Durable.start``, ``Durable.run``, ``Durable.signal``,
``Durable.get_event`` and ``Durable.cancel``, and :class:`WorkflowRun`, the handle ``start``
returns. Each writes to PostgreSQL first (the run created, the signal kept, the cancel flag
set, the run woken) and only then sends the activation, so nothing depends on a worker being
up at that moment.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from durable import activation, delayed, tracing
from durable import attributes as attribute_rules
from durable.durations import seconds
from durable.errors import (
    LimitExceeded,
    ResultTimeout,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowIdConflict,
    WorkflowNotFound,
    WorkflowNotRunning,
)
from durable.store import delayed as delayed_queries
from durable.store import notices, run_limits
from durable.store import runs as run_queries
from durable.store import signals as signal_queries
from durable.store import tree as tree_queries

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from durable.core import Core

T = TypeVar("T")


def start(
    core: Core,
    name_or_fn: str | Callable[..., Any],
    /,
    *args: Any,
    workflow_id: str | None = None,
    start_at: datetime | None = None,
    countdown: timedelta | float | None = None,
    debounce: timedelta | float | None = None,
    debounce_max: timedelta | float | None = None,
    attributes: Mapping[str, Any] | None = None,
    priority: int | None = None,
    **kwargs: Any,
) -> WorkflowRun:
    """Start a workflow, or return the existing run when ``workflow_id`` is taken.

    Example::

        run = durable.start("orders.fulfill", "o-1", workflow_id="order-o-1",
                            attributes={"customer": 42})

    ``attributes`` are the run's searchable attributes (:mod:`durable.attributes`), written
    by the statement that creates the run; bad ones raise
    :class:`~durable.errors.InvalidAttributes` and nothing is written. A run that existed
    keeps its own.

    Arguments must be JSON-serialisable and within ``max_payload_bytes``; otherwise
    :class:`~durable.errors.PayloadError` is raised and nothing is written. The run is
    committed before its first message is sent; if the broker cannot be reached the
    run still starts, sent again by ``durable beat``'s recovery sweep.

    With the setting ``eager_start`` (the default) the workflow's code runs here, in memory,
    up to its first durable operation; if that is one or more remote steps they are
    scheduled in the statement that creates the run and sent at once, saving the first
    activation's broker hop (a local step, a sleep, a wait, ``ctx.now()`` or a workflow not
    registered in this process start the run as usual, with an activation).

    ``start_at`` (an aware datetime) or ``countdown`` (seconds or a timedelta) delays the
    start with a durable timer; ``debounce`` (with a ``workflow_id``) starts the run that
    long after the last call, each call inside the window replacing its arguments, and
    ``debounce_max`` bounds how long after the first call it may wait: see
    :mod:`durable.delayed`.

    A workflow declared with a ``limit`` writes its run ``queued`` for a slot of its key (the
    key function run here, on the arguments; ``priority`` its place in the queue) and admits
    it at once if the key has room and no run of higher or equal priority waits: see
    :mod:`durable.store.run_limits`. Such a run starts without an eager start, and cannot be
    delayed or debounced (``ValueError``). For any other workflow ``priority`` is passed to
    the workflow as its own keyword argument, as before.
    """
    timing = delayed.start_time(workflow_id, start_at, countdown, debounce, debounce_max)
    name = core.workflow_name(name_or_fn)
    if priority is not None and name not in core.workflow_limits:
        kwargs["priority"] = priority  # the workflow's own keyword argument, not durable's
        priority = None
    limit = _run_limit(core, name, list(args), kwargs, priority, timing is not None)
    attributes_json = attribute_rules.to_json(attribute_rules.check(attributes or {}))
    args_json = core.encode(list(args), f"arguments of workflow {name}")
    kwargs_json = core.encode(kwargs, f"keyword arguments of workflow {name}")
    wid = workflow_id or uuid.uuid4().hex
    with tracing.start_span(name, wid) as carrier:
        if limit is not None:
            trace = json.dumps(carrier) if carrier else None
            _start_limited(core, wid, name, args_json, kwargs_json, attributes_json, trace, limit)
        elif timing is not None:
            given = None if attributes is None else attributes_json
            trace = json.dumps(carrier) if carrier else None
            delayed.start_delayed(core, name, wid, args_json, kwargs_json, timing, given, trace)
        else:
            _start(core, wid, name, args_json, kwargs_json, attributes_json, carrier)
    return WorkflowRun(core, wid)


def _start(
    core: Core,
    wid: str,
    name: str,
    args_json: str,
    kwargs_json: str,
    attributes_json: str,
    carrier: tracing.Carrier | None,
) -> None:
    timeout = core.execution_timeouts.get(name)
    eager = None
    if core.settings.eager_start:
        eager = activation.replay_new_run(core, wid, name, args_json, kwargs_json, carrier)
    steps = None
    if eager is not None:
        steps = "[" + ",".join(step.as_json() for step in eager.effects.schedules) + "]"
    trace = json.dumps(carrier) if carrier else None
    inserted = core.store(
        lambda c: run_queries.insert_run(
            c, wid, name, args_json, kwargs_json, timeout, steps, attributes_json, trace
        )
    )
    created = inserted.created
    if inserted.timer:
        core.index_timers([inserted.timer])
    existing = None if created else core.store(lambda c: run_queries.get_run(c, wid))
    if existing is not None and existing.name != name:
        raise WorkflowIdConflict(wid, existing.name, name)
    if created and eager is not None:
        # The first steps' messages, no activation; one step alone may run unclaimed.
        core.apply_effects(eager.effects, first=len(eager.effects.schedules) == 1)
    elif created:
        core.send_activation(wid, name)


def _run_limit(
    core: Core,
    name: str,
    args: list[Any],
    kwargs: dict[str, Any],
    priority: int | None,
    delayed_start: bool,
) -> tuple[str, str, int] | None:
    """The run's (limit name, key, priority) if its workflow declares a limit, else None.

    Raises ``ValueError`` for a delayed limited start, and
    :class:`~durable.errors.LimitKeyError` or ``InvalidLimit`` for a bad key or priority.
    """
    limit = core.workflow_limits.get(name)
    if limit is None:
        return None
    if delayed_start:
        raise ValueError(f"start: {name} runs under a limit and cannot be delayed or debounced")
    return limit.for_run(args, kwargs, 0 if priority is None else priority)


def _start_limited(
    core: Core,
    wid: str,
    name: str,
    args_json: str,
    kwargs_json: str,
    attributes_json: str,
    trace: str | None,
    limit: tuple[str, str, int],
) -> None:
    """Write a limited run queued, and admit what fits of its key, in one transaction."""
    timeout = core.execution_timeouts.get(name)
    declared = core.workflow_limits[name].concurrency or 0

    def write(conn: Any) -> tuple[run_queries.Inserted, list[tuple[str, str]]]:
        run_limits.declare(conn, limit[0], limit[1], declared)
        inserted = run_queries.insert_run(
            conn, wid, name, args_json, kwargs_json, timeout, None, attributes_json, trace, limit
        )
        admitted = run_limits.admit(conn, limit[0], limit[1]) if inserted.created else []
        return inserted, admitted

    inserted, admitted = core.atomically(write)
    if inserted.timer:
        core.index_timers([inserted.timer])
    if not inserted.created:
        existing = core.store(lambda c: run_queries.get_run(c, wid))
        if existing is not None and existing.name != name:
            raise WorkflowIdConflict(wid, existing.name, name)
    core.send_activations(admitted)


def start_many(
    core: Core,
    name_or_fn: str | Callable[..., Any],
    args_list: Sequence[Sequence[Any]],
    *,
    workflow_ids: Sequence[str | None] | None = None,
    kwargs_list: Sequence[dict[str, Any]] | None = None,
    start_at: datetime | None = None,
    countdown: timedelta | float | None = None,
    attributes_list: Sequence[Mapping[str, Any] | None] | None = None,
) -> list[WorkflowRun]:
    """Start many runs of one workflow: one statement, then their messages on one producer.

    Example::

        runs = durable.start_many("orders.fulfill", [("o-1",), ("o-2",)],
                                  workflow_ids=["order-o-1", "order-o-2"])

    Each run is what ``start(name_or_fn, *args, workflow_id=..., **kwargs)`` makes of it,
    eager start included: an id that exists returns its run and writes nothing (or raises
    :class:`WorkflowIdConflict` if it is another workflow's, after the others started). A
    payload error or bad attributes (``attributes_list``, one mapping or None per run) raise
    before anything is written. Returns the runs in order.

    ``start_at`` or ``countdown`` delays every run to that one start time, as ``start``
    does (one statement still; no message is sent until the beat starts them).
    """
    timing = delayed.start_time(None, start_at, countdown)
    name = core.workflow_name(name_or_fn)
    count = len(args_list)
    ids: list[str | None] = list(workflow_ids) if workflow_ids is not None else [None] * count
    kwargs_each = list(kwargs_list) if kwargs_list is not None else [{}] * count
    attrs_each: list[Mapping[str, Any] | None] = (
        list(attributes_list) if attributes_list is not None else [None] * count
    )
    if len(ids) != count or len(kwargs_each) != count or len(attrs_each) != count:
        raise ValueError(
            "start_many: args_list, workflow_ids, kwargs_list and attributes_list differ in length"
        )
    if name in core.workflow_limits:  # each run queued and admitted as start() does it
        if timing is not None:
            raise ValueError(f"start: {name} runs under a limit and cannot be delayed")
        return [
            start(core, name, *args, workflow_id=wid, attributes=attrs, **kw)
            for args, wid, kw, attrs in zip(args_list, ids, kwargs_each, attrs_each, strict=True)
        ]
    with tracing.start_span(name) as carrier:
        return _start_many(core, name, args_list, ids, kwargs_each, attrs_each, timing, carrier)


def _start_many(
    core: Core,
    name: str,
    args_list: Sequence[Sequence[Any]],
    ids: list[str | None],
    kwargs_each: list[dict[str, Any]],
    attrs_each: list[Mapping[str, Any] | None],
    timing: delayed.StartTime | None,
    carrier: tracing.Carrier | None,
) -> list[WorkflowRun]:
    new: list[run_queries.NewRun] = []
    eager: dict[str, Any] = {}
    for args, kwargs, given, attrs in zip(args_list, kwargs_each, ids, attrs_each, strict=True):
        attributes_json = attribute_rules.to_json(attribute_rules.check(attrs or {}))
        args_json = core.encode(list(args), f"arguments of workflow {name}")
        kwargs_json = core.encode(kwargs, f"keyword arguments of workflow {name}")
        wid = given or uuid.uuid4().hex
        found = None
        if core.settings.eager_start and timing is None:
            found = activation.replay_new_run(core, wid, name, args_json, kwargs_json, carrier)
        steps = None
        if found is not None:
            eager[wid] = found.effects
            steps = "[" + ",".join(step.as_json() for step in found.effects.schedules) + "]"
        new.append(run_queries.NewRun(wid, args_json, kwargs_json, steps, attributes_json))
    timeout = core.execution_timeouts.get(name)
    trace = json.dumps(carrier) if carrier else None
    if timing is not None:
        rows = "[" + ",".join(r.as_json() for r in new) + "]"
        when = timing.when()
        created, timers = core.store(
            lambda c: delayed_queries.insert_delayed_runs(c, name, rows, timeout, when, trace)
        )
    else:
        created, timers = core.store(
            lambda c: run_queries.insert_runs(c, name, new, timeout, trace)
        )
    core.index_timers(timers)
    core.apply_many(
        [eager[r.workflow_id] for r in new if r.workflow_id in created and r.workflow_id in eager],
        [
            (r.workflow_id, name)
            for r in new
            if r.workflow_id in created and r.workflow_id not in eager
        ],
    )
    existing = [r.workflow_id for r in new if r.workflow_id not in created]
    if existing:
        names = core.store(lambda c: run_queries.run_names(c, existing))
        for wid in existing:
            if names.get(wid, name) != name:
                raise WorkflowIdConflict(wid, names[wid], name)
    return [WorkflowRun(core, r.workflow_id) for r in new]


def run(core: Core, workflow_id: str) -> WorkflowRun:
    """A handle on an existing run; raises :class:`WorkflowNotFound` if there is none."""
    if core.store(lambda c: run_queries.get_run(c, workflow_id)) is None:
        raise WorkflowNotFound(workflow_id)
    return WorkflowRun(core, workflow_id)


def signal(core: Core, workflow_id: str, name: str, payload: Any = None) -> None:
    """Deliver signal ``name`` with ``payload`` to a running workflow."""
    text = core.encode(payload, f"payload of signal {name!r}")
    settings = core.settings
    total, per_minute = settings.max_signals, settings.max_signals_per_minute
    sent = core.store(
        lambda c: signal_queries.send_signal(c, workflow_id, name, text, total, per_minute)
    )
    if sent.status is None:
        raise WorkflowNotFound(workflow_id)
    if sent.signal_id is None and sent.status != "running":
        raise WorkflowNotRunning(workflow_id, sent.status, f"signal {name!r} to")
    if sent.signal_id is None and sent.total >= total:
        raise LimitExceeded(workflow_id, "max_signals", total)
    if sent.signal_id is None:
        raise LimitExceeded(workflow_id, "max_signals_per_minute", per_minute)
    core.send_activation(workflow_id, sent.workflow)


def get_event(
    core: Core, workflow_id: str, key: str, timeout: timedelta | float | None = None
) -> Any:
    """The latest value a workflow published under ``key``, or None.

    With ``timeout`` (seconds or a timedelta) wait up to that long for the key to be set.
    """

    def read() -> tuple[Any] | None:
        row = core.store(lambda c: signal_queries.get_event(c, workflow_id, key))
        if row is not None:
            return (core.decode(row.value),)
        if core.store(lambda c: run_queries.get_run(c, workflow_id)) is None:
            raise WorkflowNotFound(workflow_id)
        return None

    found = wait_for(core, notices.EVENT, workflow_id, read, seconds(timeout) or 0.0)
    return None if found is None else found[0]


def wait_for(
    core: Core,
    channel: str,
    workflow_id: str,
    read: Callable[[], T | None],
    timeout: float | None,
) -> T | None:
    """Call ``read`` until it returns something (returned) or ``timeout`` passes (None).

    Between reads the wait sleeps until PostgreSQL notifies ``channel`` about
    ``workflow_id`` (``durable.store.notices``), re-reading every ``notices.RECHECK``
    seconds all the same; where LISTEN does not work it polls with back-off (5 ms up to
    250 ms). A first read that finds what it waits for opens no listener.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    found = read()
    if found is not None or timeout == 0:
        return found
    delay = 0.005
    with notices.waiter(core.settings.database_url, channel, workflow_id) as waiter:
        while True:
            found = read()
            if found is not None:
                return found
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            pause = notices.RECHECK if waiter.pushed else delay
            delay = min(delay * 1.5, 0.25)
            waiter.wait(pause if left is None else min(pause, left))


def wait_for_end(core: Core, workflow_id: str, timeout: float | None) -> Any:
    """The run's status, result and error once it has ended, or when ``timeout`` has passed."""
    last: list[Any] = []

    def read() -> Any:
        row = core.store(lambda c: run_queries.get_outcome(c, workflow_id))
        if row is None:
            raise WorkflowNotFound(workflow_id)
        last[:] = [row]
        return row if row.status != "running" else None

    ended = wait_for(core, notices.ENDED, workflow_id, read, timeout)
    return ended if ended is not None else last[0]


def cancel(core: Core, workflow_id: str) -> list[str]:
    """Ask a running workflow (and its child workflows) to stop; returns the runs flagged.

    The workflow gets :class:`~durable.errors.WorkflowCancelled` at its next step, sleep or
    signal wait, may compensate in ``except``/``finally``, and ends ``cancelled``. A step
    already running finishes and its result is recorded. Cancelling twice is harmless.
    A run still waiting for its delayed start, or queued for a slot of its limit, ends
    ``cancelled`` at once. A child queued for its limit when its parent is cancelled stays
    queued, flagged: its parent is cancelled where it waits for it, and once admitted the
    child ends ``cancelled`` at its first position without running a step.
    """
    if core.store(lambda c: delayed_queries.cancel_pending(c, workflow_id)):
        return [workflow_id]  # it had not started: ended at once, nothing to deliver
    if _cancel_queued(core, workflow_id):
        return [workflow_id]
    flagged = core.store(lambda c: tree_queries.request_cancel(c, workflow_id))
    if not flagged:
        row = core.store(lambda c: run_queries.get_run(c, workflow_id))
        if row is None:
            raise WorkflowNotFound(workflow_id)
        if row.status != "running":
            raise WorkflowNotRunning(workflow_id, row.status, "cancel")
    for wid, name in flagged:
        core.send_activation(wid, name)
    return [wid for wid, _ in flagged]


def _cancel_queued(core: Core, workflow_id: str) -> bool:
    """End the run at once if it is queued for a slot of its limit; False if it is not."""
    ended = core.store(lambda c: run_limits.cancel_queued(c, workflow_id))
    if ended.parent is not None:
        core.send_activation(*ended.parent)
    return ended.cancelled


# Celery's task states, as ``WorkflowRun.state`` reports a run's status.
PENDING, STARTED, SUCCESS, FAILURE, REVOKED = "PENDING", "STARTED", "SUCCESS", "FAILURE", "REVOKED"
CELERY_STATES = {"completed": SUCCESS, "failed": FAILURE, "cancelled": REVOKED}


class WorkflowRun:
    """A handle on one workflow run, answering like Celery's ``AsyncResult``.

    Durable's verbs: ``run.id``, ``run.status()``, ``run.result(timeout=60)``. Celery's:
    ``run.task_id``, ``run.state``, ``run.get(timeout=60)``, ``run.ready()``,
    ``run.successful()``, ``run.failed()``, ``run.info``, ``run.traceback`` and
    ``run.revoke()``, so code that waited on a Celery chain keeps working. ``result`` stays
    durable's method (``run.result(timeout=60)``); ``run.info`` is the value Celery's
    ``AsyncResult.result`` property gives.

    Example::

        run = durable.chain(validate.s("o-1"), charge.s()).apply_async()
        run.get(timeout=60)          # as AsyncResult.get: raises WorkflowFailed on failure
        run.state                    # "SUCCESS"
    """

    def __init__(self, core: Core, workflow_id: str) -> None:
        self._core = core
        self.id = workflow_id
        """The run's workflow id."""

    def __repr__(self) -> str:
        return f"WorkflowRun({self.id!r})"

    def _row(self) -> Any:
        row = self._core.store(lambda c: run_queries.get_run(c, self.id))
        if row is None:
            raise WorkflowNotFound(self.id)
        return row

    def status(self) -> str:
        """``running``, ``completed``, ``failed`` or ``cancelled``."""
        return str(self._row().status)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to end and return its result.

        Raises :class:`~durable.errors.WorkflowFailed` or ``WorkflowCancelled`` when it
        did not complete, and :class:`~durable.errors.ResultTimeout` (a ``TimeoutError``)
        after ``timeout`` seconds.
        """
        row = wait_for_end(self._core, self.id, timeout)
        if row.status == "completed":
            return self._core.decode(row.result)
        if row.status == "failed":
            raise WorkflowFailed(self.id, self._core.readable_error(row.error or ""))
        if row.status == "cancelled":
            raise WorkflowCancelled(self.id)
        raise ResultTimeout(self.id, float(timeout or 0), row.status)

    # -- as Celery's AsyncResult -----------------------------------------------------------------

    @property
    def task_id(self) -> str:
        """Celery's name for :attr:`id`."""
        return self.id

    @property
    def state(self) -> str:
        """The run's status in Celery's words.

        ``PENDING`` while running and no step has started yet (a delayed start included),
        ``STARTED`` once one has (a task step claimed by a worker, a local step, a child
        workflow), then ``SUCCESS`` (completed), ``FAILURE`` (failed) or ``REVOKED``
        (cancelled).
        """
        row = self._core.store(lambda c: run_queries.get_run_state(c, self.id))
        if row is None:
            raise WorkflowNotFound(self.id)
        if row.status == "running":
            return STARTED if row.begun else PENDING
        return CELERY_STATES[row.status]

    def get(
        self, timeout: float | None = None, propagate: bool = True, interval: float = 0.5
    ) -> Any:
        """Celery's ``AsyncResult.get``: wait for the run to end and return its result.

        Waits as :meth:`result` does and raises what it raises. With ``propagate=False`` a
        failed or cancelled run's error (``WorkflowFailed``, ``WorkflowCancelled``) is
        returned instead of raised; running out of ``timeout`` still raises
        :class:`~durable.errors.ResultTimeout`. ``interval`` is accepted for Celery's
        callers; the wait paces itself.
        """
        del interval  # the wait is result()'s own
        try:
            return self.result(timeout=timeout)
        except (WorkflowFailed, WorkflowCancelled) as exc:
            if propagate:
                raise
            return exc

    def ready(self) -> bool:
        """True once the run has ended: completed, failed or cancelled."""
        return self.status() in run_queries.TERMINAL

    def successful(self) -> bool:
        """True if the run completed."""
        return self.status() == "completed"

    def failed(self) -> bool:
        """True if the run failed (a cancelled run is ``REVOKED``, not failed, as in Celery)."""
        return self.status() == "failed"

    @property
    def info(self) -> Any:
        """Celery's ``AsyncResult.result`` (and ``info``), without waiting.

        The result of a completed run, the error of a failed or cancelled one
        (``WorkflowFailed``, ``WorkflowCancelled``), None while it runs.
        """
        row = self._row()
        if row.status == "completed":
            return self._core.decode(row.result)
        if row.status == "failed":
            return WorkflowFailed(self.id, self._core.readable_error(row.error or ""))
        if row.status == "cancelled":
            return WorkflowCancelled(self.id)
        return None

    @property
    def traceback(self) -> str | None:
        """A failed run's recorded error (its exception's type and message), else None.

        Durable stores why a run failed, not a Python traceback: the worker's log has that.
        """
        row = self._row()
        failed = row.status == "failed" and row.error
        return self._core.readable_error(str(row.error)) if failed else None

    def revoke(
        self,
        terminate: bool = False,
        signal: str | None = None,
        wait: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Celery's ``AsyncResult.revoke``: cancel the run (see :func:`cancel`).

        Revoking a run that has ended does nothing, as with a finished Celery task. With
        ``wait`` it returns once the run has ended (up to ``timeout`` seconds, then
        :class:`~durable.errors.ResultTimeout`). ``terminate=True`` is refused: a step
        already running always finishes and its result is recorded.
        """
        del signal  # only meaningful with terminate
        if terminate:
            raise ValueError(
                "revoke(terminate=True) is refused: durable cancels a run at its next step, "
                "sleep or signal wait and lets a running step finish; bound a step with "
                "timeout= (or the task's time_limit) instead"
            )
        try:
            cancel(self._core, self.id)
        except WorkflowNotRunning:
            return
        if wait:
            self.get(timeout=timeout, propagate=False)
