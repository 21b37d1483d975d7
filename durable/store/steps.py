"""Queries on steps: schedule, claim, complete, fail, retry, local results and sleeps.

Each function is one statement (data-modifying CTEs write the history row in the same
statement), so on an autocommit connection every state change costs one round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, select, text

from durable.store.models import steps

_SCHEDULE = text(
    """
    WITH s AS (
        INSERT INTO durable_steps (workflow_id, seq, kind, name, status, args, kwargs, options,
                                   dispatched_at, dispatch_count)
        VALUES (:wid, :seq, 'task', :name, 'scheduled', CAST(:args AS jsonb),
                CAST(:kwargs AS jsonb), CAST(:options AS jsonb), now(), 1)
        ON CONFLICT (workflow_id, seq) DO NOTHING
        RETURNING workflow_id, seq
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT workflow_id, seq, 'step scheduled', jsonb_build_object('name', CAST(:name AS text))
          FROM s
    )
    SELECT count(*) FROM s
    """
)


def schedule_step(
    conn: Connection, wid: str, seq: int, name: str, args: str, kwargs: str, options: str
) -> bool:
    """Record a remote step as scheduled (JSON text arguments); False if it already exists."""
    params = {
        "wid": wid,
        "seq": seq,
        "name": name,
        "args": args,
        "kwargs": kwargs,
        "options": options,
    }
    return bool(conn.execute(_SCHEDULE, params).scalar_one())


@dataclass(frozen=True)
class ClaimedStep:
    """A step this process now owns and must run."""

    workflow_id: str
    seq: int
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    options: dict[str, Any]
    attempt: int


_CLAIM = text(
    """
    WITH s AS (
        UPDATE durable_steps st
           SET status = 'started', attempts = st.attempts + 1, started_at = now(),
               lease_owner = :owner, lease_expires_at = now() + make_interval(secs => :ttl)
          FROM durable_workflows w
         WHERE st.workflow_id = :wid AND st.seq = :seq AND st.status = 'scheduled'
           AND w.id = st.workflow_id AND w.status = 'running'
        RETURNING st.workflow_id, st.seq, st.name, st.args, st.kwargs, st.options, st.attempts
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT workflow_id, seq, 'step started',
               jsonb_build_object('attempt', attempts, 'worker', CAST(:owner AS text))
          FROM s
    )
    SELECT * FROM s
    """
)


def claim_step(conn: Connection, wid: str, seq: int, owner: str, ttl: float) -> ClaimedStep | None:
    """Take a scheduled step for ``owner``; None when it is not (or no longer) scheduled."""
    row = conn.execute(_CLAIM, {"wid": wid, "seq": seq, "owner": owner, "ttl": ttl}).first()
    if row is None:
        return None
    return ClaimedStep(
        workflow_id=row.workflow_id,
        seq=row.seq,
        name=row.name,
        args=list(row.args or []),
        kwargs=dict(row.kwargs or {}),
        options=dict(row.options or {}),
        attempt=row.attempts,
    )


# A step's end and the workflow's wake-up are one statement: nothing can commit the result
# without also recording that the workflow has something new to replay.
_SETTLE = text(
    """
    WITH s AS (
        UPDATE durable_steps
           SET status = :status, result = CAST(:result AS jsonb), error = :error,
               completed_at = now(), lease_owner = NULL, lease_expires_at = NULL
         WHERE workflow_id = :wid AND seq = :seq AND status = 'started'
        RETURNING workflow_id, seq, attempts
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT workflow_id, seq, :event,
               jsonb_build_object('attempt', attempts, 'error', CAST(:error AS text)) FROM s
    ), w AS (
        UPDATE durable_workflows SET wake_seq = wake_seq + 1, woken_at = now()
         WHERE id = :wid AND status = 'running' AND EXISTS (SELECT 1 FROM s)
    )
    SELECT count(*) FROM s
    """
)


def complete_step(conn: Connection, wid: str, seq: int, result: str) -> bool:
    """Commit a step's result (JSON text) and wake its workflow; False if already settled."""
    params = {
        "wid": wid,
        "seq": seq,
        "status": "completed",
        "result": result,
        "error": None,
        "event": "step completed",
    }
    return bool(conn.execute(_SETTLE, params).scalar_one())


def fail_step(conn: Connection, wid: str, seq: int, error: str) -> bool:
    """Record that a step failed for good and wake its workflow; False if already settled."""
    params = {
        "wid": wid,
        "seq": seq,
        "status": "failed",
        "result": None,
        "error": error,
        "event": "step failed",
    }
    return bool(conn.execute(_SETTLE, params).scalar_one())


_RETRY = text(
    """
    WITH s AS (
        UPDATE durable_steps
           SET status = 'waiting', error = :error, lease_owner = NULL, lease_expires_at = NULL
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
    )
    SELECT id, fire_at FROM t
    """
)


def schedule_retry(
    conn: Connection, wid: str, seq: int, error: str, delay: float, from_status: str = "started"
) -> tuple[int, float] | None:
    """Park a failed step behind a retry timer; returns (timer id, fire time as epoch)."""
    params = {"wid": wid, "seq": seq, "error": error, "delay": delay, "from_status": from_status}
    row = conn.execute(_RETRY, params).first()
    return (int(row.id), row.fire_at.timestamp()) if row else None


_LOCAL = text(
    """
    WITH s AS (
        INSERT INTO durable_steps (workflow_id, seq, kind, name, status, attempts, result, error,
                                   started_at, completed_at)
        VALUES (:wid, :seq, 'local', :name, :status, :attempts, CAST(:result AS jsonb), :error,
                now(), now())
        ON CONFLICT (workflow_id, seq) DO UPDATE
           SET status = EXCLUDED.status, attempts = EXCLUDED.attempts, result = EXCLUDED.result,
               error = EXCLUDED.error, completed_at = EXCLUDED.completed_at
         WHERE durable_steps.status = 'ready'
        RETURNING workflow_id, seq, completed_at
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT workflow_id, seq, :event,
               jsonb_build_object('local', true, 'attempt', CAST(:attempts AS int),
                                  'error', CAST(:error AS text))
          FROM s
    )
    SELECT completed_at FROM s
    """
)


def record_local(
    conn: Connection,
    wid: str,
    seq: int,
    name: str,
    attempts: int,
    result: str | None,
    error: str | None,
    status: str,
) -> Any:
    """Record a local step's outcome (completed, failed or waiting); its commit time or None."""
    event = {"completed": "step completed", "failed": "step failed"}.get(status, "step attempt")
    params = {
        "wid": wid,
        "seq": seq,
        "name": name,
        "attempts": attempts,
        "result": result,
        "error": error,
        "status": status,
        "event": event,
    }
    return conn.execute(_LOCAL, params).scalar()


_SLEEP = text(
    """
    WITH s AS (
        INSERT INTO durable_steps (workflow_id, seq, kind, name, status, options)
        VALUES (:wid, :seq, 'sleep', 'sleep', 'waiting',
                jsonb_build_object('seconds', CAST(:seconds AS float8)))
        ON CONFLICT (workflow_id, seq) DO NOTHING
        RETURNING workflow_id, seq
    ), t AS (
        INSERT INTO durable_timers (workflow_id, seq, purpose, fire_at)
        SELECT workflow_id, seq, 'sleep', now() + make_interval(secs => :seconds) FROM s
        RETURNING id, fire_at
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT :wid, :seq, 'timer set',
               jsonb_build_object('timer', t.id, 'fire_at', t.fire_at, 'purpose', 'sleep')
          FROM t
    )
    SELECT id, fire_at FROM t
    """
)


def record_sleep(conn: Connection, wid: str, seq: int, seconds: float) -> tuple[int, float] | None:
    """Record a sleep and its timer; returns (timer id, fire time as epoch)."""
    row = conn.execute(_SLEEP, {"wid": wid, "seq": seq, "seconds": seconds}).first()
    return (int(row.id), row.fire_at.timestamp()) if row else None


def list_steps(conn: Connection, wid: str) -> list[Row[Any]]:
    """Every step of a run, in order."""
    return list(conn.execute(select(steps).where(steps.c.workflow_id == wid).order_by(steps.c.seq)))
