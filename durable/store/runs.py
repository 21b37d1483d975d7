"""Queries on workflow runs: start, activation (lease and history in one statement), finish."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, select

from durable.store.models import workflows
from durable.store.notices import ENDED, notify_sql
from durable.store.records import StepRecord, records_from_json
from durable.store.statement import (
    NEW_STEP_COLUMNS,
    first_row,
    insert_new_steps,
    new_step_values,
    one_row,
    row_count,
    statement,
)

TERMINAL = ("completed", "failed", "cancelled")

# With an execution timeout the run gets a 'deadline' timer (position 0) in the same statement.
# With :rows (an eager start: the caller replayed the workflow in memory up to its first
# remote steps) the steps are scheduled in it too and the run starts at rest (run_seq =
# wake_seq): no activation is owed, the step messages are what the caller sends.
_INSERT = statement(
    """
    WITH w AS (
        INSERT INTO durable_workflows (id, name, status, args, kwargs, deadline_at, run_seq,
                                       wake_seq, attributes, trace_context, limit_name,
                                       limit_key, priority, queued)
        VALUES (:id, :name, 'running', CAST(:args AS jsonb), CAST(:kwargs AS jsonb),
                now() + make_interval(secs => CAST(:timeout AS float8)),
                CASE WHEN :eager THEN 1 ELSE 0 END,
                CASE WHEN CAST(:limit_name AS text) IS NULL THEN 1 ELSE 0 END,
                CAST(:attributes AS jsonb), CAST(:trace AS jsonb), :limit_name, :limit_key,
                :priority, CAST(:limit_name AS text) IS NOT NULL)
        ON CONFLICT (id) DO NOTHING
        RETURNING id, deadline_at, queued
    ), n AS ("""
    + insert_new_steps("w.id", source="w, ")
    + """), h AS (
        -- The steps' 'step scheduled' events are their rows (durable.store.history). A
        -- limited run is 'queued' first; its admission writes 'started'.
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT id, NULL, CASE WHEN queued THEN 'queued' ELSE 'started' END,
               jsonb_build_object('name', CAST(:name AS text))
               || CASE WHEN queued THEN jsonb_build_object(
                      'limit', CAST(:limit_name AS text), 'key', CAST(:limit_key AS text),
                      'priority', CAST(:priority AS int)) ELSE '{}' END
          FROM w
    ), t AS (
        INSERT INTO durable_timers (workflow_id, seq, purpose, fire_at)
        SELECT id, 0, 'deadline', deadline_at FROM w WHERE deadline_at IS NOT NULL
        RETURNING id, fire_at
    ), stale AS (
        -- History left by a run deleted under this id (its table has no foreign key); the
        -- statement's own rows above are not in the snapshot this DELETE reads.
        DELETE FROM durable_history WHERE workflow_id IN (SELECT id FROM w)
    )
    SELECT (SELECT count(*) FROM w) AS created, (SELECT id FROM t) AS timer_id,
           (SELECT fire_at FROM t) AS fire_at
    """
)


@dataclass(frozen=True)
class Inserted:
    """The outcome of :func:`insert_run`."""

    created: bool
    timer: tuple[int, float] | None
    """The execution-timeout timer (id, fire time as epoch), to index."""


def insert_run(
    conn: Connection,
    workflow_id: str,
    name: str,
    args: str,
    kwargs: str,
    timeout: float | None = None,
    steps: str | None = None,
    attributes: str = "{}",
    trace: str | None = None,
    limit: tuple[str, str, int] | None = None,
) -> Inserted:
    """Create a run (arguments as JSON text); ``created`` is False when the id exists.

    ``steps`` (a JSON array of ``{seq, name, args, kwargs, options}``) schedules the run's
    first steps in the same statement and starts the run at rest (an eager start).
    ``attributes`` is the run's searchable attributes as a JSON object (checked by
    :func:`durable.attributes.check`). ``trace`` is the trace context its spans continue, a
    JSON object (:mod:`durable.tracing`). ``limit`` (limit name, key, priority; never with
    ``steps``) writes the run queued for a slot of its key (:mod:`durable.store.run_limits`).
    """
    params = {
        "limit_name": None if limit is None else limit[0],
        "limit_key": None if limit is None else limit[1],
        "priority": 0 if limit is None else limit[2],
        "trace": trace,
        "id": workflow_id,
        "name": name,
        "args": args,
        "kwargs": kwargs,
        "timeout": timeout,
        "eager": steps is not None,
        "rows": steps or "[]",
        "attributes": attributes,
    }
    # On the driver's cursor (``first_row``): a start's one statement, as hot as a step's.
    row = one_row(conn, _INSERT, params)
    timer = (int(row.timer_id), row.fire_at.timestamp()) if row.timer_id else None
    return Inserted(bool(row.created), timer)


# Many runs of one workflow in one statement (``durable.start_many``), each as ``_INSERT``
# writes one; the runs arrive as one JSON array of {id, args, kwargs, steps, attributes},
# ``steps`` being an eager start's first remote steps (as ``insert_new_steps`` takes them)
# or null.
_INSERT_MANY = statement(
    """
    WITH r AS (
        SELECT * FROM jsonb_to_recordset(CAST(:runs AS jsonb))
               AS r(id text, args jsonb, kwargs jsonb, steps jsonb, attributes jsonb)
    ), w AS (
        INSERT INTO durable_workflows (id, name, status, args, kwargs, deadline_at, run_seq,
                                       attributes, trace_context)
        SELECT id, :name, 'running', args, kwargs,
               now() + make_interval(secs => CAST(:timeout AS float8)),
               CASE WHEN steps IS NULL THEN 0 ELSE 1 END, attributes, CAST(:trace AS jsonb)
          FROM r
        ON CONFLICT (id) DO NOTHING
        RETURNING id, deadline_at
    ), n AS (
        INSERT INTO durable_steps (workflow_id, seq, kind, name, """
    + NEW_STEP_COLUMNS
    + """)
        SELECT w.id, s.seq, 'task', s.name, """
    + new_step_values("s")
    + """
          FROM w JOIN r ON r.id = w.id,
               jsonb_to_recordset(r.steps)
               AS s(seq int, name text, args jsonb, kwargs jsonb, options jsonb)
         WHERE r.steps IS NOT NULL
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT id, NULL, 'started', jsonb_build_object('name', CAST(:name AS text)) FROM w
    ), t AS (
        INSERT INTO durable_timers (workflow_id, seq, purpose, fire_at)
        SELECT id, 0, 'deadline', deadline_at FROM w WHERE deadline_at IS NOT NULL
        RETURNING id, fire_at
    ), stale AS (
        DELETE FROM durable_history WHERE workflow_id IN (SELECT id FROM w)
    )
    SELECT (SELECT coalesce(jsonb_agg(id), '[]') FROM w) AS created,
           (SELECT coalesce(jsonb_agg(jsonb_build_array(id, extract(epoch FROM fire_at))), '[]')
              FROM t) AS timers
    """
)


@dataclass(frozen=True)
class NewRun:
    """A run to create: its id, arguments as JSON text, and an eager start's first steps."""

    workflow_id: str
    args: str
    kwargs: str
    steps: str | None = None
    """A JSON array of ``{seq, name, args, kwargs, options}``, or None (an activation)."""
    attributes: str = "{}"
    """The run's searchable attributes, a JSON object."""

    def as_json(self) -> str:
        """The run as one JSON object, embedding the encoded parts as they are."""
        return (
            f'{{"id":{json.dumps(self.workflow_id)},"args":{self.args},'
            f'"kwargs":{self.kwargs},"steps":{self.steps or "null"},'
            f'"attributes":{self.attributes}}}'
        )


def insert_runs(
    conn: Connection,
    name: str,
    new: list[NewRun],
    timeout: float | None = None,
    trace: str | None = None,
) -> tuple[set[str], list[tuple[int, float]]]:
    """Create runs of ``name`` in one statement, each like :func:`insert_run`.

    Returns the ids created (an id that exists is left alone) and their execution-timeout
    timers (id, fire time as epoch), to index. ``trace``: the trace context of them all.
    """
    params = {
        "trace": trace,
        "runs": "[" + ",".join(run.as_json() for run in new) + "]",
        "name": name,
        "timeout": timeout,
    }
    row = conn.execute(_INSERT_MANY, params).one()
    return set(row.created), [(int(i), float(at)) for i, at in row.timers]


def run_names(conn: Connection, workflow_ids: list[str]) -> dict[str, str]:
    """The workflow name of each run among ``workflow_ids`` that exists."""
    query = select(workflows.c.id, workflows.c.name).where(workflows.c.id.in_(workflow_ids))
    return {row.id: row.name for row in conn.execute(query)}


# What a result wait reads, on the driver's cursor (``first_row``): after the notice of the
# run's end this read is most of the wait's cost, and SQLAlchemy's result objects doubled it.
_OUTCOME = statement("SELECT status, result, error FROM durable_workflows WHERE id = :id")


def get_outcome(conn: Connection, workflow_id: str) -> Any | None:
    """The run's ``status``, ``result`` and ``error``, or None when there is no such run."""
    return first_row(conn, _OUTCOME, {"id": workflow_id})


def get_run(conn: Connection, workflow_id: str) -> Row[Any] | None:
    """The run's row, or None."""
    return conn.execute(select(workflows).where(workflows.c.id == workflow_id)).first()


# The run's row, and whether work has begun: a step (a task, a local step, a child) started.
_STATE = statement(
    """
    SELECT w.status, w.result, w.error,
           EXISTS (SELECT 1 FROM durable_steps s
                    WHERE s.workflow_id = w.id AND s.kind IN ('task', 'local', 'child')
                      AND s.started_at IS NOT NULL) AS begun
      FROM durable_workflows w
     WHERE w.id = :id
    """
)


def get_run_state(conn: Connection, workflow_id: str) -> Row[Any] | None:
    """The run's ``status``, ``result``, ``error`` and ``begun`` (a step started), or None."""
    return conn.execute(_STATE, {"id": workflow_id}).first()


@dataclass(frozen=True)
class Activation:
    """What replay needs, read under the run's lease in one statement."""

    workflow_id: str
    name: str
    args: Any
    """As stored: a JSON list, or a codec's envelope (see ``Core.decode``)."""
    kwargs: Any
    """As stored: a JSON object, or a codec's envelope."""
    wake_seq: int
    """The run's version as read, ``wake_seq + advances``: what the release compares."""
    created_at: datetime
    steps: list[StepRecord]
    cancel_requested: bool = False
    cancelled_at_seq: int | None = None
    patches: tuple[str, ...] = ()
    trace_context: dict[str, str] | None = None
    """The trace context the run's spans continue (:mod:`durable.tracing`), or None."""
    woken: int | None = None
    """The run's ``wake_seq`` alone (``wake_seq`` above is the version, with ``advances``)
    when the statement that read it returned it; a kept history uses it to read only what
    its run's advances changed (``durable.histories``)."""


# The run's wake counter as the statement's snapshot sees it, for a run aliased ``w``: its
# version, wake_seq + advances (a settle that advanced the run counts in advances, see
# ``durable.store.steps``), which grows with every change a replay can see.
# Under READ COMMITTED an UPDATE that waited for the row's lock works on (and RETURNs) the
# newest row version, while every subquery of the statement reads the snapshot taken when it
# began. A history read that way may miss a step another transaction settled meanwhile, so
# the activation must release against the wake counter of that same snapshot: if the row
# moved on, the release fails and replay runs again on a fresh read.
SNAPSHOT_WAKE = "(SELECT d.wake_seq + d.advances FROM durable_workflows d WHERE d.id = w.id)"


def history_json(positions: str = "") -> str:
    """The history of a run aliased ``w`` as one JSON array.

    ``positions``, an SQL condition on its step rows ``s``, keeps only some (a read of what
    changed).
    """
    where = f"s.workflow_id = w.id AND {positions}" if positions else "s.workflow_id = w.id"
    return f"""
    (SELECT coalesce(json_agg(json_build_object(
                'seq', s.seq, 'kind', s.kind, 'name', s.name, 'status', s.status,
                'attempts', s.attempts, 'result', s.result, 'error', s.error,
                'completed_at', s.completed_at) ORDER BY s.seq), '[]')
       FROM durable_steps s WHERE {where})
"""


# The history of a run as one JSON array (replay's whole read), for a run aliased ``w``.
HISTORY_JSON = history_json()

# The run's columns replay needs, as returned by the statements that lease it.
RUN_COLUMNS = (
    "id, name, args, kwargs, wake_seq, advances, created_at, cancel_requested, cancelled_at_seq,"
    " patches, trace_context"
)


def run_columns(values_when: str) -> str:
    """:data:`RUN_COLUMNS`, with the run's ``args`` and ``kwargs`` only where ``values_when``.

    ``values_when`` is an SQL condition on the row; where it does not hold both are NULL,
    for a statement whose caller replays the run only then: the arguments weigh what the
    caller gave, and are sent and decoded for nothing otherwise.
    """
    values = f"CASE WHEN {values_when} THEN args END AS args,"
    values += f" CASE WHEN {values_when} THEN kwargs END AS kwargs"
    return RUN_COLUMNS.replace("args, kwargs", values, 1)


# The lease is taken (free, expired, or already ours) and the whole step history read in one
# statement: replay costs one round trip whatever the number of steps. A paused run is not
# acquired: its activation ends there, and ``durable unpause`` sends it again. A run waiting
# for its delayed start (``start_at`` set) or queued for a slot of its limit (``queued``) is
# not taken either: its code must not run yet.
# Step rows are aggregated into a single JSON value so the run's arguments are not repeated
# per row.
_ACQUIRE = statement(
    """
    WITH w AS (
        UPDATE durable_workflows
           SET lease_owner = :owner,
               lease_expires_at = now() + make_interval(secs => :ttl)
         WHERE id = :id AND (status = 'running') IS TRUE AND NOT paused AND start_at IS NULL
           AND NOT queued
           AND (lease_owner IS NULL OR lease_owner = :owner OR lease_expires_at < now())
        RETURNING """
    + RUN_COLUMNS
    + """
    )
    SELECT w.*, """
    + SNAPSHOT_WAKE
    + """ AS snapshot_wake_seq, """
    + HISTORY_JSON
    + """ AS steps
      FROM w
    """
)


def acquire(conn: Connection, workflow_id: str, owner: str, ttl: float) -> Activation | None:
    """Take the run's lease and load its history; None if another process holds it."""
    row = first_row(conn, _ACQUIRE, {"id": workflow_id, "owner": owner, "ttl": ttl})
    return None if row is None else activation_from_row(row)


def activation_from_row(row: Any, own_wakes: int = 0) -> Activation:
    """Build an :class:`Activation` from a row with the run's columns and ``steps`` JSON.

    Its ``wake_seq`` is the snapshot's (``snapshot_wake_seq``) plus ``own_wakes``, the
    increments the statement itself made: see ``SNAPSHOT_WAKE``.
    """
    steps = records_from_json(row.steps)
    return Activation(
        workflow_id=row.id,
        name=row.name,
        args=row.args if row.args is not None else [],
        kwargs=row.kwargs if row.kwargs is not None else {},
        wake_seq=row.snapshot_wake_seq + own_wakes,
        created_at=row.created_at,
        steps=steps,
        cancel_requested=bool(row.cancel_requested),
        cancelled_at_seq=row.cancelled_at_seq,
        patches=tuple(row.patches or ()),
        trace_context=row.trace_context or None,
    )


_RELEASE = statement(
    """
    UPDATE durable_workflows
       SET lease_owner = NULL, lease_expires_at = NULL, run_seq = wake_seq, updated_at = now()
     WHERE id = :id AND lease_owner = :owner AND wake_seq + advances = :wake_seq
    """
)


def release(conn: Connection, workflow_id: str, owner: str, wake_seq: int) -> bool:
    """Give the lease back; False when the run was woken meanwhile (replay again)."""
    params = {"id": workflow_id, "owner": owner, "wake_seq": wake_seq}
    return row_count(conn, _RELEASE, params) == 1


_LET_GO = statement(
    """
    UPDATE durable_workflows SET lease_owner = NULL, lease_expires_at = NULL
     WHERE id = :id AND lease_owner = :owner
    """
)


def let_go(conn: Connection, workflow_id: str, owner: str) -> bool:
    """Drop ``owner``'s lease on the run without marking anything handled.

    For an activation that cannot replay again (the run was paused while it replayed): the
    run stays owed, and whoever unpauses it finds the lease free.
    """
    return row_count(conn, _LET_GO, {"id": workflow_id, "owner": owner}) == 1


# What a run's end does besides marking the run, as CTEs for the statement that ends it
# (``finish`` below, and a settle that ends the run, ``steps._SETTLE_END``): settle its parent's
# position waiting for it and wake the parent (``pw`` returns the parent's id and name),
# cancel what the run left unstarted, retire its timers. ``{ended}`` names a CTE of the
# ended run's (id, parent_id, parent_seq), one row at most; :end_status, :end_result and
# :end_error say how it ended. Each CTE finds its rows through a scalar subquery, so by key:
# a semi-join could be planned as a scan of every running workflow or pending timer.
RUN_END = """
    p AS (
        UPDATE durable_steps st
           SET status = CASE WHEN :end_status = 'completed' THEN 'completed' ELSE 'failed' END,
               result = CAST(:end_result AS jsonb),
               error = CASE WHEN :end_status = 'completed' THEN NULL
                            ELSE :end_status || ': ' || coalesce(:end_error, '') END,
               completed_at = now()
          FROM {ended} e
         WHERE st.workflow_id = e.parent_id AND st.seq = e.parent_seq AND st.status = 'waiting'
        RETURNING st.workflow_id
    ), pw AS (
        UPDATE durable_workflows SET wake_seq = wake_seq + 1, woken_at = now()
         WHERE id = (SELECT workflow_id FROM p) AND (status = 'running') IS TRUE
        RETURNING id, name
    ), leftover AS (
        UPDATE durable_steps SET status = 'cancelled', completed_at = now()
         WHERE workflow_id = (SELECT id FROM {ended})
           AND status IN ('queued', 'scheduled', 'waiting', 'ready')
    ), unfired AS (
        UPDATE durable_timers SET fired_at = now()
         WHERE workflow_id = (SELECT id FROM {ended}) AND fired_at IS NULL
    )"""

# A run's end also settles its parent's position waiting for it (child workflows), in the
# same statement, so a parent can never miss its child's outcome. Whatever the run left
# unstarted (steps of a cancelled batch, a pending sleep) is cancelled and its timers retired.
# The NOTIFY wakes the waits on the run's result (``durable.store.notices``) at the commit.
_FINISH = statement(
    """
    WITH w AS (
        UPDATE durable_workflows
           SET status = :status, result = CAST(:result AS jsonb), error = :error,
               finished_at = now(), updated_at = now(), run_seq = wake_seq,
               lease_owner = NULL, lease_expires_at = NULL, queued = false
         WHERE id = :id AND (lease_owner = :owner OR :owner = '')
           AND (status = 'running') IS TRUE
        RETURNING id, parent_id, parent_seq, limit_name, limit_key
    ), h AS (
        INSERT INTO durable_history (workflow_id, event, detail)
        SELECT id, :status, jsonb_build_object('error', CAST(:error AS text)) FROM w
    ), """
    + RUN_END.format(ended="w")
    + """, nt AS (SELECT """
    + notify_sql(ENDED, "id")
    + """ FROM w)
    SELECT (SELECT count(*) FROM w) AS finished, (SELECT id FROM pw) AS parent_id,
           (SELECT name FROM pw) AS parent_name, (SELECT count(*) FROM nt) AS notified,
           (SELECT limit_name FROM w) AS limit_name, (SELECT limit_key FROM w) AS limit_key
    """
)


@dataclass(frozen=True)
class Finished:
    """The outcome of :func:`finish`."""

    finished: bool
    parent_id: str | None
    """A parent woken by this child's end: send it an activation."""
    parent_name: str | None = None
    """That parent's workflow name."""
    limit: tuple[str, str] | None = None
    """The (limit name, key) whose slot this end freed, for a limited run."""


def finish(
    conn: Connection,
    workflow_id: str,
    owner: str,
    status: str,
    result: str | None = None,
    error: str | None = None,
) -> Finished:
    """End the run (completed, failed or cancelled; result as JSON text) under its lease.

    ``owner=""`` ends it whoever holds the lease (an execution timeout does that).
    """
    params = {
        "id": workflow_id,
        "owner": owner,
        "status": status,
        "result": result,
        "error": error,
        "end_status": status,
        "end_result": result,
        "end_error": error,
    }
    row = one_row(conn, _FINISH, params)
    limit = (row.limit_name, row.limit_key) if row.limit_name is not None else None
    return Finished(bool(row.finished), row.parent_id, row.parent_name, limit)


_PATCH = statement(
    """
    UPDATE durable_workflows
       SET patches = coalesce(patches, '[]'::jsonb) || jsonb_build_array(CAST(:change AS text))
     WHERE id = :id AND lease_owner = :owner
    """
)


def record_patch(conn: Connection, workflow_id: str, owner: str, change_id: str) -> None:
    """Remember that this run took the new code path of ``change_id``."""
    conn.execute(_PATCH, {"id": workflow_id, "owner": owner, "change": change_id})


# ``ctx.set_attributes``: the position is recorded (its result is the attributes it set) and
# the attributes merged into the run's in one statement, under the lease, only when the
# position is new and the merged attributes stay within the limits; a replay finds the
# position recorded and writes nothing.
_SET_ATTRIBUTES = statement(
    """
    WITH m AS (
        SELECT w.attributes || CAST(:attrs AS jsonb) AS merged
          FROM durable_workflows w
         WHERE w.id = :wid AND w.lease_owner = :owner
    ), ok AS (
        SELECT merged FROM m
         WHERE (SELECT count(*) FROM jsonb_object_keys(m.merged)) <= :max_keys
           AND octet_length(CAST(m.merged AS text)) <= :max_bytes
    ), s AS (
        INSERT INTO durable_steps (workflow_id, seq, kind, name, status, result, started_at,
                                   completed_at)
        SELECT :wid, :seq, 'attributes', 'attributes', 'completed', CAST(:attrs AS jsonb),
               now(), now()
          FROM ok
        ON CONFLICT (workflow_id, seq) DO NOTHING
        RETURNING completed_at
    ), u AS (
        UPDATE durable_workflows SET attributes = (SELECT merged FROM ok), updated_at = now()
         WHERE id = :wid AND EXISTS (SELECT 1 FROM s)
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT :wid, :seq, 'attributes set', CAST(:attrs AS jsonb) FROM s
    )
    SELECT (SELECT count(*) FROM m) AS leased, (SELECT count(*) FROM ok) AS within,
           (SELECT completed_at FROM s) AS completed_at
    """
)


@dataclass(frozen=True)
class AttributesSet:
    """The outcome of :func:`set_attributes`."""

    within_limits: bool
    """False when the merged attributes would pass a limit: nothing was written."""
    completed_at: datetime | None
    """The position's commit time (None when nothing was written)."""


def set_attributes(
    conn: Connection,
    wid: str,
    owner: str,
    seq: int,
    attributes: str,
    max_keys: int,
    max_bytes: int,
) -> AttributesSet:
    """Merge ``attributes`` (a JSON object) into the run's, recorded at position ``seq``."""
    params = {
        "wid": wid,
        "owner": owner,
        "seq": seq,
        "attrs": attributes,
        "max_keys": max_keys,
        "max_bytes": max_bytes,
    }
    row = conn.execute(_SET_ATTRIBUTES, params).one()
    within = not row.leased or bool(row.within)
    return AttributesSet(within, row.completed_at)


_WAKE = statement(
    """
    UPDATE durable_workflows SET wake_seq = wake_seq + 1, woken_at = now()
     WHERE id = :id AND (status = 'running') IS TRUE
    """
)


def wake(conn: Connection, workflow_id: str) -> bool:
    """Note that the run has something new to replay; False if it is not running."""
    return conn.execute(_WAKE, {"id": workflow_id}).rowcount == 1


_RENEW = statement(
    """
    WITH s AS (
        UPDATE durable_steps SET lease_expires_at = now() + make_interval(secs => :ttl)
         WHERE status = 'started' AND lease_owner = ANY(:tokens)
        RETURNING 1
    ), w AS (
        UPDATE durable_workflows SET lease_expires_at = now() + make_interval(secs => :ttl)
         WHERE lease_owner = ANY(:tokens)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM s) + (SELECT count(*) FROM w)
    """
)


def renew_leases(conn: Connection, tokens: list[str], ttl: float) -> int:
    """Extend every lease held by one of ``tokens``; returns how many."""
    return int(conn.execute(_RENEW, {"tokens": tokens, "ttl": ttl}).scalar_one())


_DROP_STEP_LEASE = statement(
    """
    UPDATE durable_steps SET lease_expires_at = now()
     WHERE workflow_id = :wid AND seq = :seq AND status = 'started' AND lease_owner = :owner
    """
)


def drop_step_lease(conn: Connection, wid: str, seq: int, owner: str) -> bool:
    """Expire ``owner``'s lease on a started step now, for the sweep; False if not held."""
    params = {"wid": wid, "seq": seq, "owner": owner}
    return bool(conn.execute(_DROP_STEP_LEASE, params).rowcount)
