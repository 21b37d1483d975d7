"""Queries of the operator's tools: listing and inspecting runs, resume, retry, fork, purge.

Each write is one statement (data-modifying CTEs write the history row with the change), so
it is safe to repeat and needs no transaction of the caller's. Reconciliation's queries are
in :mod:`durable.store.reconcile`, the aggregates metrics read in
:mod:`durable.store.metrics`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, TextClause

from durable.attributes import AttributeFilter
from durable.errors import InvalidAttributes
from durable.store.history import DERIVED_EVENTS
from durable.store.statement import statement

# What a run waits on: the first position that has not settled, and its next unfired timer.
# Listing shows this for running runs; the filters of ``durable list --waiting`` test the same
# facts with EXISTS so that an index on the step or timer table serves them.
_PENDING_STEP = """
    (SELECT json_build_object('seq', p.seq, 'kind', p.kind, 'name', p.name, 'status', p.status)
       FROM durable_steps p
      WHERE p.workflow_id = w.id
        AND p.status IN ('queued', 'scheduled', 'started', 'waiting', 'ready')
      ORDER BY p.seq LIMIT 1)
"""
_NEXT_TIMER = """
    (SELECT min(t.fire_at) FROM durable_timers t WHERE t.workflow_id = w.id AND t.fired_at IS NULL)
"""
WAITING_FILTERS = {
    "step": """EXISTS (SELECT 1 FROM durable_steps s WHERE s.workflow_id = w.id
                   AND s.kind IN ('task', 'local')
                   AND s.status IN ('scheduled', 'started', 'ready'))""",
    "timer": """EXISTS (SELECT 1 FROM durable_timers t WHERE t.workflow_id = w.id
                    AND t.fired_at IS NULL)""",
    "signal": """EXISTS (SELECT 1 FROM durable_steps s WHERE s.workflow_id = w.id
                     AND s.kind = 'signal' AND s.status = 'waiting')""",
    # A run, or a step of it, under a concurrency limit waiting for a slot of its key.
    "queued": """(w.queued OR EXISTS (SELECT 1 FROM durable_steps s WHERE s.workflow_id = w.id
                     AND s.status = 'queued'))""",
}


# A time held in an attribute: an ISO-8601 date or date and time, with an offset (first) or
# without one (read as UTC). Only strings of these shapes are cast, in a CASE, so that a
# string that is not a time never makes the cast fail; it just does not match. The shapes
# are the ones PostgreSQL reads: years 1 to 9999, the days each month has (29 February in
# leap years only), offsets up to 15:59.
_YEAR = r"(000[1-9]|00[1-9]\d|0[1-9]\d\d|[1-9]\d{3})"
_LEAP = r"(\d\d(0[48]|[2468][048]|[13579][26])|(0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    rf"({_YEAR}-(0[1-9]|1[0-2])-(0[1-9]|1\d|2[0-8])|{_YEAR}-(0[13-9]|1[0-2])-(29|30)"
    rf"|{_YEAR}-(0[13578]|1[02])-31|{_LEAP}-02-29)"
)
_CLOCK = r"[T ]([01]\d|2[0-3]):[0-5]\d(:[0-5]\d(\.\d{1,6})?)?"
TIME_WITH_OFFSET = rf"^{_DATE}{_CLOCK}(Z|[+-](0\d|1[0-5])(:?[0-5]\d)?)$"
TIME_WITHOUT_OFFSET = rf"^{_DATE}({_CLOCK})?$"
AS_TIME = """
    (CASE WHEN w.attributes ->> :{k} ~ :attr_time_tz
          THEN CAST(w.attributes ->> :{k} AS timestamptz)
          WHEN w.attributes ->> :{k} ~ :attr_time
          THEN CAST(w.attributes ->> :{k} AS timestamp) AT TIME ZONE 'UTC' END)"""


def attribute_conditions(
    filters: Sequence[AttributeFilter],
) -> tuple[list[str], dict[str, Any]]:
    """The SQL conditions on ``w.attributes`` of ``filters``, and their parameters.

    Every equality becomes one containment (``w.attributes @> '{"customer": 42, ...}'``),
    which the GIN index serves; each bound of a range is a comparison of the value under
    its key, a number with numbers (``jsonb`` compares numbers by value) and a time with the
    strings that hold a time.

    Raises:
        InvalidAttributes: one key is given two different values to be equal to.
    """
    equal: dict[str, Any] = {}
    where: list[str] = []
    params: dict[str, Any] = {}
    for i, f in enumerate(filters):
        if f.op == "=":
            if f.key in equal and equal[f.key] != f.value:
                raise InvalidAttributes(f"{f.key!r} is given two values to be equal to")
            equal[f.key] = f.value
            continue
        k, v = f"attr_k{i}", f"attr_v{i}"
        params[k] = f.key
        if isinstance(f.value, datetime):
            params[v] = f.value
            params["attr_time_tz"], params["attr_time"] = TIME_WITH_OFFSET, TIME_WITHOUT_OFFSET
            where.append(f"{AS_TIME.format(k=k)} {f.op} :{v}")
        else:
            params[v] = json.dumps(f.value)
            where.append(
                f"jsonb_typeof(w.attributes -> :{k}) = 'number'"
                f" AND w.attributes -> :{k} {f.op} CAST(:{v} AS jsonb)"
            )
    if equal:
        params["attr_eq"] = json.dumps(equal, separators=(",", ":"))
        where.insert(0, "w.attributes @> CAST(:attr_eq AS jsonb)")
    return where, params


def run_conditions(
    *,
    status: str | None = None,
    name: str | None = None,
    since: datetime | None = None,
    waiting: str | None = None,
    paused: bool = False,
) -> list[str]:
    """The SQL conditions on ``durable_workflows w`` that ``durable list``'s filters make.

    They read the parameters ``:status``, ``:name`` and ``:since``; the bulk forms of cancel,
    retry, resume, purge, pause and unpause select with the same conditions
    (:mod:`durable.store.bulk`). ``paused`` keeps only paused runs.
    """
    where = ["true"]
    if status:
        where.append("w.status = :status")
    if name:
        where.append("w.name = :name")
    if since:
        where.append("w.created_at >= :since")
    if waiting:
        where.append(f"w.status = 'running' AND {WAITING_FILTERS[waiting]}")
    if paused:
        where.append("w.paused")
    return where


def list_runs(
    conn: Connection,
    *,
    status: str | None = None,
    name: str | None = None,
    since: datetime | None = None,
    waiting: str | None = None,
    paused: bool = False,
    attributes: Sequence[AttributeFilter] = (),
    limit: int = 50,
) -> list[Row[Any]]:
    """Runs, newest first, with what each running one waits on (``pending``, ``next_timer``).

    Args:
        conn: A connection to the store.
        status: Only runs in this status.
        name: Only runs of this workflow.
        since: Only runs created at or after this time.
        waiting: Only running runs waiting on a ``step``, a ``timer``, a ``signal``, or
            ``queued`` for a slot of a concurrency limit (the run's own, or a step's).
        paused: Only paused runs.
        attributes: Only runs whose attributes pass every one of these filters.
        limit: Most rows returned.
    """
    query, params = list_runs_query(
        status=status,
        name=name,
        since=since,
        waiting=waiting,
        paused=paused,
        attributes=attributes,
        limit=limit,
    )
    return list(conn.execute(query, params))


def _newest_first(attribute_params: dict[str, Any]) -> str:
    """The listing's order; with an attribute equality, one no index on time can give.

    The planner's estimate of a containment's selectivity swings with ANALYZE's sample
    (from a few rows to one percent of the table). Estimated high, it walks the (status,
    created_at) index newest first and tests every run's attributes until the limit is
    filled, through all the runs of that status when few match. Ordered by an expression,
    the runs come from the GIN index and only the matches are sorted.
    """
    if "attr_eq" in attribute_params:
        return "w.created_at + interval '0 seconds' DESC"
    return "w.created_at DESC"


def list_runs_query(
    *,
    status: str | None = None,
    name: str | None = None,
    since: datetime | None = None,
    waiting: str | None = None,
    paused: bool = False,
    attributes: Sequence[AttributeFilter] = (),
    limit: int = 50,
) -> tuple[TextClause, dict[str, Any]]:
    """The statement :func:`list_runs` sends, and its parameters (to EXPLAIN it too)."""
    where = run_conditions(status=status, name=name, since=since, waiting=waiting, paused=paused)
    on_attributes, attribute_params = attribute_conditions(attributes)
    where += on_attributes
    query = f"""
        SELECT w.id, w.name, w.status, w.paused, w.created_at, w.updated_at, w.finished_at,
               w.attributes, w.wake_seq > w.run_seq AS owed, w.start_at, w.queued,
               w.limit_name,
               CASE WHEN w.status = 'running' THEN {_PENDING_STEP} END AS pending,
               CASE WHEN w.status = 'running' THEN {_NEXT_TIMER} END AS next_timer
          FROM durable_workflows w
         WHERE {" AND ".join(where)}
         ORDER BY {_newest_first(attribute_params)} LIMIT :limit
    """
    params = {"status": status, "name": name, "since": since, "limit": limit}
    return statement(query), {**params, **attribute_params}


_TIMERS = """
    SELECT t.id, t.workflow_id, t.seq, t.purpose, t.fire_at, t.fired_at, t.created_at,
           w.name AS workflow_name, w.status AS workflow_status, s.name AS step_name
      FROM durable_timers t
      JOIN durable_workflows w ON w.id = t.workflow_id
      LEFT JOIN durable_steps s ON s.workflow_id = t.workflow_id AND s.seq = t.seq
     WHERE {where}
     ORDER BY t.fire_at, t.id LIMIT :limit
"""


def list_timers(
    conn: Connection, *, pending: bool = True, workflow_id: str | None = None, limit: int = 100
) -> list[Row[Any]]:
    """Timers, soonest first: only unfired ones unless ``pending`` is False."""
    where = ["true"]
    if pending:
        where.append("t.fired_at IS NULL")
    if workflow_id:
        where.append("t.workflow_id = :wid")
    query = statement(_TIMERS.format(where=" AND ".join(where)))
    return list(conn.execute(query, {"wid": workflow_id, "limit": limit}))


# -- pause, unpause and resume -----------------------------------------------------------------

# Pausing a running run sets its flag and wakes it (wake_seq + 1): a settle whose worker
# replayed the run in memory before the pause then finds the counter moved and does not
# advance it, and an activation replaying it meanwhile fails its release. Nothing is sent.
_PAUSE = statement(
    """
    WITH r AS (
        SELECT id, status, paused FROM durable_workflows WHERE id = :id
    ), w AS (
        UPDATE durable_workflows
           SET paused = true, wake_seq = wake_seq + 1, woken_at = now(), updated_at = now()
         WHERE id = :id AND (status = 'running') IS TRUE AND NOT paused
        RETURNING id
    ), h AS (
        INSERT INTO durable_history (workflow_id, event, detail)
        SELECT id, 'paused', jsonb_build_object('by', 'operator') FROM w
    )
    SELECT r.status, r.paused, (SELECT count(*) FROM w) AS changed FROM r
    """
)


@dataclass(frozen=True)
class PauseChange:
    """What :func:`pause_run` found: the run's status, and whether this call paused it."""

    status: str
    was_paused: bool
    changed: bool


def pause_run(conn: Connection, wid: str) -> PauseChange | None:
    """Pause a running run (a no-op if it already is); None when there is no run."""
    row = conn.execute(_PAUSE, {"id": wid}).first()
    return None if row is None else PauseChange(row.status, bool(row.paused), bool(row.changed))


# Resuming a running run wakes it (wake_seq + 1, so the activation replays even if the last
# one released the lease cleanly) and takes back what may have been lost around it: a step
# whose worker died (lease expired) goes back to scheduled, and every scheduled step is marked
# re-sent. The caller sends the activation and those steps, and re-indexes the unfired timers
# returned; duplicates of any of them are harmless. Resuming lifts a pause (history:
# 'unpaused', by 'resume'). Unpausing (:unpause) is the same statement for a paused run only:
# what came due while it was paused (timers, steps whose claim it refused, a step whose
# worker died) is dispatched now, and its activation replays what it was sent meanwhile
# (signals, settled steps, a child's end).
_RESUME = statement(
    """
    WITH r AS (
        SELECT id, name, status, paused FROM durable_workflows WHERE id = :id
    ), w AS (
        UPDATE durable_workflows
           SET wake_seq = wake_seq + 1, woken_at = now(), paused = false,
               updated_at = CASE WHEN paused THEN now() ELSE updated_at END
         WHERE id = :id AND (status = 'running') IS TRUE AND (paused OR NOT :unpause)
        RETURNING id
    ), h AS (
        INSERT INTO durable_history (workflow_id, event, detail)
        SELECT id, 'resumed', jsonb_build_object('by', 'operator') FROM w WHERE NOT :unpause
    ), hp AS (
        INSERT INTO durable_history (workflow_id, event, detail)
        SELECT w.id, 'unpaused',
               jsonb_build_object('by', CASE WHEN :unpause THEN 'operator' ELSE 'resume' END)
          FROM w, r WHERE r.paused
    ), e AS (
        UPDATE durable_steps st
           SET status = 'scheduled', lease_owner = NULL, lease_expires_at = NULL,
               dispatched_at = now(), dispatch_count = st.dispatch_count + 1
          FROM w
         WHERE st.workflow_id = w.id AND st.status = 'started' AND st.lease_expires_at < now()
        RETURNING st.seq, st.name, st.options
    ), eh AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT :id, seq, 'step lease expired', jsonb_build_object('by', 'operator') FROM e
    ), s AS (
        UPDATE durable_steps st
           SET dispatched_at = now(), dispatch_count = st.dispatch_count + 1
          FROM w
         WHERE st.workflow_id = w.id AND st.status = 'scheduled'
        RETURNING st.seq, st.name, st.options
    )
    SELECT r.name, r.status, r.paused, (SELECT count(*) FROM w) AS woken,
           (SELECT coalesce(json_agg(json_build_object('seq', seq, 'name', name,
                                                       'options', options)), '[]')
              FROM (SELECT * FROM e UNION ALL SELECT * FROM s) AS sent) AS steps,
           (SELECT coalesce(json_agg(json_build_array(t.id, extract(epoch FROM t.fire_at))),
                            '[]')
              FROM durable_timers t, w
             WHERE t.workflow_id = w.id AND t.fired_at IS NULL) AS timers
      FROM r
    """
)


@dataclass(frozen=True)
class RunToResume:
    """What :func:`resume_run` woke: the run's steps to send again and timers to index."""

    name: str
    status: str
    """The run's status before the call; only a ``running`` run was resumed."""
    woken: bool
    steps: list[dict[str, Any]]
    """The steps to send again: ``seq``, ``name``, ``options``."""
    timers: list[tuple[int, float]]
    """The run's unfired timers as (id, fire time as epoch), to index again."""
    was_paused: bool = False
    """Whether the run was paused before the call (and so is no longer)."""


def resume_run(conn: Connection, wid: str, unpause: bool = False) -> RunToResume | None:
    """Wake a running run and mark its scheduled steps re-sent; None when there is no run.

    A paused run is unpaused. With ``unpause`` only a paused run is woken (``woken`` is False
    for one that is not).
    """
    row = conn.execute(_RESUME, {"id": wid, "unpause": unpause}).first()
    if row is None:
        return None
    steps = row.steps if isinstance(row.steps, list) else json.loads(row.steps)
    timers = row.timers if isinstance(row.timers, list) else json.loads(row.timers)
    return RunToResume(
        row.name,
        row.status,
        bool(row.woken),
        list(steps),
        [(int(t[0]), float(t[1])) for t in timers],
        bool(row.paused),
    )


# -- retry -------------------------------------------------------------------------------------

# A failed run goes back to running from its first position that did not complete (a failed
# step, a signal wait that timed out, anything cut short): that position and every one after
# it are deleted with their timers (so they run again), signals they consumed are given back,
# child runs they started are deleted with their own descendants (so they start afresh), and
# the run is woken (wake_seq + 1 > run_seq: owed an activation). Earlier positions keep their
# results. A run that failed with every position complete (the workflow raised, or replay
# found non-determinism) keeps its whole history and replays from the top.
_RETRY = statement(
    """
    WITH RECURSIVE r AS (
        SELECT id, name, status FROM durable_workflows WHERE id = :id FOR UPDATE
    ), f AS (
        SELECT min(seq) AS seq FROM durable_steps
         WHERE workflow_id = :id AND status <> 'completed'
    ), w AS (
        UPDATE durable_workflows
           SET status = 'running', result = NULL, error = NULL, finished_at = NULL,
               updated_at = now(), wake_seq = wake_seq + 1, woken_at = now(),
               lease_owner = NULL, lease_expires_at = NULL,
               cancel_requested = false, cancelled_at_seq = NULL,
               queued = limit_name IS NOT NULL
         WHERE id = :id AND status = 'failed'
        RETURNING id, limit_name, limit_key
    ), children AS (
        SELECT c.id FROM durable_workflows c, w
         WHERE c.parent_id = w.id AND c.parent_seq >= (SELECT seq FROM f)
        UNION
        SELECT g.id FROM durable_workflows g JOIN children ON g.parent_id = children.id
    ), dc AS (
        DELETE FROM durable_workflows WHERE id IN (SELECT id FROM children)
    ), dh AS (
        DELETE FROM durable_history WHERE workflow_id IN (SELECT id FROM children)
    ), d AS (
        DELETE FROM durable_steps
         WHERE workflow_id IN (SELECT id FROM w) AND seq >= (SELECT seq FROM f)
        RETURNING *
    ), dh2 AS (
        -- The deleted steps' own events (their rows were their history) are kept as rows.
        INSERT INTO durable_history (workflow_id, seq, event, detail, at)
        SELECT workflow_id, seq, event, detail, at FROM ("""
    + DERIVED_EVENTS.format(steps="d", alias="d")
    + """) AS e
    ), t AS (
        DELETE FROM durable_timers
         WHERE workflow_id IN (SELECT id FROM w) AND seq >= (SELECT seq FROM f)
    ), g AS (
        UPDATE durable_signals SET consumed_seq = NULL, consumed_at = NULL
         WHERE workflow_id IN (SELECT id FROM w) AND consumed_seq >= (SELECT seq FROM f)
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT id, (SELECT seq FROM f), 'retried',
               jsonb_build_object('by', 'operator', 'from_step', (SELECT seq FROM f))
          FROM w
    )
    SELECT r.name, r.status, (SELECT count(*) FROM w) AS retried,
           (SELECT seq FROM f) AS from_step, (SELECT count(*) FROM d) AS removed,
           (SELECT limit_name FROM w) AS limit_name, (SELECT limit_key FROM w) AS limit_key
      FROM r
    """
)


@dataclass(frozen=True)
class Retried:
    """The outcome of :func:`retry_run`."""

    name: str
    status: str
    """The run's status before the call; only a ``failed`` run was retried."""
    retried: bool
    from_step: int | None
    """The first position that did not complete, run again with all after it (None: none)."""
    removed: int
    """How many step rows were deleted to run again."""
    limit: tuple[str, str] | None = None
    """A limited run's (limit name, key): it was queued again, to be admitted."""


def retry_run(conn: Connection, wid: str) -> Retried | None:
    """Set a failed run running again from its first unfinished step; None: no such run."""
    row = conn.execute(_RETRY, {"id": wid}).first()
    if row is None:
        return None
    limit = (row.limit_name, row.limit_key) if row.limit_name is not None else None
    return Retried(row.name, row.status, bool(row.retried), row.from_step, int(row.removed), limit)


# -- fork --------------------------------------------------------------------------------------

# A new run of the same workflow and arguments that reuses the completed positions before
# ``from_step``: their rows are copied with their results and times (so ``ctx.now()`` replays
# the same), as are the events those positions published. The attributes are copied as the
# source holds them (its ``set_attributes`` positions before ``from_step`` are not run again;
# those from there on merge again when the fork runs them). Everything from ``from_step`` on
# runs again when the new run is activated.
_FORK = statement(
    """
    WITH src AS (
        SELECT id, name, args, kwargs, attributes FROM durable_workflows WHERE id = :src
    ), w AS (
        INSERT INTO durable_workflows (id, name, status, args, kwargs, attributes)
        SELECT :new, name, 'running', args, kwargs, attributes FROM src
        ON CONFLICT (id) DO NOTHING
        RETURNING id, name
    ), s AS (
        INSERT INTO durable_steps (workflow_id, seq, kind, name, status, attempts, args, kwargs,
                                   options, result, error, created_at, started_at, completed_at)
        SELECT w.id, st.seq, st.kind, st.name, st.status, st.attempts, st.args, st.kwargs,
               st.options, st.result, st.error, st.created_at, st.started_at, st.completed_at
          FROM w, durable_steps st
         WHERE st.workflow_id = :src AND st.seq < :from_step AND st.status = 'completed'
        RETURNING seq
    ), e AS (
        INSERT INTO durable_events (workflow_id, key, value, updated_at)
        SELECT DISTINCT ON (st.name) w.id, st.name, st.result, st.completed_at
          FROM w, durable_steps st
         WHERE st.workflow_id = :src AND st.seq < :from_step AND st.status = 'completed'
           AND st.kind = 'event'
         ORDER BY st.name, st.seq DESC
    ), h AS (
        INSERT INTO durable_history (workflow_id, event, detail)
        SELECT id, 'started',
               jsonb_build_object('name', name, 'forked_from', CAST(:src AS text),
                                  'from_step', CAST(:from_step AS int))
          FROM w
    ), hs AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT :new, seq, 'step copied', jsonb_build_object('from', CAST(:src AS text)) FROM s
    ), stale AS (
        DELETE FROM durable_history WHERE workflow_id IN (SELECT id FROM w)
    )
    SELECT src.name, (SELECT count(*) FROM w) AS created, (SELECT count(*) FROM s) AS copied
      FROM src
    """
)


@dataclass(frozen=True)
class Forked:
    """The outcome of :func:`fork_run`."""

    name: str
    created: bool
    """False when the new id was taken (nothing was written)."""
    copied: int


def fork_run(conn: Connection, wid: str, new_id: str, from_step: int) -> Forked | None:
    """Create run ``new_id`` from ``wid``'s completed steps before ``from_step``.

    Returns None when ``wid`` does not exist.
    """
    row = conn.execute(_FORK, {"src": wid, "new": new_id, "from_step": from_step}).first()
    if row is None:
        return None
    return Forked(row.name, bool(row.created), int(row.copied))


# -- purge -------------------------------------------------------------------------------------

# Finished runs are deleted in batches, oldest first, skipping rows another purge holds: the
# foreign keys cascade to their steps, timers, signals and events; their history (which has
# no foreign key) is deleted by the same statement.
_PURGE = statement(
    """
    WITH c AS (
        SELECT id FROM durable_workflows
         WHERE status IN ('completed', 'failed', 'cancelled')
           AND finished_at < now() - make_interval(secs => :age)
         ORDER BY finished_at LIMIT :batch
           FOR UPDATE SKIP LOCKED
    ), h AS (
        DELETE FROM durable_history WHERE workflow_id IN (SELECT id FROM c)
    )
    DELETE FROM durable_workflows w USING c WHERE w.id = c.id
    RETURNING w.id
    """
)

_COUNT_PURGEABLE = statement(
    """
    SELECT count(*) FROM durable_workflows
     WHERE status IN ('completed', 'failed', 'cancelled')
       AND finished_at < now() - make_interval(secs => :age)
    """
)


def purge_runs(conn: Connection, age: float, batch: int = 1000) -> int:
    """Delete one batch of runs finished more than ``age`` seconds ago; returns how many."""
    return len(list(conn.execute(_PURGE, {"age": age, "batch": batch})))


def count_purgeable(conn: Connection, age: float) -> int:
    """How many runs finished more than ``age`` seconds ago."""
    return int(conn.execute(_COUNT_PURGEABLE, {"age": age}).scalar_one())
