"""Reading a run's history: the rows of ``durable_history`` and what its step rows say.

A remote step's row is its own history. Its ``step scheduled`` (at ``created_at``), the
``step started`` of its current attempt (at ``started_at``, with ``attempts``, ``worker``
and ``unclaimed``) and its ``step completed`` / ``step failed`` (at ``completed_at``, with
``attempts`` and ``error``) are derived from it here, not written as rows by the statements
of the step path: per step that is three rows fewer to write. Everything else is written
to ``durable_history`` as before, including what a step row can no longer say: the start of
an earlier attempt (written by the claim that starts the next one), a retried attempt's end
(``retry scheduled``), a lost lease, and the events of steps that ``durable retry`` deletes.

A derived event is left out where a written row stands for it (same position, event and
attempt): runs recorded before migration 0006 have those rows, as does a step copied from
another run (``step copied``), which keeps only that.

Order: by time, and within one transaction (one ``now()``) as its statement wrote them: a
run's ``started``, a step's start, its end, the steps it scheduled, then the other events.
A derived start sorts no earlier than its step's scheduling, whatever the worker's clock.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row

from durable.store.statement import statement

# ``{steps}`` is a relation of step rows (a table or a CTE), ``{alias}`` its name in the
# subqueries; the written rows of the same run are read from durable_history.
_WRITTEN = """
    SELECT 1 FROM durable_history x
     WHERE x.workflow_id = {alias}.workflow_id AND x.seq = {alias}.seq
       AND (x.event = 'step copied' OR ({match}))"""

DERIVED_EVENTS = (
    """
    SELECT {alias}.workflow_id, {alias}.seq, 'step scheduled' AS event,
           jsonb_build_object('name', {alias}.name) AS detail,
           {alias}.created_at AS at, {alias}.created_at AS sort_at, 3 AS rank
      FROM {steps}
     WHERE {alias}.kind = 'task' AND NOT EXISTS ("""
    + _WRITTEN.replace("{match}", "x.event = 'step scheduled'")
    + """)
    UNION ALL
    SELECT {alias}.workflow_id, {alias}.seq, 'step started',
           jsonb_build_object('attempt', {alias}.attempts, 'worker', {alias}.worker)
           || CASE WHEN {alias}.unclaimed THEN '{{"unclaimed": true}}'::jsonb
                   ELSE '{{}}'::jsonb END,
           {alias}.started_at, greatest({alias}.started_at, {alias}.created_at), 1
      FROM {steps}
     WHERE {alias}.kind = 'task' AND {alias}.worker IS NOT NULL AND {alias}.attempts > 0
       AND {alias}.started_at IS NOT NULL AND NOT EXISTS ("""
    + _WRITTEN.replace(
        "{match}",
        "x.event = 'step started' AND x.detail ->> 'attempt' = CAST({alias}.attempts AS text)",
    )
    + """)
    UNION ALL
    SELECT {alias}.workflow_id, {alias}.seq, 'step ' || {alias}.status,
           jsonb_build_object('attempt', {alias}.attempts, 'error', {alias}.error),
           {alias}.completed_at, {alias}.completed_at, 2
      FROM {steps}
     WHERE {alias}.kind = 'task' AND {alias}.worker IS NOT NULL
       AND {alias}.status IN ('completed', 'failed') AND {alias}.completed_at IS NOT NULL
       AND NOT EXISTS ("""
    + _WRITTEN.replace(
        "{match}",
        "x.event = 'step ' || {alias}.status"
        " AND x.detail ->> 'attempt' = CAST({alias}.attempts AS text)",
    )
    + ")"
)
"""The events the step rows ``{steps}`` (named ``{alias}``) stand for and that no written
row does: columns workflow_id, seq, event, detail, at, sort_at, rank. Formatted with
``steps`` and ``alias``; used here, by ``durable retry`` before it deletes steps, and by the
chaos soak's checks."""


def events_sql(runs: str) -> str:
    """A query of the whole history of the runs whose id satisfies ``runs`` (SQL on ``id``).

    Columns: id (NULL for a derived event), workflow_id, seq, event, detail, at, and pos
    (1, 2, ... in the order below, over all the runs); ordered by run, then in order.
    """
    steps = (
        "(SELECT * FROM durable_steps"
        f" WHERE workflow_id IN (SELECT id FROM durable_workflows {runs})) AS d"
    )
    derived = DERIVED_EVENTS.format(steps=steps, alias="d")
    return f"""
    SELECT id, workflow_id, seq, event, detail, at,
           row_number() OVER (ORDER BY workflow_id, sort_at, rank, id, seq) AS pos FROM (
        SELECT id, workflow_id, seq, event, detail, at, at AS sort_at,
               CASE WHEN seq IS NULL AND event = 'started' THEN 0 ELSE 4 END AS rank
          FROM durable_history
         WHERE workflow_id IN (SELECT id FROM durable_workflows {runs})
        UNION ALL
        SELECT NULL, workflow_id, seq, event, detail, at, sort_at, rank FROM ({derived}) AS e
    ) AS h
    ORDER BY pos
    """


_LIST = statement(events_sql("WHERE id = :wid"))


def list_history(conn: Connection, wid: str) -> list[Row[Any]]:
    """Every history event of a run, oldest first, derived ones included."""
    return list(conn.execute(_LIST, {"wid": wid}))
