"""The aggregates ``durable beat --metrics-port`` reads on every scrape (see durable.metrics)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, Row

from durable.store.statement import statement

# Read on every scrape of ``durable beat --metrics-port``; each is one aggregate over a table.
# ``width_bucket`` gives, per value, how many of the (sorted) bounds are at or below it, which
# the collector turns into Prometheus's cumulative buckets.
_RUN_COUNTS = statement(
    """
    SELECT name, status, count(*) AS n, count(*) FILTER (WHERE paused) AS paused
      FROM durable_workflows GROUP BY 1, 2
    """
)

_STEP_DURATIONS = statement(
    """
    WITH d AS (
        SELECT name, extract(epoch FROM completed_at - started_at) AS secs
          FROM durable_steps
         WHERE kind = 'task' AND status IN ('completed', 'failed')
           AND started_at IS NOT NULL AND completed_at IS NOT NULL
    )
    SELECT name, width_bucket(secs, CAST(:bounds AS float8[])) AS bucket, count(*) AS n,
           CAST(sum(secs) AS float8) AS total
      FROM d GROUP BY 1, 2
    """
)

_STEP_RETRIES = statement(
    """
    SELECT name, sum(greatest(attempts - 1, 0)) AS n FROM durable_steps
     WHERE kind IN ('task', 'local') GROUP BY 1
    """
)

_TIMER_LATENESS = statement(
    """
    WITH d AS (
        SELECT purpose, extract(epoch FROM fired_at - fire_at) AS secs
          FROM durable_timers WHERE fired_at IS NOT NULL
    )
    SELECT purpose AS name, width_bucket(secs, CAST(:bounds AS float8[])) AS bucket,
           count(*) AS n, CAST(sum(secs) AS float8) AS total
      FROM d GROUP BY 1, 2
    """
)

# Due timers of paused runs are not counted as due: they wait for the unpause, not a beat.
_PENDING_TIMERS = statement(
    """
    SELECT count(*) AS pending,
           count(*) FILTER (WHERE fire_at < now() AND NOT coalesce(
               (SELECT w.paused FROM durable_workflows w WHERE w.id = t.workflow_id), false))
           AS due
      FROM durable_timers t WHERE fired_at IS NULL
    """
)


def run_counts(conn: Connection) -> list[Row[Any]]:
    """How many runs of each workflow are in each status: (name, status, n, paused) rows."""
    return list(conn.execute(_RUN_COUNTS))


def step_durations(conn: Connection, bounds: list[float]) -> list[Row[Any]]:
    """Remote steps' last-attempt durations: (name, bucket, n, total) rows (see above)."""
    return list(conn.execute(_STEP_DURATIONS, {"bounds": bounds}))


def step_retries(conn: Connection) -> list[Row[Any]]:
    """Attempts beyond the first, per step name: (name, n) rows."""
    return list(conn.execute(_STEP_RETRIES))


def timer_lateness(conn: Connection, bounds: list[float]) -> list[Row[Any]]:
    """Fired timers' lateness per purpose: (name, bucket, n, total) rows (see above)."""
    return list(conn.execute(_TIMER_LATENESS, {"bounds": bounds}))


def pending_timers(conn: Connection) -> Row[Any]:
    """How many timers have not fired (``pending``), and how many of those are due.

    A paused run's timers are pending, not due.
    """
    return conn.execute(_PENDING_TIMERS).one()
