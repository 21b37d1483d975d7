"""Queries of the liveness mechanism: expired leases and messages that never arrived.

A paused run is left alone by every one of them; ``durable unpause`` re-sends what it needs.

Each statement takes rows with ``FOR UPDATE SKIP LOCKED`` so several beats can run them at
once without handing the same row to two of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from durable.store.statement import statement

# A started step whose lease ran out lost its worker (SIGKILL, OOM, host gone): put it back to
# scheduled so it is dispatched again. The old message, if the broker redelivers it later,
# finds the step no longer scheduled (or already completed) and does nothing.
_EXPIRED_STEPS = statement(
    """
    WITH c AS (
        SELECT st.workflow_id, st.seq FROM durable_steps st
          JOIN durable_workflows w ON w.id = st.workflow_id AND w.status = 'running'
                                   AND NOT w.paused
         WHERE st.status = 'started' AND st.lease_expires_at < now()
         ORDER BY st.lease_expires_at LIMIT :limit
           FOR UPDATE OF st SKIP LOCKED
    ), s AS (
        UPDATE durable_steps st
           SET status = 'scheduled', lease_owner = NULL, lease_expires_at = NULL,
               dispatched_at = now(), dispatch_count = st.dispatch_count + 1
          FROM c WHERE st.workflow_id = c.workflow_id AND st.seq = c.seq
        RETURNING st.workflow_id, st.seq, st.name, st.options
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT workflow_id, seq, 'step lease expired', NULL FROM s
    )
    SELECT workflow_id, seq, name, options FROM s
    """
)

# A scheduled step not claimed in time: its message was lost between commit and broker (or
# the broker lost it). Send it again; a duplicate finds the step claimed and does nothing.
_STALE_STEPS = statement(
    """
    WITH c AS (
        SELECT st.workflow_id, st.seq FROM durable_steps st
          JOIN durable_workflows w ON w.id = st.workflow_id AND w.status = 'running'
                                   AND NOT w.paused
         WHERE st.status = 'scheduled'
           AND st.dispatched_at < now() - make_interval(secs => :after)
         ORDER BY st.dispatched_at LIMIT :limit
           FOR UPDATE OF st SKIP LOCKED
    )
    UPDATE durable_steps st
       SET dispatched_at = now(), dispatch_count = st.dispatch_count + 1
      FROM c WHERE st.workflow_id = c.workflow_id AND st.seq = c.seq
    RETURNING st.workflow_id, st.seq, st.name, st.options
    """
)

# A run owed an activation (woken, not replayed since) whose lease is free or expired, and
# whose last wake-up is older than the redispatch delay: the activation message was lost, or
# the process replaying it died. A run waiting for its delayed start or queued for a slot of
# its limit (a signal came) waits on.
_OWED_RUNS = statement(
    """
    WITH c AS (
        SELECT id FROM durable_workflows
         WHERE status = 'running' AND wake_seq > run_seq AND NOT paused AND start_at IS NULL
           AND NOT queued AND woken_at < now() - make_interval(secs => :after)
           AND (lease_owner IS NULL OR lease_expires_at < now())
         ORDER BY woken_at LIMIT :limit
           FOR UPDATE SKIP LOCKED
    )
    UPDATE durable_workflows w SET woken_at = now()
      FROM c WHERE w.id = c.id
    RETURNING w.id, w.name
    """
)


@dataclass(frozen=True)
class Dispatch:
    """A step message to send again."""

    workflow_id: str
    seq: int
    name: str
    options: dict[str, Any]


def dispatches_from(rows: Any) -> list[Dispatch]:
    """The rows (workflow_id, seq, name, options) of steps to send again, as dispatches."""
    return [Dispatch(r.workflow_id, r.seq, r.name, dict(r.options or {})) for r in rows]


def expire_step_leases(conn: Connection, limit: int = 200) -> list[Dispatch]:
    """Reschedule started steps whose lease ran out; returns the messages to send."""
    return dispatches_from(conn.execute(_EXPIRED_STEPS, {"limit": limit}))


def stale_scheduled_steps(conn: Connection, after: float, limit: int = 200) -> list[Dispatch]:
    """Scheduled steps unclaimed for ``after`` seconds, marked re-sent; returns them."""
    return dispatches_from(conn.execute(_STALE_STEPS, {"after": after, "limit": limit}))


def owed_activations(conn: Connection, after: float, limit: int = 200) -> list[tuple[str, str]]:
    """Runs owed an activation for ``after`` seconds with no live lease, marked re-sent.

    As (id, workflow name).
    """
    return [(r.id, r.name) for r in conn.execute(_OWED_RUNS, {"after": after, "limit": limit})]


# A started step past its start-to-close deadline (``ctx.step(..., timeout=...)``): its
# attempt has failed, whether or not its worker is alive. Rows are locked for the caller's
# transaction, which applies the retry policy to each.
_TIMED_OUT = statement(
    """
    SELECT st.workflow_id, st.seq, st.name, st.options, st.attempts FROM durable_steps st
      JOIN durable_workflows w ON w.id = st.workflow_id AND w.status = 'running'
                                   AND NOT w.paused
     WHERE st.status = 'started' AND st.deadline_at < now()
     ORDER BY st.deadline_at LIMIT :limit
       FOR UPDATE OF st SKIP LOCKED
    """
)


@dataclass(frozen=True)
class TimedOut:
    """A started step past its deadline."""

    workflow_id: str
    seq: int
    name: str
    options: dict[str, Any]
    attempts: int


def timed_out_steps(conn: Connection, limit: int = 200) -> list[TimedOut]:
    """Started steps past their deadline, locked until the caller's transaction ends."""
    rows = conn.execute(_TIMED_OUT, {"limit": limit})
    return [TimedOut(r.workflow_id, r.seq, r.name, dict(r.options or {}), r.attempts) for r in rows]
