"""Queries on workflow runs: start, activation (lease and history in one statement), finish."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Row, select, text

from durable.store.models import workflows

TERMINAL = ("completed", "failed", "cancelled")

_INSERT = text(
    """
    WITH w AS (
        INSERT INTO durable_workflows (id, name, status, args, kwargs)
        VALUES (:id, :name, 'running', CAST(:args AS jsonb), CAST(:kwargs AS jsonb))
        ON CONFLICT (id) DO NOTHING
        RETURNING id
    ), h AS (
        INSERT INTO durable_history (workflow_id, event, detail)
        SELECT id, 'started', jsonb_build_object('name', CAST(:name AS text)) FROM w
    )
    SELECT count(*) FROM w
    """
)


def insert_run(conn: Connection, workflow_id: str, name: str, args: str, kwargs: str) -> bool:
    """Create a run (arguments given as JSON text); False when the id already exists."""
    params = {"id": workflow_id, "name": name, "args": args, "kwargs": kwargs}
    return bool(conn.execute(_INSERT, params).scalar_one())


def get_run(conn: Connection, workflow_id: str) -> Row[Any] | None:
    """The run's row, or None."""
    return conn.execute(select(workflows).where(workflows.c.id == workflow_id)).first()


def list_runs(
    conn: Connection, status: str | None = None, name: str | None = None, limit: int = 50
) -> list[Row[Any]]:
    """Runs, newest first, optionally filtered."""
    query = select(workflows).order_by(workflows.c.created_at.desc()).limit(limit)
    if status:
        query = query.where(workflows.c.status == status)
    if name:
        query = query.where(workflows.c.name == name)
    return list(conn.execute(query))


@dataclass(frozen=True)
class Activation:
    """What replay needs, read under the run's lease in one statement."""

    workflow_id: str
    name: str
    args: list[Any]
    kwargs: dict[str, Any]
    wake_seq: int
    created_at: datetime
    steps: list[dict[str, Any]]


# The lease is taken (free, expired, or already ours) and the whole step history read in one
# statement: replay costs one round trip whatever the number of steps. Step rows are
# aggregated into a single JSON value so the run's arguments are not repeated per row.
# The history of a run as one JSON array (replay's whole read), for a run aliased ``w``.
HISTORY_JSON = """
    (SELECT coalesce(json_agg(json_build_object(
                'seq', s.seq, 'kind', s.kind, 'name', s.name, 'status', s.status,
                'attempts', s.attempts, 'result', s.result, 'error', s.error,
                'completed_at', s.completed_at) ORDER BY s.seq), '[]')
       FROM durable_steps s WHERE s.workflow_id = w.id)
"""

_ACQUIRE = text(
    """
    WITH w AS (
        UPDATE durable_workflows
           SET lease_owner = :owner,
               lease_expires_at = now() + make_interval(secs => :ttl)
         WHERE id = :id AND status = 'running'
           AND (lease_owner IS NULL OR lease_owner = :owner OR lease_expires_at < now())
        RETURNING id, name, args, kwargs, wake_seq, created_at
    )
    SELECT w.id, w.name, w.args, w.kwargs, w.wake_seq, w.created_at, """
    + HISTORY_JSON
    + """ AS steps
      FROM w
    """
)


def acquire(conn: Connection, workflow_id: str, owner: str, ttl: float) -> Activation | None:
    """Take the run's lease and load its history; None if another process holds it."""
    row = conn.execute(_ACQUIRE, {"id": workflow_id, "owner": owner, "ttl": ttl}).first()
    return None if row is None else activation_from_row(row)


def activation_from_row(row: Any) -> Activation:
    """Build an :class:`Activation` from a row with the run's columns and ``steps`` JSON."""
    steps = row.steps if isinstance(row.steps, list) else json.loads(row.steps)
    return Activation(
        workflow_id=row.id,
        name=row.name,
        args=list(row.args or []),
        kwargs=dict(row.kwargs or {}),
        wake_seq=row.wake_seq,
        created_at=row.created_at,
        steps=steps,
    )


_RELEASE = text(
    """
    UPDATE durable_workflows
       SET lease_owner = NULL, lease_expires_at = NULL, run_seq = :wake_seq, updated_at = now()
     WHERE id = :id AND lease_owner = :owner AND wake_seq = :wake_seq
    """
)


def release(conn: Connection, workflow_id: str, owner: str, wake_seq: int) -> bool:
    """Give the lease back; False when the run was woken meanwhile (replay again)."""
    params = {"id": workflow_id, "owner": owner, "wake_seq": wake_seq}
    return conn.execute(_RELEASE, params).rowcount == 1


_FINISH = text(
    """
    WITH w AS (
        UPDATE durable_workflows
           SET status = :status, result = CAST(:result AS jsonb), error = :error,
               finished_at = now(), updated_at = now(), run_seq = wake_seq,
               lease_owner = NULL, lease_expires_at = NULL
         WHERE id = :id AND lease_owner = :owner AND status = 'running'
        RETURNING id
    ), h AS (
        INSERT INTO durable_history (workflow_id, event, detail)
        SELECT id, :status, jsonb_build_object('error', CAST(:error AS text)) FROM w
    )
    SELECT count(*) FROM w
    """
)


def finish(
    conn: Connection,
    workflow_id: str,
    owner: str,
    status: str,
    result: str | None = None,
    error: str | None = None,
) -> bool:
    """End the run as completed or failed (result as JSON text); False if not ours."""
    params = {"id": workflow_id, "owner": owner, "status": status, "result": result, "error": error}
    return bool(conn.execute(_FINISH, params).scalar_one())


_WAKE = text(
    """
    UPDATE durable_workflows SET wake_seq = wake_seq + 1, woken_at = now()
     WHERE id = :id AND status = 'running'
    """
)


def wake(conn: Connection, workflow_id: str) -> bool:
    """Note that the run has something new to replay; False if it is not running."""
    return conn.execute(_WAKE, {"id": workflow_id}).rowcount == 1


_RENEW = text(
    """
    WITH s AS (
        UPDATE durable_steps SET lease_expires_at = now() + make_interval(secs => :ttl)
         WHERE status = 'started' AND starts_with(lease_owner, :prefix)
        RETURNING 1
    ), w AS (
        UPDATE durable_workflows SET lease_expires_at = now() + make_interval(secs => :ttl)
         WHERE lease_owner IS NOT NULL AND starts_with(lease_owner, :prefix)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM s) + (SELECT count(*) FROM w)
    """
)


def renew_leases(conn: Connection, owner: str, ttl: float) -> int:
    """Extend every lease held by a token of process ``owner``; returns how many."""
    return int(conn.execute(_RENEW, {"prefix": f"{owner}#", "ttl": ttl}).scalar_one())
