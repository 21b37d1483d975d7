"""Queries on steps: schedule, claim, complete, fail, retry, local results and sleeps.

Each function is one statement (data-modifying CTEs write the history row in the same
statement), so on an autocommit connection every state change costs one round trip.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import Connection, Row, TextClause, select

from durable.store.models import steps
from durable.store.notices import ENDED, notify_sql
from durable.store.runs import (
    HISTORY_JSON,
    RUN_COLUMNS,
    RUN_END,
    SNAPSHOT_WAKE,
    Activation,
    activation_from_row,
    history_json,
    run_columns,
)
from durable.store.statement import first_row, insert_new_steps, statement

# New remote steps (one, or a parallel batch) are written in the statement that releases the
# run's lease; the rows arrive as one JSON array of {seq, name, args, kwargs, options}. Their
# 'step scheduled' events are their rows (``durable.store.history``).
# With :release the steps are written only under the caller's lease: an activation that
# stalled and whose run another one took over writes nothing.
_SCHEDULE = statement(
    """
    WITH s AS ("""
    + insert_new_steps(
        ":wid",
        tail="""WHERE NOT :release
              OR EXISTS (SELECT 1 FROM durable_workflows WHERE id = :wid AND lease_owner = :owner)
        ON CONFLICT (workflow_id, seq) DO NOTHING""",
    )
    + """), r AS (
        UPDATE durable_workflows
           SET lease_owner = NULL, lease_expires_at = NULL, run_seq = wake_seq,
               updated_at = now()
         WHERE id = :wid AND :release AND lease_owner = :owner
           AND wake_seq + advances = :wake_seq
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM s) AS scheduled, (SELECT count(*) FROM r) AS released
    """
)


@dataclass(frozen=True)
class NewStep:
    """A remote step to schedule; arguments and options already encoded as JSON text."""

    seq: int
    name: str
    args: str
    kwargs: str
    options: str

    def as_json(self) -> str:
        """The step as one JSON object, embedding the encoded parts as they are."""
        return (
            f'{{"seq":{self.seq},"name":{json.dumps(self.name)},"args":{self.args},'
            f'"kwargs":{self.kwargs},"options":{self.options}}}'
        )


def schedule_steps(
    conn: Connection,
    wid: str,
    new: list[NewStep],
    *,
    release_owner: str | None = None,
    wake_seq: int = 0,
) -> tuple[int, bool]:
    """Record remote steps as scheduled.

    With ``release_owner`` the same statement releases the run's lease as
    :func:`durable.store.runs.release` does. Returns (how many were new, released): released
    is False if the run was woken meanwhile (replay again).
    """
    params = {
        "wid": wid,
        "rows": "[" + ",".join(step.as_json() for step in new) + "]",
        "release": release_owner is not None,
        "owner": release_owner or "",
        "wake_seq": wake_seq,
    }
    row = conn.execute(_SCHEDULE, params).one()
    return int(row.scheduled), bool(row.released)


@dataclass(frozen=True)
class ClaimedStep:
    """A step this process now owns and must run."""

    workflow_id: str
    seq: int
    name: str
    args: Any
    """As stored: a JSON list, or a codec's envelope (see ``Core.decode``)."""
    kwargs: Any
    """As stored: a JSON object, or a codec's envelope."""
    options: dict[str, Any]
    attempt: int
    rest_wake: int | None = None
    """With ``with_history``: the run's wake counter if the claim found it at rest (no
    activation owed or under way), the one ``settle_step``'s ``expect_wake`` compares with."""
    rest_created_at: datetime | None = None
    """The run's creation time with ``rest_wake``: which run of this id it is (a run purged
    and started again under the same id counts its wake-ups from the start again)."""
    run: Activation | None = None
    """The run and its history as the claim read them (at rest, and not already held by
    the caller at ``rest_wake``)."""
    workflow_name: str | None = None
    """The run's workflow name."""
    trace_context: dict[str, str] | None = None
    """The trace context the run's spans continue (:mod:`durable.tracing`), or None."""


# With :with_history the claim also reads the run if it is at rest (run_seq = wake_seq, lease
# free), and its whole history unless the caller already holds it at that wake counter
# (:cached_wake): what the worker needs to work out the run's next move in memory once the
# step is done (see ``settle_step``'s ``expect_wake``). The run is read through a plain
# subquery, like the history, so both come from the statement's one snapshot.
#
# The step row records the attempt's start (started_at, attempts, worker): its 'step started'
# event is derived from it (``durable.store.history``). Only when this claim starts a later
# attempt is the previous attempt's start, which the row is about to forget, written out (p:
# the row as the statement's snapshot saw it, the attempt before the one s took).
#
# A step of a paused run is not claimed (its message is acknowledged and dropped; unpause
# sends it again), unless :running: the claim deferred for a body already running unclaimed
# when the pause came, whose outcome is kept as any running step's is.
_CLAIM = statement(
    """
    WITH p AS (
        SELECT attempts, started_at, worker, unclaimed FROM durable_steps
         WHERE workflow_id = :wid AND seq = :seq AND attempts > 0 AND worker IS NOT NULL
    ), s AS (
        UPDATE durable_steps st
           SET status = 'started', attempts = st.attempts + 1, started_at = now(),
               lease_owner = :owner, lease_expires_at = now() + make_interval(secs => :ttl),
               deadline_at = now() + make_interval(
                   secs => CAST(st.options ->> 'timeout' AS float8)),
               worker = :owner, unclaimed = false
          FROM durable_workflows w
         WHERE st.workflow_id = :wid AND st.seq = :seq AND st.status = 'scheduled'
           AND w.id = st.workflow_id AND (w.status = 'running') IS TRUE
           AND (:running OR NOT w.paused)
        RETURNING st.workflow_id, st.seq, st.name, st.args, st.kwargs, st.options, st.attempts,
                  w.name AS workflow_name, w.trace_context AS run_trace
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail, at)
        SELECT s.workflow_id, s.seq, 'step started',
               jsonb_build_object('attempt', p.attempts, 'worker', p.worker)
               || CASE WHEN p.unclaimed THEN '{"unclaimed": true}'::jsonb ELSE '{}'::jsonb END,
               p.started_at
          FROM s, p WHERE p.attempts = s.attempts - 1
    ), w AS (
        SELECT """
    + RUN_COLUMNS
    + """
          FROM durable_workflows
         WHERE :with_history AND id = :wid AND (status = 'running') IS TRUE
           AND run_seq = wake_seq
           AND (lease_owner IS NULL OR lease_expires_at < now())
    )
    SELECT s.*, w.id, w.name AS run_name, w.args AS run_args, w.kwargs AS run_kwargs,
           w.wake_seq + w.advances AS snapshot_wake_seq, w.created_at, w.cancel_requested,
           w.cancelled_at_seq, w.patches,
           CASE WHEN w.wake_seq + w.advances IS DISTINCT FROM CAST(:cached_wake AS bigint) THEN """
    + HISTORY_JSON
    + """ END AS steps
      FROM s LEFT JOIN w ON true
    """
)


def claim_step(
    conn: Connection,
    wid: str,
    seq: int,
    owner: str,
    ttl: float,
    with_history: bool = False,
    cached_wake: int | None = None,
    running: bool = False,
) -> ClaimedStep | None:
    """Take a scheduled step for ``owner``; None when it is not (or no longer) scheduled.

    A step of a paused run is not taken, unless ``running``: its body already runs (a first
    delivery that ran unclaimed), and its outcome must be recorded.

    With ``with_history`` the claimed step also carries its run's wake counter if the run is
    at rest, and the run with its history (``ClaimedStep.run``) unless the counter is
    ``cached_wake``, read in the same statement.
    """
    params = {
        "wid": wid,
        "seq": seq,
        "owner": owner,
        "ttl": ttl,
        "with_history": with_history,
        "cached_wake": cached_wake,
        "running": running,
    }
    row = first_row(conn, _CLAIM, params)
    if row is None:
        return None
    return _step_from_row(row, row.attempts, row.workflow_name)


def _step_from_row(
    row: Any, attempt: int, workflow_name: str | None, woken: int | None = None
) -> ClaimedStep:
    """The step a claim or a read returned, with its run when the row carries the history."""
    run = None
    if row.id is not None and row.steps is not None:
        run = activation_from_row(
            SimpleNamespace(
                id=row.id,
                name=row.run_name,
                args=row.run_args,
                kwargs=row.run_kwargs,
                snapshot_wake_seq=row.snapshot_wake_seq,
                created_at=row.created_at,
                steps=row.steps,
                cancel_requested=row.cancel_requested,
                cancelled_at_seq=row.cancelled_at_seq,
                patches=row.patches,
                trace_context=row.run_trace,
            )
        )
        run = replace(run, woken=woken)
    return ClaimedStep(
        workflow_id=row.workflow_id,
        seq=row.seq,
        name=row.name,
        args=row.args if row.args is not None else [],
        kwargs=row.kwargs if row.kwargs is not None else {},
        options=dict(row.options or {}),
        attempt=attempt,
        rest_wake=row.snapshot_wake_seq,
        rest_created_at=row.created_at,
        run=run,
        workflow_name=workflow_name,
        trace_context=row.run_trace or None,
    )


@dataclass(frozen=True)
class Held:
    """What the caller holds of a run's history, so that a read returns only what changed."""

    wake: int
    """The version it holds (``wake_seq + advances``)."""
    woken: int | None
    """The run's ``wake_seq`` alone at that version, if known."""
    created_at: datetime
    """Which run of that id it is."""
    since: int
    """The first position an advance can have changed since: the lowest one still open."""


@dataclass(frozen=True)
class FirstStep:
    """A step's first dispatch as :func:`read_first_step` found it, fit to run unclaimed."""

    step: ClaimedStep
    """The step as written (``attempt`` 1), its run at rest (``run``, or only ``rest_wake``
    when the caller holds that history), as a claim with ``with_history`` returns it."""
    age: float
    """Seconds since its dispatch, by PostgreSQL's clock (the one the sweep measures by)."""
    since: int | None = None
    """Set when ``step.run`` holds only the positions from ``since`` on: the caller's held
    history is the run's below it (only advances happened since, see :class:`Held`)."""


# A first delivery that did not reach the process that scheduled its step reads the step
# instead of claiming it: a read writes nothing (no row, no WAL, no lease). It finds the step
# only if it may run unclaimed (``durable.runner``): never claimed, sent once (so the message
# is the only copy) and within the window, its run at rest, not paused or being cancelled,
# and the step plain (no timeout, whose deadline the claim sets; no limit, whose slot it
# holds). The history is read as the claim reads it, in the statement's one snapshot: none
# if the caller holds the run at its version; only the positions from :since on if the run
# was not woken since the caller's version (``wake_seq`` unchanged, so every change since
# was an advance: a settle of a position open then, and new positions after it); else all.
_READ_FIRST = statement(
    """
    SELECT st.workflow_id, st.seq, st.name, st.args, st.kwargs, st.options,
           CAST(extract(epoch FROM now() - st.dispatched_at) AS float8) AS age,
           w.id, w.name AS run_name, w.args AS run_args, w.kwargs AS run_kwargs,
           w.wake_seq + w.advances AS snapshot_wake_seq, w.created_at, w.cancel_requested,
           w.cancelled_at_seq, w.patches, w.trace_context AS run_trace,
           w.wake_seq AS woken,
           w.wake_seq = CAST(:held_woken AS bigint)
               AND w.created_at = CAST(:held_created AS timestamptz) AS since_held,
           CASE WHEN w.wake_seq + w.advances = CAST(:held_wake AS bigint) THEN NULL
                WHEN w.wake_seq = CAST(:held_woken AS bigint)
                 AND w.created_at = CAST(:held_created AS timestamptz) THEN """
    + history_json("s.seq >= :since")
    + """ ELSE """
    + HISTORY_JSON
    + """ END AS steps
      FROM durable_steps st JOIN durable_workflows w ON w.id = st.workflow_id
     WHERE st.workflow_id = :wid AND st.seq = :seq AND st.status = 'scheduled'
       AND st.attempts = 0 AND st.dispatch_count = 1 AND st.kind = 'task'
       AND st.dispatched_at > now() - make_interval(secs => :window)
       AND NOT (st.options ? 'timeout' OR st.options ? 'limit')
       AND (w.status = 'running') IS TRUE AND NOT w.paused AND NOT w.cancel_requested
       AND w.run_seq = w.wake_seq AND (w.lease_owner IS NULL OR w.lease_expires_at < now())
    """
)


def read_first_step(
    conn: Connection, wid: str, seq: int, window: float, held: Held | None = None
) -> FirstStep | None:
    """Step ``seq`` of ``wid`` and its run at rest, if its first dispatch may run unclaimed.

    None when it may not (claimed, sent again or ``window`` seconds ago or more, its run
    woken, leased, paused or being cancelled, or the step carries a timeout or a limit): the
    caller claims it as any other delivery. With ``held``, the history is left out (``run``
    None) when the run is at the held version, and only the positions from ``held.since``
    on are read (``FirstStep.since``) when the run was not woken since it.
    """
    params = {
        "wid": wid,
        "seq": seq,
        "window": window,
        "held_wake": None if held is None else held.wake,
        "held_woken": None if held is None else held.woken,
        "held_created": None if held is None else held.created_at,
        "since": 0 if held is None else held.since,
    }
    row = first_row(conn, _READ_FIRST, params)
    if row is None:
        return None
    step = _step_from_row(row, 1, row.run_name, woken=row.woken)
    since = None
    if held is not None and step.run is not None and row.since_held:
        since = held.since  # the run holds only the positions from there on
    return FirstStep(step, float(row.age), since)


# A paused run neither advances nor is taken: the settle records the step's outcome and the
# wake-up, which the activation that ``durable unpause`` sends replays.
_ADVANCE = """(wake_seq + advances = :expect_wake AND run_seq = wake_seq AND NOT paused
               AND (lease_owner IS NULL OR lease_expires_at < now()))"""
_TAKE = """(:acquire AND NOT paused AND (lease_owner IS NULL OR lease_expires_at < now()))"""


def _settle_statement(ending: bool) -> TextClause:
    """The settling statement; ``ending``: the variant whose advance ends the run.

    Two statements rather than one with a flag: the run-end CTEs are needed once per run,
    and without them the statement every step sends stays under the size psycopg caches the
    conversion of (4 kB), and PostgreSQL plans less.
    """
    end_columns = ""
    end_values = ""
    end_history = ""
    end_ctes = ""
    woken_parent = "NULL AS woken_parent_id, NULL AS woken_parent_name"
    if ending:
        end_columns = ", status, result, finished_at"
        end_values = """,
                  CASE WHEN f.a THEN 'completed' ELSE status END,
                  CASE WHEN f.a THEN CAST(:end_result AS jsonb) ELSE result END,
                  CASE WHEN f.a THEN now() ELSE finished_at END"""
        end_history = """, h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT id, NULL, 'completed', jsonb_build_object('error', NULL) FROM w WHERE w.ended
    )"""
        end_ctes = (
            ", ended AS (SELECT id, parent_id, parent_seq FROM w WHERE w.ended), "
            + RUN_END.format(ended="ended")
            + f", nt AS (SELECT {notify_sql(ENDED, 'id')} FROM ended)"
        )
        woken_parent = (
            "(SELECT id FROM pw) AS woken_parent_id, (SELECT name FROM pw) AS woken_parent_name,"
            " (SELECT count(*) FROM nt) AS notified"
        )
    return statement(
        """
    WITH s AS (
        UPDATE durable_steps
           SET status = :status, result = CAST(:result AS jsonb), error = :error,
               completed_at = now(), lease_owner = NULL, lease_expires_at = NULL,
               deadline_at = NULL,
               attempts = CASE WHEN :unclaimed THEN 1 ELSE attempts END,
               started_at = CASE WHEN :unclaimed
                                 THEN least(CAST(:started_at AS timestamptz), now())
                            ELSE started_at END,
               worker = CASE WHEN :unclaimed THEN :owner ELSE coalesce(worker, :owner) END,
               unclaimed = CASE WHEN :unclaimed THEN true ELSE unclaimed END
         WHERE workflow_id = :wid AND seq = :seq
           AND CASE WHEN :unclaimed THEN status IN ('scheduled', 'cancelled') AND attempts = 0
                         AND EXISTS (SELECT 1 FROM durable_workflows r WHERE r.id = :wid
                                        AND r.created_at = CAST(:run_created AS timestamptz))
                    ELSE status = 'started'
                         AND (CAST(:attempt AS int) IS NULL OR attempts = :attempt) END
        RETURNING workflow_id, seq, attempts, completed_at
    ), w AS (
        -- f.a: the run advances (see _ADVANCE); f.t: otherwise its lease is taken. Written
        -- once, in a sub-select of the row being updated (its newest version, as the
        -- CASEs it replaces read it), not once per column.
        UPDATE durable_workflows
           SET (wake_seq, woken_at, advances, updated_at, lease_owner, lease_expires_at"""
        + end_columns
        + """) = (
               SELECT CASE WHEN f.a THEN wake_seq ELSE wake_seq + 1 END,
                      CASE WHEN f.a THEN woken_at ELSE now() END,
                      CASE WHEN f.a THEN advances + 1 ELSE advances END,
                      CASE WHEN f.a THEN now() ELSE updated_at END,
                      CASE WHEN f.a THEN NULL WHEN f.t THEN :owner ELSE lease_owner END,
                      CASE WHEN f.a THEN NULL
                           WHEN f.t THEN now() + make_interval(secs => :ttl)
                           ELSE lease_expires_at END"""
        + end_values
        + """
                 FROM (SELECT """
        + _ADVANCE
        + " AS a, "
        + _TAKE
        + """ AS t) AS f)
         WHERE id = :wid AND (status = 'running') IS TRUE AND EXISTS (SELECT 1 FROM s)
        RETURNING lease_owner, run_seq = wake_seq AS advanced, status = 'completed' AS ended,
                  parent_id, parent_seq, """
        + run_columns("run_seq <> wake_seq")
        + """
    ), n AS ("""
        + insert_new_steps(
            ":wid",
            tail="""WHERE EXISTS (SELECT 1 FROM w WHERE w.advanced)
                    ON CONFLICT (workflow_id, seq) DO NOTHING""",
        )
        + ")"
        + end_history
        + end_ctes
        + """
    SELECT s.attempts AS settled_attempts, s.completed_at AS settled_at,
           (SELECT count(*) FROM n) AS inserted, w.*, """
        + woken_parent
        + ", "
        + SNAPSHOT_WAKE
        + """ AS snapshot_wake_seq,
           CASE WHEN NOT w.advanced AND w.lease_owner = :owner THEN """
        + HISTORY_JSON
        + """ END AS steps
      FROM s LEFT JOIN w ON true
    """
    )


# A step's end, the workflow's wake-up and (when asked) taking the workflow's lease and
# reading its history are one statement: nothing can commit a result without also recording
# that the workflow has something new to replay, and the worker that finished the step can
# continue the workflow without another round trip. The history read sees the statement's
# snapshot, where the settled step is still 'started'; ``settle_step`` patches it in.
#
# With :expect_wake the worker has already replayed the run in memory, on the history its
# claim read (run at rest at version wake_seq + advances = :expect_wake) plus this outcome,
# and found that the run only waits for steps, the new ones in :rows. If the run is still at
# rest at that version (nothing moved it since: no step settled or advanced, no signal, timer
# or cancel, no activation under way) that replay is exactly what an activation would do now,
# so the statement "advances" the run: it schedules the new steps and counts the advance
# (advances + 1) without ever holding the lease, under the run's row lock. The wake-up this
# settle stands for is handled at once, so wake_seq, run_seq and woken_at stay as they were:
# the run stays at rest and its row's update names no indexed column, which lets PostgreSQL
# make it HOT (no index entry written). Otherwise it falls back to the plain settle above,
# which bumps wake_seq (and, with :acquire, takes the lease).
#
# _SETTLE_END is the same statement for an in-memory replay that found the workflow returned:
# advancing then ends the run, completed with :end_result, as ``runs.finish`` would under the
# lease (its parent's position settled and the parent woken, whatever it left unstarted
# cancelled, its timers retired).
_SETTLE = _settle_statement(ending=False)
_SETTLE_END = _settle_statement(ending=True)


@dataclass(frozen=True)
class Settled:
    """The outcome of :func:`settle_step`."""

    settled: bool
    """False when the step was not ``started`` (already settled by another run of it)."""
    activation: Activation | None
    """The workflow, leased to the caller, when ``acquire`` was asked and the lease was free."""
    advanced: bool = False
    """True when ``expect_wake`` held: the new steps are scheduled and the wake-up handled."""
    settled_at: datetime | None = None
    """The step's commit time, when the run advanced."""
    ended: bool = False
    """True when ``finish`` was asked and the run advanced: it is now completed."""
    parent: tuple[str, str] | None = None
    """The parent (id, workflow name) the run's end woke: send it an activation."""
    inserted: int = 0
    """How many of the new steps were written by this statement (not there already)."""


def settle_step(
    conn: Connection,
    wid: str,
    seq: int,
    *,
    result: str | None = None,
    error: str | None = None,
    owner: str = "",
    ttl: float = 0.0,
    acquire: bool = False,
    attempt: int | None = None,
    expect_wake: int | None = None,
    new: Sequence[NewStep] = (),
    finish: str | None = None,
    unclaimed: bool = False,
    started_at: datetime | None = None,
    run_created: datetime | None = None,
) -> Settled:
    """Commit a step's result (JSON text) or its final ``error``, and wake its workflow.

    With ``acquire`` the workflow's lease is also taken for ``owner`` if it is free, and its
    history returned, so the caller can replay at once. With ``attempt`` only that attempt
    may settle the step: a late outcome of an earlier, timed-out attempt is dropped. With
    ``expect_wake`` (the wake counter of a run at rest, as the claim read it) and ``new``
    (the steps an in-memory replay scheduled), the run advances in the same statement if it
    is still at rest there (``Settled.advanced``); if not, this is a plain settle. With
    ``finish`` (the workflow's result as JSON text) instead of new steps, advancing ends the
    run, completed (``Settled.ended``).

    With ``unclaimed`` the step was run without a claim (its first delivery, see
    ``durable.runner``): it settles only if it was never claimed, in the run created at
    ``run_created``, as attempt 1 started at ``started_at`` by ``owner`` (the row's
    ``worker`` and ``unclaimed``, from which its ``step started`` event is read). A step
    cancellation marked ``cancelled`` meanwhile (it had not been claimed) is settled all the
    same: its body did run, and its outcome is kept, as that of any step that was running
    when the cancellation came.
    """
    status = "completed" if error is None else "failed"
    params = {
        "wid": wid,
        "seq": seq,
        "status": status,
        "result": result,
        "error": error,
        "owner": owner,
        "ttl": ttl,
        "acquire": acquire,
        "attempt": attempt,
        "expect_wake": expect_wake,
        "rows": "[" + ",".join(step.as_json() for step in new) + "]",
        "unclaimed": unclaimed,
        "started_at": started_at,
        "run_created": run_created,
    }
    if finish is not None:
        params.update(end_status="completed", end_result=finish, end_error=None)
    row = first_row(conn, _SETTLE if finish is None else _SETTLE_END, params)
    if row is None:
        return Settled(False, None)
    if row.advanced:
        parent = None
        if row.woken_parent_id is not None:
            parent = (row.woken_parent_id, row.woken_parent_name)
        ended = bool(row.ended)
        return Settled(True, None, True, row.settled_at, ended, parent, int(row.inserted))
    if row.steps is None:
        return Settled(True, None)
    activation = activation_from_row(row, own_wakes=1)
    for index, record in enumerate(activation.steps):
        if record.seq == seq:
            activation.steps[index] = replace(
                record,
                status=status,
                result=None if result is None else json.loads(result),
                error=error,
                attempts=row.settled_attempts,
                completed_at=row.settled_at,
            )
    return Settled(True, activation)


_RETRY = statement(
    """
    WITH s AS (
        UPDATE durable_steps
           SET status = 'waiting', error = :error, lease_owner = NULL, lease_expires_at = NULL,
               deadline_at = NULL
         WHERE workflow_id = :wid AND seq = :seq AND status = :from_status
        RETURNING workflow_id, seq, attempts
    ), t AS (
        INSERT INTO durable_timers (workflow_id, seq, purpose, fire_at)
        SELECT workflow_id, seq, 'retry', now() + make_interval(secs => :delay) FROM s
        RETURNING id, fire_at
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT s.workflow_id, s.seq, 'retry scheduled',
               jsonb_build_object('attempt', s.attempts, 'error', CAST(:error AS text),
                                  'delay', CAST(:delay AS float8), 'timer', t.id)
          FROM s, t
    ), p AS (
        UPDATE durable_workflows
           SET paused = true, wake_seq = wake_seq + 1, woken_at = now(), updated_at = now()
         WHERE id = :wid AND :pause AND (status = 'running') IS TRUE AND NOT paused
           AND EXISTS (SELECT 1 FROM t)
        RETURNING id
    ), ph AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT id, :seq, 'paused',
               jsonb_build_object('by', 'on_exhausted', 'error', CAST(:error AS text))
          FROM p
    )
    SELECT id, fire_at FROM t
    """
)


def schedule_retry(
    conn: Connection,
    wid: str,
    seq: int,
    error: str,
    delay: float,
    from_status: str = "started",
    pause: bool = False,
) -> tuple[int, float] | None:
    """Park a failed step behind a retry timer; returns (timer id, fire time as epoch).

    With ``pause`` (its retries are exhausted and its policy says ``on_exhausted="pause"``)
    the same statement pauses the run: the timer, due after ``delay``, fires only once the
    run is unpaused, and the step is then tried again.
    """
    params = {
        "wid": wid,
        "seq": seq,
        "error": error,
        "delay": delay,
        "from_status": from_status,
        "pause": pause,
    }
    row = conn.execute(_RETRY, params).first()
    return (int(row.id), row.fire_at.timestamp()) if row else None


def list_steps(conn: Connection, wid: str) -> list[Row[Any]]:
    """Every step of a run, in order."""
    return list(conn.execute(select(steps).where(steps.c.workflow_id == wid).order_by(steps.c.seq)))
