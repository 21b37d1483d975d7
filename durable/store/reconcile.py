"""Queries of ``durable reconcile``: finders of stuck work, and their repairs.

The finders only read. Each repair is one statement conditional on the state its finder saw
(still scheduled and unclaimed, still owed, still unfired), so a repair racing the beat's
own sweep changes nothing twice.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row

from durable.store.recovery import Dispatch, dispatches_from
from durable.store.statement import statement

# Each finder returns rows of (workflow_id, seq, name, since, info): the stuck item, since when,
# and one more fact for the report. ``:grace`` is how late a dispatch, wake-up or timer may be
# before it counts; a beat would have acted on it by then. A paused run is never stuck: it
# waits for ``durable unpause``, and no finder reports it.
FINDERS = {
    # Committed as scheduled and sent, never claimed: the message was lost (or never sent).
    "step-message-lost": """
        SELECT st.workflow_id, st.seq, st.name, st.dispatched_at AS since,
               st.dispatch_count AS info
          FROM durable_steps st
          JOIN durable_workflows w ON w.id = st.workflow_id AND w.status = 'running'
                                   AND NOT w.paused
         WHERE st.status = 'scheduled' AND st.dispatched_at < now() - make_interval(secs => :grace)
         ORDER BY st.dispatched_at LIMIT :limit
    """,
    # Claimed by a worker that stopped renewing its lease: it died mid-step.
    "step-worker-dead": """
        SELECT st.workflow_id, st.seq, st.name, st.lease_expires_at AS since,
               st.lease_owner AS info
          FROM durable_steps st
          JOIN durable_workflows w ON w.id = st.workflow_id AND w.status = 'running'
                                   AND NOT w.paused
         WHERE st.status = 'started' AND st.lease_expires_at < now()
         ORDER BY st.lease_expires_at LIMIT :limit
    """,
    # Woken (a step settled, a timer fired, a signal came) but no activation replayed it: the
    # message was lost, or the process replaying it died. Not a run before its delayed start,
    # nor one queued for a slot of its limit.
    "workflow-not-resumed": """
        SELECT w.id AS workflow_id, last.seq, coalesce(last.name, w.name) AS name,
               w.woken_at AS since, last.status AS info
          FROM durable_workflows w
          LEFT JOIN LATERAL (
                SELECT s.seq, s.name, s.status FROM durable_steps s
                 WHERE s.workflow_id = w.id AND s.completed_at IS NOT NULL
                 ORDER BY s.completed_at DESC, s.seq DESC LIMIT 1) last ON true
         WHERE w.status = 'running' AND NOT w.paused AND w.wake_seq > w.run_seq
           AND w.start_at IS NULL AND NOT w.queued
           AND w.woken_at < now() - make_interval(secs => :grace)
           AND (w.lease_owner IS NULL OR w.lease_expires_at < now())
         ORDER BY w.woken_at LIMIT :limit
    """,
    # Running, owed nothing, and nothing can move it: no step in flight or waiting, no timer.
    # A run queued for a slot of its limit waits for its admission, not stuck.
    "workflow-idle": """
        SELECT w.id AS workflow_id, NULL::int AS seq, w.name, w.updated_at AS since,
               NULL AS info
          FROM durable_workflows w
         WHERE w.status = 'running' AND NOT w.paused AND w.wake_seq <= w.run_seq
           AND NOT w.queued AND w.updated_at < now() - make_interval(secs => :grace)
           AND (w.lease_owner IS NULL OR w.lease_expires_at < now())
           AND NOT EXISTS (SELECT 1 FROM durable_steps s WHERE s.workflow_id = w.id
                             AND s.status IN ('queued', 'scheduled', 'started', 'waiting',
                                              'ready'))
           AND NOT EXISTS (SELECT 1 FROM durable_timers t WHERE t.workflow_id = w.id
                             AND t.fired_at IS NULL)
         ORDER BY w.updated_at LIMIT :limit
    """,
    # A sleep or a retry back-off whose timer is gone: nothing will ever end the wait.
    "step-waiting-without-timer": """
        SELECT st.workflow_id, st.seq, st.name, st.created_at AS since, st.kind AS info
          FROM durable_steps st
          JOIN durable_workflows w ON w.id = st.workflow_id AND w.status = 'running'
                                   AND NOT w.paused
         WHERE st.status = 'waiting' AND st.kind IN ('sleep', 'task', 'local')
           AND NOT EXISTS (SELECT 1 FROM durable_timers t WHERE t.workflow_id = st.workflow_id
                             AND t.seq = st.seq AND t.fired_at IS NULL)
         ORDER BY st.created_at LIMIT :limit
    """,
    # Due more than the grace ago and not fired: no beat is running, or it cannot keep up.
    "timer-overdue": """
        SELECT t.workflow_id, t.seq, coalesce(st.name, t.purpose) AS name, t.fire_at AS since,
               t.id AS info
          FROM durable_timers t
          JOIN durable_workflows w ON w.id = t.workflow_id AND w.status = 'running'
                                   AND NOT w.paused
          LEFT JOIN durable_steps st ON st.workflow_id = t.workflow_id AND st.seq = t.seq
         WHERE t.fired_at IS NULL AND t.fire_at < now() - make_interval(secs => :grace)
         ORDER BY t.fire_at LIMIT :limit
    """,
}

# Unfired timers not yet overdue, soonest first, that should be in the Redis index by now (a
# timer is indexed just after its commit, hence the two seconds).
_INDEX_CANDIDATES = statement(
    """
    SELECT t.workflow_id, t.seq, coalesce(st.name, t.purpose) AS name, t.fire_at AS since,
           t.id AS info
      FROM durable_timers t
      JOIN durable_workflows w ON w.id = t.workflow_id AND w.status = 'running'
                                   AND NOT w.paused
      LEFT JOIN durable_steps st ON st.workflow_id = t.workflow_id AND st.seq = t.seq
     WHERE t.fired_at IS NULL AND t.fire_at >= now() - make_interval(secs => :grace)
       AND t.created_at < now() - interval '2 seconds'
     ORDER BY t.fire_at LIMIT :limit
    """
)


def find_stuck(conn: Connection, finding: str, grace: float, limit: int) -> list[Row[Any]]:
    """Rows of one kind of stuck item (a key of :data:`FINDERS`), oldest first."""
    return list(conn.execute(statement(FINDERS[finding]), {"grace": grace, "limit": limit}))


def timers_to_index(conn: Connection, grace: float, limit: int) -> list[Row[Any]]:
    """Unfired, not overdue timers that should be in the Redis index, soonest first."""
    return list(conn.execute(_INDEX_CANDIDATES, {"grace": grace, "limit": limit}))


# -- reconciliation: repairs -------------------------------------------------------------------

_KEYS = "unnest(CAST(:wids AS text[]), CAST(:seqs AS int[])) AS k(wid, seq)"

_RESEND_SCHEDULED = statement(
    f"""
    UPDATE durable_steps st
       SET dispatched_at = now(), dispatch_count = st.dispatch_count + 1
      FROM {_KEYS}
     WHERE st.workflow_id = k.wid AND st.seq = k.seq AND st.status = 'scheduled'
       AND st.dispatched_at < now() - make_interval(secs => :grace)
    RETURNING st.workflow_id, st.seq, st.name, st.options
    """
)

_RESCHEDULE_EXPIRED = statement(
    f"""
    WITH s AS (
        UPDATE durable_steps st
           SET status = 'scheduled', lease_owner = NULL, lease_expires_at = NULL,
               dispatched_at = now(), dispatch_count = st.dispatch_count + 1
          FROM {_KEYS}
         WHERE st.workflow_id = k.wid AND st.seq = k.seq AND st.status = 'started'
           AND st.lease_expires_at < now()
        RETURNING st.workflow_id, st.seq, st.name, st.options
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT workflow_id, seq, 'step lease expired', jsonb_build_object('by', 'reconcile')
          FROM s
    )
    SELECT * FROM s
    """
)

_TOUCH_OWED = statement(
    """
    UPDATE durable_workflows SET woken_at = now()
     WHERE id = ANY(CAST(:ids AS text[])) AND status = 'running' AND NOT paused
       AND wake_seq > run_seq AND start_at IS NULL AND NOT queued
       AND woken_at < now() - make_interval(secs => :grace)
       AND (lease_owner IS NULL OR lease_expires_at < now())
    RETURNING id, name
    """
)

_WAKE_IDLE = statement(
    """
    WITH w AS (
        UPDATE durable_workflows w SET wake_seq = wake_seq + 1, woken_at = now()
         WHERE w.id = ANY(CAST(:ids AS text[])) AND w.status = 'running' AND NOT w.paused
           AND w.wake_seq <= w.run_seq AND (w.lease_owner IS NULL OR w.lease_expires_at < now())
           AND NOT EXISTS (SELECT 1 FROM durable_steps s WHERE s.workflow_id = w.id
                             AND s.status IN ('queued', 'scheduled', 'started', 'waiting',
                                              'ready'))
           AND NOT EXISTS (SELECT 1 FROM durable_timers t WHERE t.workflow_id = w.id
                             AND t.fired_at IS NULL)
        RETURNING w.id, w.name
    ), h AS (
        INSERT INTO durable_history (workflow_id, event, detail)
        SELECT id, 'resumed', jsonb_build_object('by', 'reconcile') FROM w
    )
    SELECT * FROM w
    """
)

# A sleep's timer is set back to its original end (or now, if that has passed); a retry's
# back-off to now.
_RESTORE_TIMERS = statement(
    f"""
    WITH t AS (
        INSERT INTO durable_timers (workflow_id, seq, purpose, fire_at)
        SELECT st.workflow_id, st.seq,
               CASE WHEN st.kind = 'sleep' THEN 'sleep' ELSE 'retry' END,
               CASE WHEN st.kind = 'sleep'
                    THEN greatest(now(), st.created_at + make_interval(
                            secs => coalesce(CAST(st.options ->> 'seconds' AS float8), 0)))
                    ELSE now() END
          FROM durable_steps st JOIN {_KEYS} ON st.workflow_id = k.wid AND st.seq = k.seq
          JOIN durable_workflows w ON w.id = st.workflow_id AND w.status = 'running'
                                   AND NOT w.paused
         WHERE st.status = 'waiting' AND st.kind IN ('sleep', 'task', 'local')
           AND NOT EXISTS (SELECT 1 FROM durable_timers o WHERE o.workflow_id = st.workflow_id
                             AND o.seq = st.seq AND o.fired_at IS NULL)
        RETURNING id, workflow_id, seq, purpose, fire_at
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT workflow_id, seq, 'timer set',
               jsonb_build_object('timer', id, 'fire_at', fire_at, 'purpose', purpose,
                                  'by', 'reconcile')
          FROM t
    )
    SELECT workflow_id, seq, id, CAST(extract(epoch FROM fire_at) AS float8) AS fire_at FROM t
    """
)


def _keys(keys: list[tuple[str, int]]) -> dict[str, list[Any]]:
    return {"wids": [k[0] for k in keys], "seqs": [k[1] for k in keys]}


def resend_scheduled(conn: Connection, keys: list[tuple[str, int]], grace: float) -> list[Dispatch]:
    """Mark these scheduled steps, still unclaimed after ``grace``, as re-sent."""
    return dispatches_from(conn.execute(_RESEND_SCHEDULED, {**_keys(keys), "grace": grace}))


def reschedule_expired(conn: Connection, keys: list[tuple[str, int]]) -> list[Dispatch]:
    """Put these started steps whose lease expired back to scheduled, marked re-sent."""
    return dispatches_from(conn.execute(_RESCHEDULE_EXPIRED, _keys(keys)))


def touch_owed(conn: Connection, ids: list[str], grace: float) -> list[Row[Any]]:
    """Mark these runs, still owed an activation after ``grace``, as re-sent (id, name)."""
    return list(conn.execute(_TOUCH_OWED, {"ids": ids, "grace": grace}))


def wake_idle(conn: Connection, ids: list[str]) -> list[Row[Any]]:
    """Wake these runs if they are still idle, so an activation replays them (id, name)."""
    return list(conn.execute(_WAKE_IDLE, {"ids": ids}))


def restore_timers(conn: Connection, keys: list[tuple[str, int]]) -> list[Row[Any]]:
    """Give these waiting steps a new timer: (workflow_id, seq, id, fire_at as epoch) rows."""
    return list(conn.execute(_RESTORE_TIMERS, _keys(keys)))
