"""A run and its child workflows: starting a child, cancelling a tree, what is in flight in it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from durable.store.statement import statement

# Cancelling a run cancels its descendants too (child workflows): each gets the flag and a
# wake-up; replay delivers WorkflowCancelled at the first position that has not settled.
# A cancel lifts a pause (history: 'unpaused', by 'cancel'), so that the cancellation can be
# delivered and the workflow's compensation run; cancelling a paused run that was already
# asked to stop lifts its pause the same way.
_CANCEL = statement(
    """
    WITH RECURSIVE tree AS (
        SELECT id, paused FROM durable_workflows WHERE id = :id AND status = 'running'
        UNION
        SELECT c.id, c.paused FROM durable_workflows c JOIN tree ON c.parent_id = tree.id
         WHERE c.status = 'running'
    ), w AS (
        UPDATE durable_workflows
           SET cancel_requested = true, paused = false, wake_seq = wake_seq + 1,
               woken_at = now()
         WHERE id IN (SELECT id FROM tree) AND (NOT cancel_requested OR paused)
        RETURNING id, name
    ), h AS (
        INSERT INTO durable_history (workflow_id, event, detail)
        SELECT id, 'cancel requested', jsonb_build_object('by', CAST(:id AS text)) FROM w
    ), hp AS (
        INSERT INTO durable_history (workflow_id, event, detail)
        SELECT w.id, 'unpaused', jsonb_build_object('by', 'cancel')
          FROM w JOIN tree ON tree.id = w.id WHERE tree.paused
    )
    SELECT id, name FROM w
    """
)


def request_cancel(conn: Connection, workflow_id: str) -> list[tuple[str, str]]:
    """Flag the run and its running descendants as cancelled.

    Returns the runs to activate, as (id, workflow name).
    """
    return [(r.id, r.name) for r in conn.execute(_CANCEL, {"id": workflow_id})]


_DELIVER_CANCEL = statement(
    """
    WITH w AS (
        UPDATE durable_workflows SET cancelled_at_seq = :seq
         WHERE id = :id AND lease_owner = :owner AND cancelled_at_seq IS NULL
        RETURNING id
    ), s AS (
        UPDATE durable_steps SET status = 'cancelled', completed_at = now()
         WHERE workflow_id = :id AND seq = :seq AND EXISTS (SELECT 1 FROM w)
           AND (status IN ('waiting', 'ready')
                OR (kind = 'task' AND status IN ('queued', 'scheduled')))
        RETURNING seq
    ), t AS (
        UPDATE durable_timers SET fired_at = now()
         WHERE workflow_id = :id AND seq = :seq AND fired_at IS NULL
           AND EXISTS (SELECT 1 FROM w)
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event)
        SELECT id, :seq, 'cancelled' FROM w
    )
    SELECT count(*) FROM w
    """
)


def deliver_cancel(conn: Connection, workflow_id: str, owner: str, seq: int) -> bool:
    """Record that cancellation reached the run at position ``seq``.

    A position that has not started (a sleep, a signal wait, a step not yet claimed) is marked
    ``cancelled`` so nothing runs it; a step already running finishes and its result is kept.
    """
    params = {"id": workflow_id, "owner": owner, "seq": seq}
    return bool(conn.execute(_DELIVER_CANCEL, params).scalar_one())


_CHILD = statement(
    """
    WITH c AS (
        INSERT INTO durable_workflows (id, name, status, args, kwargs, parent_id, parent_seq,
                                       cancel_requested, deadline_at, attributes,
                                       trace_context, wake_seq, limit_name, limit_key,
                                       priority, queued)
        SELECT :child, :name, 'running', CAST(:args AS jsonb), CAST(:kwargs AS jsonb), :id,
               :seq, p.cancel_requested,
               now() + make_interval(secs => CAST(:timeout AS float8)),
               CAST(:attributes AS jsonb), p.trace_context,
               CASE WHEN CAST(:limit_name AS text) IS NULL THEN 1 ELSE 0 END, :limit_name,
               :limit_key, :priority, CAST(:limit_name AS text) IS NOT NULL
          FROM durable_workflows p WHERE p.id = :id AND p.lease_owner = :owner
        ON CONFLICT (id) DO NOTHING
        RETURNING id, deadline_at, queued
    ), t AS (
        INSERT INTO durable_timers (workflow_id, seq, purpose, fire_at)
        SELECT id, 0, 'deadline', deadline_at FROM c WHERE deadline_at IS NOT NULL
        RETURNING id, fire_at
    ), taken AS (
        SELECT name, parent_id, parent_seq FROM durable_workflows WHERE id = :child
    ), s AS (
        INSERT INTO durable_steps (workflow_id, seq, kind, name, status, options, started_at)
        SELECT :id, :seq, 'child', :name, 'waiting',
               jsonb_build_object('child', CAST(:child AS text)), now()
          FROM durable_workflows p WHERE p.id = :id AND p.lease_owner = :owner
           AND (EXISTS (SELECT 1 FROM c)
                OR EXISTS (SELECT 1 FROM taken WHERE parent_id = :id AND parent_seq = :seq))
        ON CONFLICT (workflow_id, seq) DO NOTHING
        RETURNING seq
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT :id, :seq, 'child started', jsonb_build_object('child', CAST(:child AS text))
          FROM s
    ), ch AS (
        -- A limited child is 'queued' first; its admission writes 'started'.
        INSERT INTO durable_history (workflow_id, event, detail)
        SELECT id, CASE WHEN queued THEN 'queued' ELSE 'started' END,
               jsonb_build_object('name', CAST(:name AS text), 'parent', CAST(:id AS text))
               || CASE WHEN queued THEN jsonb_build_object(
                      'limit', CAST(:limit_name AS text), 'key', CAST(:limit_key AS text),
                      'priority', CAST(:priority AS int)) ELSE '{}' END
          FROM c
    ), stale AS (
        DELETE FROM durable_history WHERE workflow_id IN (SELECT id FROM c)
    )
    SELECT (SELECT count(*) FROM c) AS created, (SELECT count(*) FROM s) AS recorded,
           (SELECT name FROM taken) AS taken_by, (SELECT parent_id FROM taken) AS parent_id,
           (SELECT parent_seq FROM taken) AS parent_seq,
           (SELECT id FROM t) AS timer_id, (SELECT fire_at FROM t) AS fire_at
    """
)


@dataclass(frozen=True)
class ChildStarted:
    """The outcome of :func:`start_child`."""

    created: bool
    """False when a run with the child's id existed already."""
    ours: bool
    """Whether the run with that id is this parent's child at this position."""
    taken_by: str | None
    """The workflow name of the run that holds the id, when it existed already."""
    timer: tuple[int, float] | None
    """The child's execution-timeout timer, to index."""


def start_child(
    conn: Connection,
    workflow_id: str,
    owner: str,
    seq: int,
    child_id: str,
    name: str,
    args: str,
    kwargs: str,
    timeout: float | None = None,
    attributes: str = "{}",
    limit: tuple[str, str, int] | None = None,
) -> ChildStarted:
    """Create a child run waited for at the parent's position ``seq``.

    ``attributes`` is the child's searchable attributes as a JSON object. ``limit`` (limit
    name, key, priority) writes it queued for a slot (:mod:`durable.store.run_limits`).
    """
    params = {
        "limit_name": None if limit is None else limit[0],
        "limit_key": None if limit is None else limit[1],
        "priority": 0 if limit is None else limit[2],
        "id": workflow_id,
        "owner": owner,
        "seq": seq,
        "child": child_id,
        "name": name,
        "args": args,
        "kwargs": kwargs,
        "timeout": timeout,
        "attributes": attributes,
    }
    row = conn.execute(_CHILD, params).one()
    # The 'taken' CTE sees the snapshot before this statement: a new child reads as absent.
    ours = bool(row.created) or (row.parent_id == workflow_id and row.parent_seq == seq)
    timer = (int(row.timer_id), row.fire_at.timestamp()) if row.timer_id else None
    return ChildStarted(bool(row.created), ours, row.taken_by, timer)


_TREE = """
    WITH RECURSIVE tree AS (
        SELECT id FROM durable_workflows WHERE id = :id
        UNION
        SELECT c.id FROM durable_workflows c JOIN tree ON c.parent_id = tree.id
    )
"""

_IN_FLIGHT = statement(
    _TREE
    + """
    SELECT EXISTS (
               SELECT 1 FROM durable_steps
                WHERE workflow_id IN (SELECT id FROM tree)
                  AND status IN ('queued', 'scheduled', 'started', 'ready'))
        OR EXISTS (
               SELECT 1 FROM durable_workflows
                WHERE id IN (SELECT id FROM tree) AND status = 'running'
                  AND start_at IS NULL AND NOT queued
                  AND (wake_seq > run_seq OR lease_owner IS NOT NULL))
    """
)


def has_work_in_flight(conn: Connection, workflow_id: str) -> bool:
    """Whether the run or a descendant has a step, activation or local retry under way."""
    return bool(conn.execute(_IN_FLIGHT, {"id": workflow_id}).scalar())


_NEXT_TIMER = statement(
    _TREE
    + """
    SELECT min(fire_at) FROM durable_timers
     WHERE workflow_id IN (SELECT id FROM tree) AND fired_at IS NULL
    """
)


def next_timer_of_tree(conn: Connection, workflow_id: str) -> Any:
    """Fire time of the earliest unfired timer of the run or its descendants, or None."""
    return conn.execute(_NEXT_TIMER, {"id": workflow_id}).scalar()
