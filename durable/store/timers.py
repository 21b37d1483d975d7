"""Queries on durable timers: firing (the exactly-once gate), sweeps and index rebuilds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, select

from durable.store.models import timers
from durable.store.statement import statement


@dataclass(frozen=True)
class FiredTimer:
    """A timer that this call fired, and what must be dispatched because of it."""

    timer_id: int
    workflow_id: str
    seq: int
    kind: str
    """``task``: send the step again; ``deadline``: end the run; ``admit``: admit the queued
    step's limit key again; else (a sleep, a local step's retry, a signal wait's timeout, a
    delayed ``start``) activate the run."""
    name: str
    options: dict[str, Any]
    lateness: float
    workflow_name: str = ""
    """The run's workflow (to label the activation message)."""


# Setting fired_at WHERE fired_at IS NULL is the exactly-once gate: however many beats claim
# the same id (from Redis, from a sweep, after a rebuild), one UPDATE wins. The same statement
# moves the position on and wakes the workflow where replay must run:
#   sleep  -> completed (its commit time is the later of now and the due time, so a test that
#             skips time sees ctx.now() move by the full sleep)
#   task   -> scheduled again (a retry is due: the beat sends the step)
#   local  -> ready (a local step's retry is due: replay runs it)
#   signal -> timeout (the wait raises SignalTimeout on replay)
# A 'deadline' timer (position 0) is a run's execution timeout; the caller ends the run.
# A timer of a paused run does not fire: it stays unfired in PostgreSQL (the index may have
# dropped it) and ``durable unpause`` indexes it again.
# A 'start' timer (position 0) starts a delayed run: 'started', woken; the caller activates it.
# An 'admit' timer is on a queued step of a rate-limited key: the caller admits the key
# again (``durable.store.limits``), the step's options naming it.
_FIRE = statement(
    """
    WITH t AS (
        UPDATE durable_timers SET fired_at = now()
         WHERE id = ANY(:ids) AND fired_at IS NULL
           AND NOT coalesce((SELECT pw.paused FROM durable_workflows pw
                              WHERE pw.id = durable_timers.workflow_id), false)
        RETURNING id, workflow_id, seq, purpose, fire_at
    ), s AS (
        UPDATE durable_steps st
           SET status = CASE st.kind WHEN 'sleep' THEN 'completed' WHEN 'task' THEN 'scheduled'
                                     WHEN 'signal' THEN 'timeout' ELSE 'ready' END,
               completed_at = CASE WHEN st.kind IN ('sleep', 'signal')
                                   THEN greatest(now(), t.fire_at) ELSE st.completed_at END,
               dispatched_at = CASE WHEN st.kind = 'task' THEN now() ELSE st.dispatched_at END,
               dispatch_count = st.dispatch_count + CASE WHEN st.kind = 'task' THEN 1 ELSE 0 END
          FROM t
         WHERE st.workflow_id = t.workflow_id AND st.seq = t.seq AND st.status = 'waiting'
           AND t.purpose NOT IN ('deadline', 'admit')
        RETURNING st.workflow_id, st.seq, st.kind, st.name, st.options
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT workflow_id, seq, 'timer fired',
               jsonb_build_object('timer', id, 'purpose', purpose,
                                  'lateness', extract(epoch FROM now() - fire_at))
          FROM t
    ), w AS (
        UPDATE durable_workflows wf SET wake_seq = wake_seq + 1, woken_at = now()
         WHERE wf.status = 'running'
           AND wf.id IN (SELECT workflow_id FROM s WHERE kind <> 'task')
    ), begun AS (
        -- A delayed start is due: the run may now be activated (durable.store.delayed).
        UPDATE durable_workflows wf
           SET start_at = NULL, wake_seq = wake_seq + 1, woken_at = now(), updated_at = now()
          FROM t
         WHERE t.purpose = 'start' AND wf.id = t.workflow_id AND wf.status = 'running'
           AND wf.start_at IS NOT NULL
        RETURNING wf.id, wf.name
    ), bh AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT id, NULL, 'started', jsonb_build_object('name', name) FROM begun
    )
    SELECT t.id, t.workflow_id, t.seq, t.purpose,
           coalesce(s.kind, t.purpose) AS kind, coalesce(s.name, q.name, '') AS name,
           coalesce(s.options, q.options) AS options,
           extract(epoch FROM now() - t.fire_at) AS lateness, wf.name AS workflow_name
      FROM t LEFT JOIN s ON s.workflow_id = t.workflow_id AND s.seq = t.seq
      LEFT JOIN durable_steps q ON t.purpose = 'admit' AND q.workflow_id = t.workflow_id
                               AND q.seq = t.seq AND q.status = 'queued'
      JOIN durable_workflows wf ON wf.id = t.workflow_id AND wf.status = 'running'
     WHERE s.seq IS NOT NULL OR t.purpose = 'deadline' OR q.seq IS NOT NULL
        OR (t.purpose = 'start' AND t.workflow_id IN (SELECT id FROM begun))
    """
)


def fire_timers(conn: Connection, ids: list[int]) -> list[FiredTimer]:
    """Fire the given timers that have not fired yet; returns what they woke."""
    if not ids:
        return []
    rows = conn.execute(_FIRE, {"ids": ids})
    return [
        FiredTimer(
            int(r.id),
            r.workflow_id,
            r.seq,
            r.kind,
            r.name,
            dict(r.options or {}),
            float(r.lateness or 0.0),
            r.workflow_name,
        )
        for r in rows
    ]


_DUE_BY = statement(
    """
    SELECT id FROM durable_timers
     WHERE fired_at IS NULL AND fire_at <= now() + make_interval(secs => :ahead)
       AND (CAST(:wid AS text) IS NULL OR workflow_id = :wid)
     ORDER BY fire_at LIMIT :limit
    """
)


def timers_due_by(
    conn: Connection, ahead: float, workflow_id: str | None = None, limit: int = 500
) -> list[int]:
    """Unfired timers due within ``ahead`` seconds from now (time skipping in tests)."""
    params = {"ahead": ahead, "wid": workflow_id, "limit": limit}
    return [int(r.id) for r in conn.execute(_DUE_BY, params)]


# A paused run's timers are not overdue: they wait for its unpause.
_OVERDUE = statement(
    """
    SELECT t.id FROM durable_timers t
     WHERE t.fired_at IS NULL AND t.fire_at <= now() - make_interval(secs => :grace)
       AND NOT coalesce((SELECT w.paused FROM durable_workflows w WHERE w.id = t.workflow_id),
                        false)
     ORDER BY t.fire_at LIMIT :limit
    """
)


def overdue_timers(conn: Connection, grace: float, limit: int = 500) -> list[int]:
    """Ids of unfired timers due more than ``grace`` seconds ago (missing from the index)."""
    return [int(r.id) for r in conn.execute(_OVERDUE, {"grace": grace, "limit": limit})]


def pending_timers(conn: Connection) -> list[tuple[int, float]]:
    """Every unfired timer as (id, fire time as epoch): the source of an index rebuild."""
    query = select(timers.c.id, timers.c.fire_at).where(timers.c.fired_at.is_(None))
    return [(int(r.id), r.fire_at.timestamp()) for r in conn.execute(query)]


def list_timers(conn: Connection, wid: str) -> list[Row[Any]]:
    """Every timer of a run."""
    query = select(timers).where(timers.c.workflow_id == wid).order_by(timers.c.id)
    return list(conn.execute(query))
