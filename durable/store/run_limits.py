"""Queries of limited runs: a workflow's runs under a concurrency limit, per key.

A workflow declared with ``@durable.workflow(..., limit=Limit(...))`` writes its runs with
the limit's name, the key its key function gave for the start's arguments, and a priority.
Every such run is written ``queued`` (``runs.insert_run``, ``tree.start_child``): at rest
(``wake_seq = run_seq = 0``), so nothing activates it, the owed-activation sweep passes it by
and ``runs.acquire`` refuses it. :func:`admit` then turns the queued runs that fit into
running ones, highest priority first, then oldest: ``queued`` false, woken (owed its first
activation) and its ``started`` written; the caller sends the activations after the commit.

A run holds a slot of its key from its admission until it ends; slots are counted from the
rows (``status = 'running' AND NOT queued``), never kept as counters, so a SIGKILLed worker
leaks nothing: its run stays running, its lease expires, it runs again in the same slot.

Every admission runs in a transaction that first takes the key's advisory lock (the same as
the steps' admissions, :func:`durable.store.limits.lock_key`), so that the count its
statement reads (a fresh snapshot, taken after the lock) sees every slot taken or freed
before it. A start locks, declares, inserts and admits in one transaction (a run is thus
admitted at once when its key has room and nothing of higher or equal priority waits); a
run's end (``runs.finish``) is followed, in its transaction, by the lock and an admission.
The beat's sweep admits every key with queued runs and room (:func:`queued_keys`): for an
end whose process died before its admission, a raised override, an unpaused run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from durable.store.limits import lock_key
from durable.store.notices import ENDED, notify_sql
from durable.store.runs import RUN_END
from durable.store.statement import statement

RunKey = tuple[str, str]
"""A key of runs to admit: (limit name, key)."""

# Runs of the key that hold a slot: admitted and not ended. ``{name}`` and ``{key}`` are the
# SQL expressions of the limit's name and the key.
_HELD = """(SELECT count(*) FROM durable_workflows h
             WHERE h.limit_name = {name} AND h.limit_key = {key}
               AND h.status = 'running' AND NOT h.queued)"""

# The cap is the operators' override when set, else the declaration; none (a row without a
# concurrency) admits nothing: a workflow's limit always declares one.
_CAP = """coalesce((SELECT coalesce(l.concurrency_override, l.concurrency)
                      FROM durable_limits l WHERE l.name = {name}), 0)"""

# The limit's row is written (or its declaration updated) at each start, as a step's
# admission does; unchanged, it is only read.
_DECLARE = statement(
    """
    INSERT INTO durable_limits AS l (name, concurrency) VALUES (:name, :declared)
    ON CONFLICT (name) DO UPDATE SET concurrency = excluded.concurrency, updated_at = now()
     WHERE l.concurrency IS DISTINCT FROM excluded.concurrency
    """
)

# A paused run's place waits: the sweep admits it once it is unpaused.
_ADMIT = statement(
    """
    WITH pick AS (
        SELECT id FROM durable_workflows
         WHERE limit_name = :name AND limit_key = :key AND queued AND status = 'running'
           AND NOT paused
         ORDER BY priority DESC, created_at, id
         LIMIT greatest("""
    + _CAP.format(name=":name")
    + " - "
    + _HELD.format(name=":name", key=":key")
    + """, 0)
           FOR UPDATE SKIP LOCKED
    ), w AS (
        UPDATE durable_workflows wf
           SET queued = false, wake_seq = wf.wake_seq + 1, woken_at = now(), updated_at = now()
          FROM pick WHERE wf.id = pick.id AND wf.queued
        RETURNING wf.id, wf.name
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT id, NULL, 'started', jsonb_build_object('name', name) FROM w
    )
    SELECT id, name FROM w
    """
)


def declare(conn: Connection, name: str, key: str, concurrency: int) -> None:
    """Lock (``name``, ``key``) for the transaction and record the declared concurrency."""
    lock_key(conn, name, key)
    conn.execute(_DECLARE, {"name": name, "declared": concurrency})


def admit(conn: Connection, name: str, key: str) -> list[tuple[str, str]]:
    """Admit the queued runs of (``name``, ``key``) that fit; returns them as (id, name).

    ``conn`` must be in a transaction; the key's lock is taken here (again, harmlessly, if
    :func:`declare` took it). Send their activations only after the commit.
    """
    lock_key(conn, name, key)
    return [(r.id, r.name) for r in conn.execute(_ADMIT, {"name": name, "key": key})]


# Every key with queued runs (not paused) and a free slot: what the beat's sweep admits.
_QUEUED_KEYS = statement(
    """
    WITH q AS (
        SELECT DISTINCT limit_name, limit_key FROM durable_workflows
         WHERE queued AND status = 'running' AND NOT paused
           AND (CAST(:name AS text) IS NULL OR limit_name = :name)
    )
    SELECT q.limit_name, q.limit_key FROM q
     WHERE """
    + _HELD.format(name="q.limit_name", key="q.limit_key")
    + " < "
    + _CAP.format(name="q.limit_name")
    + """
     LIMIT :limit
    """
)


def queued_keys(conn: Connection, name: str | None = None, limit: int = 1000) -> list[RunKey]:
    """The keys (of limit ``name``, or of every limit) with queued runs and room."""
    rows = conn.execute(_QUEUED_KEYS, {"name": name, "limit": limit})
    return [(r.limit_name, r.limit_key) for r in rows]


# Cancel a queued run: it ends 'cancelled' at once, as no code of it ran and none will; it
# held no slot, so nothing is admitted. A child's end settles its parent's position (RUN_END).
# An admission that took the run first leaves it running: the caller then flags it as
# ``durable.cancel`` always does.
_CANCEL_QUEUED = statement(
    """
    WITH w AS (
        UPDATE durable_workflows
           SET status = 'cancelled', error = 'cancelled', cancel_requested = true,
               queued = false, finished_at = now(), updated_at = now(), run_seq = wake_seq
         WHERE id = :id AND (status = 'running') IS TRUE AND queued
        RETURNING id, parent_id, parent_seq
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT id, NULL, e.event, e.detail FROM w,
               (VALUES ('cancel requested', '{}'::jsonb),
                       ('cancelled', '{"error": "cancelled"}'::jsonb)) AS e(event, detail)
    ), """
    + RUN_END.format(ended="w")
    + """, nt AS (SELECT """
    + notify_sql(ENDED, "id")
    + """ FROM w)
    SELECT (SELECT count(*) FROM w) AS cancelled, (SELECT id FROM pw) AS parent_id,
           (SELECT name FROM pw) AS parent_name, (SELECT count(*) FROM nt) AS notified
    """
)


@dataclass(frozen=True)
class CancelledQueued:
    """The outcome of :func:`cancel_queued`."""

    cancelled: bool
    """The run was queued and is now ``cancelled``."""
    parent: tuple[str, str] | None
    """A parent woken by its end (a child's position settled): (id, workflow name)."""


def cancel_queued(conn: Connection, workflow_id: str) -> CancelledQueued:
    """End a queued run as ``cancelled``; ``cancelled`` False if it is not queued."""
    params = {
        "id": workflow_id,
        "end_status": "cancelled",
        "end_result": None,
        "end_error": "cancelled",
    }
    row = conn.execute(_CANCEL_QUEUED, params).one()
    parent = (row.parent_id, row.parent_name) if row.parent_id else None
    return CancelledQueued(bool(row.cancelled), parent)


# A limited run's limit, and a queued one's place in its key's queue: 1 + the queued runs
# of its key that admission takes before it (higher priority, or equal and older).
_RUN_LIMIT = statement(
    """
    SELECT q.limit_name, q.limit_key, q.priority, q.queued,
           CASE WHEN q.queued THEN
           (SELECT count(*) FROM durable_workflows o
             WHERE o.limit_name = q.limit_name AND o.limit_key = q.limit_key AND o.queued
               AND o.status = 'running'
               AND (o.priority > q.priority
                    OR (o.priority = q.priority
                        AND (o.created_at, o.id) < (q.created_at, q.id)))) + 1 END AS position
      FROM durable_workflows q
     WHERE q.id = :wid AND q.limit_name IS NOT NULL
    """
)


def run_limit(conn: Connection, workflow_id: str) -> dict[str, Any] | None:
    """A limited run's {limit, key, priority, queued, position}; None for any other run.

    ``position`` is its place in its key's queue (1: admitted next) while it is queued, else
    None.
    """
    row = conn.execute(_RUN_LIMIT, {"wid": workflow_id}).first()
    if row is None:
        return None
    return {
        "limit": row.limit_name,
        "key": row.limit_key,
        "priority": row.priority,
        "queued": bool(row.queued),
        "position": None if row.position is None else int(row.position),
    }
