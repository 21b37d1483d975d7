"""Queries on delayed and debounced starts: a run that waits for its start time.

A delayed run is written at once (its id is taken, ``durable show`` shows it) with
``start_at`` set and a ``start`` timer at position 0; it is at rest (``wake_seq = run_seq =
0``), and neither an activation (``runs.acquire``) nor the owed-activation sweep touches it
while ``start_at`` is set. The timer's firing (``timers.fire_timers``) clears ``start_at``,
writes ``started`` and wakes the run, and the beat sends its first activation.

A debounce and the start timer's firing serialize on the timer's row: both begin by setting
its ``fired_at`` where it is NULL, so whichever commits first wins and the other finds no
unfired timer. Only a debounce that took it moves the run, then retires its other timer
(the execution timeout's) and writes new ones (the old ids may still sit in the Redis
index: claimed, they fire nothing); one that lost leaves every timer alone, so a run the
firing started keeps its deadline. Cancelling a run that has not started takes the same row
first, the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sqlalchemy import Connection

from durable.store.notices import ENDED, notify_sql
from durable.store.statement import statement

# The run's start time: an absolute :start_at, else now + :delay seconds, by PostgreSQL's
# clock, capped at the run's creation + :cap seconds (``debounce_max``; least() ignores NULL).
_START_AT = """
    least(coalesce(CAST(:start_at AS timestamptz),
                   now() + make_interval(secs => CAST(:delay AS float8))),
          {created} + make_interval(secs => CAST(:cap AS float8)))
"""

# Its timers: 'start' at the start time, and the execution timeout's 'deadline' counted from
# it, both at position 0, for the run(s) of CTE ``w`` (id, start_at, deadline_at).
_TIMERS = """
    t AS (
        INSERT INTO durable_timers (workflow_id, seq, purpose, fire_at)
        SELECT id, 0, 'start', start_at FROM w
        UNION ALL
        SELECT id, 0, 'deadline', deadline_at FROM w WHERE deadline_at IS NOT NULL
        RETURNING id, fire_at
    )"""

_TIMERS_JSON = """
    (SELECT coalesce(jsonb_agg(jsonb_build_array(id, extract(epoch FROM fire_at))), '[]')
       FROM t) AS timers
"""

# Delayed runs of one workflow, all due at one start time (``durable.start``, one run, and
# ``durable.start_many``); the runs arrive as one JSON array of {id, args, kwargs,
# attributes}, as ``runs.insert_runs`` takes them. History left by a run deleted under an id
# is cleared, as ``runs.insert_run`` clears it.
_INSERT_MANY = statement(
    """
    WITH r AS (
        SELECT * FROM jsonb_to_recordset(CAST(:runs AS jsonb))
               AS r(id text, args jsonb, kwargs jsonb, attributes jsonb)
    ), s AS (SELECT """
    + _START_AT.format(created="now()")
    + """ AS at
    ), w AS (
        INSERT INTO durable_workflows (id, name, status, args, kwargs, start_at, deadline_at,
                                       wake_seq, run_seq, attributes, trace_context)
        SELECT r.id, :name, 'running', r.args, r.kwargs, s.at,
               s.at + make_interval(secs => CAST(:timeout AS float8)), 0, 0,
               coalesce(r.attributes, '{}'), CAST(:trace AS jsonb)
          FROM r, s
        ON CONFLICT (id) DO NOTHING
        RETURNING id, start_at, deadline_at
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT id, NULL, 'start delayed',
               jsonb_build_object('name', CAST(:name AS text), 'start_at', start_at)
          FROM w
    ), """
    + _TIMERS
    + """, stale AS (
        DELETE FROM durable_history WHERE workflow_id IN (SELECT id FROM w)
    )
    SELECT (SELECT coalesce(jsonb_agg(id), '[]') FROM w) AS created, """
    + _TIMERS_JSON
)

# Take the pending run's unfired timers first (the firing's own first lock, so the two
# serialize there, in the same order), then move the run: new arguments, new start time, new
# timers. Nothing is written unless the run still waits for its start under this name.
_DEBOUNCE = statement(
    """
    WITH old AS (
        UPDATE durable_timers SET fired_at = now()
         WHERE workflow_id = :id AND seq = 0 AND purpose = 'start' AND fired_at IS NULL
           AND EXISTS (SELECT 1 FROM durable_workflows d
                        WHERE d.id = :id AND d.name = :name AND d.status = 'running'
                          AND d.start_at IS NOT NULL)
        RETURNING purpose
    ), w AS (
        UPDATE durable_workflows wf
           SET args = CAST(:args AS jsonb), kwargs = CAST(:kwargs AS jsonb), updated_at = now(),
               attributes = coalesce(CAST(:attributes AS jsonb), wf.attributes),
               start_at = """
    + _START_AT.format(created="wf.created_at")
    + """,
               deadline_at = """
    + _START_AT.format(created="wf.created_at")
    + """ + make_interval(secs => CAST(:timeout AS float8))
         WHERE wf.id = :id AND wf.status = 'running' AND wf.start_at IS NOT NULL
           AND EXISTS (SELECT 1 FROM old WHERE purpose = 'start')
        RETURNING wf.id, wf.start_at, wf.deadline_at
    ), old_deadline AS (
        -- Only once the start timer is taken and the run moved: a firing that won keeps it.
        UPDATE durable_timers SET fired_at = now()
         WHERE workflow_id = (SELECT id FROM w) AND seq = 0 AND purpose = 'deadline'
           AND fired_at IS NULL
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT id, NULL, 'start debounced', jsonb_build_object('start_at', start_at) FROM w
    ), """
    + _TIMERS
    + """
    SELECT (SELECT count(*) FROM w) AS moved, """
    + _TIMERS_JSON
)


@dataclass(frozen=True)
class Delayed:
    """The outcome of :func:`insert_delayed_run` or :func:`debounce_run`."""

    written: bool
    """The run was created (insert) or moved (debounce)."""
    timers: list[tuple[int, float]]
    """Its new timers (id, fire time as epoch), to index."""


def _params(
    workflow_id: str,
    name: str,
    args: str,
    kwargs: str,
    timeout: float | None,
    when: tuple[object | None, float | None, float | None],
    attributes: str | None,
) -> dict[str, object]:
    start_at, delay, cap = when
    return {
        "attributes": attributes,
        "id": workflow_id,
        "name": name,
        "args": args,
        "kwargs": kwargs,
        "timeout": timeout,
        "start_at": start_at,
        "delay": delay,
        "cap": cap,
    }


def insert_delayed_run(
    conn: Connection,
    workflow_id: str,
    name: str,
    args: str,
    kwargs: str,
    timeout: float | None,
    when: tuple[object | None, float | None, float | None],
    attributes: str | None = None,
    trace: str | None = None,
) -> Delayed:
    """Create a run that waits for its start; ``written`` is False when the id exists.

    ``when`` is (``start_at``: an aware datetime, or None; ``delay``: seconds from now, used
    when ``start_at`` is None; ``cap``: seconds after creation it may start at the latest,
    or None). ``trace``: the trace context its spans continue (JSON text), kept by a
    debounce.
    """
    run = (
        f'{{"id": {json.dumps(workflow_id)}, "args": {args}, "kwargs": {kwargs}, '
        f'"attributes": {attributes or "null"}}}'
    )
    created, timers = insert_delayed_runs(conn, name, f"[{run}]", timeout, when, trace)
    return Delayed(workflow_id in created, timers)


def insert_delayed_runs(
    conn: Connection,
    name: str,
    runs: str,
    timeout: float | None,
    when: tuple[object | None, float | None, float | None],
    trace: str | None = None,
) -> tuple[set[str], list[tuple[int, float]]]:
    """Create runs of ``name`` waiting for one start time, in one statement.

    ``runs`` is a JSON array of ``{id, args, kwargs, attributes}``. Returns the ids created
    (an id that exists is left alone) and their timers (id, fire time as epoch), to index.
    ``trace``: the trace context of them all.
    """
    start_at, delay, cap = when
    params = {
        "trace": trace,
        "runs": runs,
        "name": name,
        "timeout": timeout,
        "start_at": start_at,
        "delay": delay,
        "cap": cap,
    }
    row = conn.execute(_INSERT_MANY, params).one()
    return set(row.created), [(int(i), float(at)) for i, at in row.timers]


def debounce_run(
    conn: Connection,
    workflow_id: str,
    name: str,
    args: str,
    kwargs: str,
    timeout: float | None,
    when: tuple[object | None, float | None, float | None],
    attributes: str | None = None,
) -> Delayed:
    """Give a run still waiting for its start new arguments, attributes and start time.

    ``attributes`` None keeps the run's own.

    ``written`` is False when the run does not wait for its start (it has started, ended,
    belongs to another workflow, or does not exist), or when a concurrent debounce or the
    start timer's firing took its timer first: read the run to tell which.
    """
    params = _params(workflow_id, name, args, kwargs, timeout, when, attributes)
    row = conn.execute(_DEBOUNCE, params).one()
    return Delayed(bool(row.moved), [(int(i), float(at)) for i, at in row.timers])


# Cancel a run that has not started: it ends 'cancelled' at once, since no code of it ran and
# none will. Its timers are taken first, as the firing and a debounce take them.
_CANCEL_PENDING = statement(
    """
    WITH old AS (
        UPDATE durable_timers SET fired_at = now()
         WHERE workflow_id = :id AND seq = 0 AND purpose = 'start' AND fired_at IS NULL
           AND EXISTS (SELECT 1 FROM durable_workflows d
                        WHERE d.id = :id AND d.status = 'running' AND d.start_at IS NOT NULL)
        RETURNING purpose
    ), w AS (
        UPDATE durable_workflows
           SET status = 'cancelled', error = 'cancelled', cancel_requested = true,
               start_at = NULL, finished_at = now(), updated_at = now(), run_seq = wake_seq
         WHERE id = :id AND status = 'running' AND start_at IS NOT NULL
           AND EXISTS (SELECT 1 FROM old)
        RETURNING id
    ), rest AS (
        -- Its other timers (the execution timeout's), only once it is cancelled here.
        UPDATE durable_timers SET fired_at = now()
         WHERE workflow_id = (SELECT id FROM w) AND fired_at IS NULL
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT id, NULL, e.event, e.detail FROM w,
               (VALUES ('cancel requested', '{}'::jsonb),
                       ('cancelled', '{"error": "cancelled"}'::jsonb)) AS e(event, detail)
    ), nt AS (SELECT """
    + notify_sql(ENDED, "id")
    + """ FROM w)
    SELECT (SELECT count(*) FROM w) AS cancelled, (SELECT count(*) FROM nt) AS notified
    """
)


def cancel_pending(conn: Connection, workflow_id: str) -> bool:
    """End a run that waits for its start as ``cancelled``; False if it does not wait."""
    return bool(conn.execute(_CANCEL_PENDING, {"id": workflow_id}).one().cancelled)
