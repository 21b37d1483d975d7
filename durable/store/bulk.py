"""Queries of the bulk forms of cancel, retry, resume, purge, pause and unpause.

A bulk operation selects runs with the filters of ``durable list``
(:func:`durable.store.admin.run_conditions`) and the condition its action needs (a run to
cancel is running and not yet asked to stop, a run to retry has failed, ...), walks them in
id order a batch at a time, and in each batch's transaction locks the ids that still match:
a run that changed meanwhile is not returned, and the caller counts it as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from durable.attributes import AttributeFilter
from durable.store.admin import attribute_conditions, run_conditions
from durable.store.statement import statement

FINISHED = "w.status IN ('completed', 'failed', 'cancelled')"

# What a run must be for each action to apply to it; the single-run statements test the same.
ELIGIBLE = {
    "cancel": "w.status = 'running' AND NOT w.cancel_requested",
    "resume": "w.status = 'running'",
    "retry": "w.status = 'failed'",
    "purge": FINISHED,
    "pause": "w.status = 'running' AND NOT w.paused",
    "unpause": "w.status = 'running' AND w.paused",
}


@dataclass(frozen=True)
class Criteria:
    """Which runs a bulk action selects: ``durable list``'s filters, and purge's age."""

    status: str | None = None
    name: str | None = None
    since: datetime | None = None
    waiting: str | None = None
    older_than: float | None = None
    """Seconds since the run finished (only finished runs match)."""
    paused: bool = False
    """Only paused runs."""
    attributes: tuple[AttributeFilter, ...] = ()
    """Filters on the run's attributes, as ``durable list --attr`` takes them."""


def _where(action: str, criteria: Criteria) -> tuple[str, dict[str, Any]]:
    c = criteria
    where = run_conditions(
        status=c.status, name=c.name, since=c.since, waiting=c.waiting, paused=c.paused
    )
    on_attributes, attribute_params = attribute_conditions(c.attributes)
    where += on_attributes
    where.append(ELIGIBLE[action])
    if c.older_than is not None:
        where.append(f"{FINISHED} AND w.finished_at < now() - make_interval(secs => :older)")
    params = {"status": c.status, "name": c.name, "since": c.since, "older": c.older_than}
    return " AND ".join(f"({w})" for w in where), {**params, **attribute_params}


def count_matching(conn: Connection, action: str, criteria: Criteria) -> int:
    """How many runs ``action`` would apply to now."""
    where, params = _where(action, criteria)
    query = statement(f"SELECT count(*) FROM durable_workflows w WHERE {where}")
    return int(conn.execute(query, params).scalar_one())


def select_matching(
    conn: Connection, action: str, criteria: Criteria, after: str | None, limit: int
) -> list[str]:
    """The ids of the next ``limit`` matching runs after id ``after``, in id order."""
    where, params = _where(action, criteria)
    if after is not None:
        where += " AND w.id > :after"
    query = statement(
        f"SELECT w.id FROM durable_workflows w WHERE {where} ORDER BY w.id LIMIT :limit"
    )
    return list(conn.execute(query, {**params, "after": after, "limit": limit}).scalars())


def lock_matching(conn: Connection, action: str, criteria: Criteria, ids: list[str]) -> list[str]:
    """Lock, until the caller's transaction ends, those of ``ids`` that still match."""
    where, params = _where(action, criteria)
    query = statement(
        f"""SELECT w.id FROM durable_workflows w WHERE w.id = ANY(:ids) AND {where}
             ORDER BY w.id FOR UPDATE OF w"""
    )
    return list(conn.execute(query, {**params, "ids": ids}).scalars())


# The runs and their history (which has no foreign key); their steps, timers, signals and
# events go by the foreign keys' cascade, as in :data:`durable.store.admin._PURGE`.
_PURGE_IDS = statement(
    """
    WITH d AS (
        DELETE FROM durable_workflows WHERE id = ANY(:ids) RETURNING id
    ), h AS (
        DELETE FROM durable_history WHERE workflow_id IN (SELECT id FROM d)
    )
    SELECT count(*) FROM d
    """
)


def purge_ids(conn: Connection, ids: list[str]) -> int:
    """Delete the runs ``ids`` (locked by :func:`lock_matching`); returns how many went."""
    return int(conn.execute(_PURGE_IDS, {"ids": ids}).scalar_one())
