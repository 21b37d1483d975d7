"""Queries on schedules: their definitions, the fire gate, and what the Redis index is built from.

``durable_schedules.next_fire_at`` is the truth of each schedule's next fire. The beat's leader
fires a schedule inside one transaction that first locks its row (:func:`lock_schedule`) and
ends by moving ``next_fire_at`` on (:func:`advance`): two beats that both believe they lead
take turns on the row, and the second finds the fire already done.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Row

from durable.store.statement import statement

# The columns every read returns: the schedule, the status of the run its last fire started,
# and PostgreSQL's clock, which decides what is due.
_SELECT = """
    SELECT s.*, w.status AS last_status, now() AS now
      FROM durable_schedules s
      LEFT JOIN durable_workflows w ON w.id = s.last_run_id
"""


@dataclass(frozen=True)
class Definition:
    """What a schedule starts and when; everything :func:`upsert_schedule` writes."""

    name: str
    workflow: str
    args: list[Any]
    kwargs: dict[str, Any]
    cron: str | None
    every: timedelta | None
    timezone: str
    catchup: str
    overlap: str
    origin: str


# Writes the definition only when it differs from the stored one, so that an import repeated
# at every beat start (same definition) keeps the schedule's next fire and its paused state.
# xmax = 0 tells a fresh insert from an update.
_UPSERT = statement(
    """
    INSERT INTO durable_schedules AS s
           (name, workflow, args, kwargs, cron, every, timezone, catchup, overlap, origin,
            next_fire_at)
    VALUES (:name, :workflow, CAST(:args AS jsonb), CAST(:kwargs AS jsonb), :cron,
            CAST(:every AS interval), :timezone, :catchup, :overlap, :origin, :next_fire_at)
    ON CONFLICT (name) DO UPDATE
       SET workflow = EXCLUDED.workflow, args = EXCLUDED.args, kwargs = EXCLUDED.kwargs,
           cron = EXCLUDED.cron, every = EXCLUDED.every, timezone = EXCLUDED.timezone,
           catchup = EXCLUDED.catchup, overlap = EXCLUDED.overlap, origin = EXCLUDED.origin,
           next_fire_at = EXCLUDED.next_fire_at, updated_at = now()
     WHERE (s.workflow, s.args, s.kwargs, s.cron, s.every, s.timezone, s.catchup, s.overlap,
            s.origin)
           IS DISTINCT FROM
           (EXCLUDED.workflow, EXCLUDED.args, EXCLUDED.kwargs, EXCLUDED.cron, EXCLUDED.every,
            EXCLUDED.timezone, EXCLUDED.catchup, EXCLUDED.overlap, EXCLUDED.origin)
    RETURNING xmax = 0 AS inserted, paused
    """
)


def upsert_schedule(
    conn: Connection, definition: Definition, next_fire_at: datetime | None
) -> tuple[str, bool]:
    """Create or redefine a schedule.

    Returns:
        ``added``, ``updated`` or ``unchanged`` (an identical definition, left as it was:
        its next fire is kept), and whether the schedule is paused.
    """
    params = {
        **asdict(definition),
        "args": json.dumps(definition.args),
        "kwargs": json.dumps(definition.kwargs),
        "next_fire_at": next_fire_at,
    }
    row = conn.execute(_UPSERT, params).first()
    if row is None:
        paused = conn.execute(
            statement("SELECT paused FROM durable_schedules WHERE name = :name"),
            {"name": definition.name},
        ).scalar_one()
        return "unchanged", bool(paused)
    return ("added" if row.inserted else "updated"), bool(row.paused)


def get_schedule(conn: Connection, name: str) -> Row[Any] | None:
    """The schedule with its last run's status (``last_status``) and ``now``, or None."""
    return conn.execute(statement(_SELECT + " WHERE s.name = :name"), {"name": name}).first()


def list_schedules(conn: Connection) -> list[Row[Any]]:
    """Every schedule by name, each with its last run's status and ``now``."""
    return list(conn.execute(statement(_SELECT + " ORDER BY s.name")))


_LOCK = statement(_SELECT + " WHERE s.name = :name FOR UPDATE OF s")


def lock_schedule(conn: Connection, name: str) -> Row[Any] | None:
    """Lock the schedule's row until the transaction ends and read it, or None.

    Call inside a transaction; the fire decided under this lock is written by
    :func:`advance` before the transaction commits.
    """
    return conn.execute(_LOCK, {"name": name}).first()


_ADVANCE = statement(
    """
    UPDATE durable_schedules
       SET next_fire_at = :next_fire_at,
           last_fire_at = coalesce(:last_fire_at, last_fire_at),
           last_run_id = coalesce(:last_run_id, last_run_id),
           updated_at = now()
     WHERE name = :name
    """
)


def advance(
    conn: Connection,
    name: str,
    next_fire_at: datetime | None,
    last_fire_at: datetime | None = None,
    last_run_id: str | None = None,
) -> bool:
    """Move the schedule to its next fire, recording the run its last fire started (if any)."""
    params = {
        "name": name,
        "next_fire_at": next_fire_at,
        "last_fire_at": last_fire_at,
        "last_run_id": last_run_id,
    }
    return conn.execute(_ADVANCE, params).rowcount == 1


_PAUSE = statement(
    """
    UPDATE durable_schedules SET paused = true, updated_at = now()
     WHERE name = :name RETURNING next_fire_at
    """
)

_RESUME = statement(
    """
    UPDATE durable_schedules SET paused = false, next_fire_at = :next_fire_at, updated_at = now()
     WHERE name = :name RETURNING next_fire_at
    """
)


_RECORD = statement(
    """
    UPDATE durable_schedules SET last_fire_at = :fire_at, last_run_id = :run_id, updated_at = now()
     WHERE name = :name
    """
)


def record_run(conn: Connection, name: str, fire_at: datetime, run_id: str) -> bool:
    """Note a run started outside the schedule's own fires (``trigger``) as its last run."""
    params = {"name": name, "fire_at": fire_at, "run_id": run_id}
    return conn.execute(_RECORD, params).rowcount == 1


def pause(conn: Connection, name: str) -> bool:
    """Stop firing the schedule; False when there is none of that name."""
    return conn.execute(_PAUSE, {"name": name}).first() is not None


def resume(conn: Connection, name: str, next_fire_at: datetime | None) -> bool:
    """Fire the schedule again from ``next_fire_at`` on; False when there is none."""
    params = {"name": name, "next_fire_at": next_fire_at}
    return conn.execute(_RESUME, params).first() is not None


def delete_schedule(conn: Connection, name: str) -> bool:
    """Remove the schedule; False when there is none of that name."""
    result = conn.execute(
        statement("DELETE FROM durable_schedules WHERE name = :name"), {"name": name}
    )
    return result.rowcount == 1


_PRUNE = statement(
    """
    DELETE FROM durable_schedules
     WHERE origin = :origin AND NOT (name = ANY(CAST(:keep AS text[])))
    RETURNING name
    """
)


def prune(conn: Connection, origin: str, keep: list[str]) -> list[str]:
    """Delete the schedules of ``origin`` whose names are not in ``keep``; return their names."""
    return [r.name for r in conn.execute(_PRUNE, {"origin": origin, "keep": keep})]


_DUE = statement(
    """
    SELECT name FROM durable_schedules
     WHERE NOT paused AND next_fire_at <= now()
     ORDER BY next_fire_at LIMIT :limit
    """
)


def due_schedules(conn: Connection, limit: int = 100) -> list[str]:
    """Names of unpaused schedules whose next fire is due by PostgreSQL's clock."""
    return [r.name for r in conn.execute(_DUE, {"limit": limit})]


_PENDING = statement(
    "SELECT name, next_fire_at FROM durable_schedules WHERE NOT paused AND next_fire_at IS NOT NULL"
)


def pending_schedules(conn: Connection) -> list[tuple[str, float]]:
    """Every unpaused schedule as (name, next fire as epoch): the source of an index rebuild."""
    return [(r.name, r.next_fire_at.timestamp()) for r in conn.execute(_PENDING)]


def now(conn: Connection) -> datetime:
    """PostgreSQL's clock, which decides what is due."""
    value: datetime = conn.execute(statement("SELECT now()")).scalar_one()
    return value
