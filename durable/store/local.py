"""Positions an activation records itself, under its lease: local steps and sleeps."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from durable.store.statement import first_row, statement

# Only under the run's lease (``lease_owner = :owner``): an activation that stalled while the
# local step ran and whose run another activation took over must not record its outcome.
# No row returned: the lease is not ours, or the position was recorded already (by another
# activation whose acquire read the history before this insert); either way the caller stops
# (``durable._control.LeaseLost``).
_LOCAL = statement(
    """
    WITH s AS (
        INSERT INTO durable_steps (workflow_id, seq, kind, name, status, attempts, result, error,
                                   started_at, completed_at)
        SELECT :wid, :seq, 'local', :name, :status, :attempts, CAST(:result AS jsonb), :error,
               now(), now()
         WHERE EXISTS (SELECT 1 FROM durable_workflows WHERE id = :wid AND lease_owner = :owner)
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
    owner: str,
    seq: int,
    name: str,
    attempts: int,
    result: str | None,
    error: str | None,
    status: str,
) -> Any:
    """Record a local step's outcome (completed, failed or waiting) under ``owner``'s lease.

    Returns its commit time, or None if nothing was recorded (see ``_LOCAL``).
    """
    event = {"completed": "step completed", "failed": "step failed"}.get(status, "step attempt")
    params = {
        "wid": wid,
        "owner": owner,
        "seq": seq,
        "name": name,
        "attempts": attempts,
        "result": result,
        "error": error,
        "status": status,
        "event": event,
    }
    row = first_row(conn, _LOCAL, params)
    return None if row is None else row[0]


_SLEEP = statement(
    """
    WITH s AS (
        INSERT INTO durable_steps (workflow_id, seq, kind, name, status, options)
        VALUES (:wid, :seq, 'sleep', 'sleep', 'waiting',
                jsonb_build_object('seconds', CAST(:seconds AS float8)))
        ON CONFLICT (workflow_id, seq) DO NOTHING
        RETURNING workflow_id, seq
    ), t AS (
        INSERT INTO durable_timers (workflow_id, seq, purpose, fire_at)
        SELECT workflow_id, seq, 'sleep',
               greatest(now(), CAST(:base AS timestamptz)) + make_interval(secs => :seconds)
          FROM s
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


def record_sleep(
    conn: Connection, wid: str, seq: int, seconds: float, base: Any = None
) -> tuple[int, float] | None:
    """Record a sleep and its timer; returns (timer id, fire time as epoch).

    The timer is due ``seconds`` after the later of now and ``base`` (the workflow's own
    time, which runs ahead of the clock only when a test skips time).
    """
    params = {"wid": wid, "seq": seq, "seconds": seconds, "base": base}
    row = conn.execute(_SLEEP, params).first()
    return (int(row.id), row.fire_at.timestamp()) if row else None
