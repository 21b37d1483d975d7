"""Queries on signals (data pushed into a run) and events (state a run publishes)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, select

from durable.store.models import events, signals
from durable.store.notices import EVENT, notify_sql
from durable.store.statement import first_row, one_row, statement

# Kept and woken in one statement: a signal sent while no worker runs at all is in PostgreSQL,
# and the run owes an activation (wake_seq > run_seq) that the recovery sweep will send.
_SEND = statement(
    """
    WITH w AS (
        SELECT id, status, name FROM durable_workflows WHERE id = :wid
    ), sent AS (
        SELECT count(*) AS total,
               count(*) FILTER (WHERE sent_at > now() - interval '1 minute') AS last_minute
          FROM durable_signals WHERE workflow_id = :wid
    ), s AS (
        INSERT INTO durable_signals (workflow_id, name, payload)
        SELECT id, :name, CAST(:payload AS jsonb) FROM w, sent
         WHERE status = 'running' AND sent.total < :max_total
           AND sent.last_minute < :max_per_minute
        RETURNING id
    ), h AS (
        INSERT INTO durable_history (workflow_id, event, detail)
        SELECT :wid, 'signal received',
               jsonb_build_object('name', CAST(:name AS text), 'signal', s.id)
          FROM s
    ), k AS (
        UPDATE durable_workflows SET wake_seq = wake_seq + 1, woken_at = now()
         WHERE id = :wid AND EXISTS (SELECT 1 FROM s)
    )
    SELECT (SELECT status FROM w) AS status, (SELECT name FROM w) AS workflow,
           (SELECT id FROM s) AS signal_id,
           (SELECT total FROM sent) AS total, (SELECT last_minute FROM sent) AS last_minute
    """
)


@dataclass(frozen=True)
class Sent:
    """The outcome of :func:`send_signal`: the run's status (None: no such run)."""

    status: str | None
    signal_id: int | None
    total: int
    """Signals the run had received before this one."""
    last_minute: int
    """Of which in the last minute."""
    workflow: str | None = None
    """The run's workflow name."""


def send_signal(
    conn: Connection,
    wid: str,
    name: str,
    payload: str,
    max_total: int = 10_000,
    max_per_minute: int = 600,
) -> Sent:
    """Store a signal (payload as JSON text) for a running run and wake it.

    Nothing is stored when the run already has ``max_total`` signals, or ``max_per_minute``
    in the last minute (see ``Sent.total`` and ``Sent.last_minute``).
    """
    params = {
        "wid": wid,
        "name": name,
        "payload": payload,
        "max_total": max_total,
        "max_per_minute": max_per_minute,
    }
    row = one_row(conn, _SEND, params)
    total, last_minute = int(row.total or 0), int(row.last_minute or 0)
    return Sent(row.status, row.signal_id, total, last_minute, row.workflow)


# The oldest unconsumed signal of that name is taken by position ``seq`` and the position
# settled, in one statement. Only the run's lease holder calls this, so positions never race;
# the wait's timeout timer does (``durable.store.timers``: 'waiting' -> 'timeout'). A retried
# wait (``lock`` below) therefore locks its position first, still 'waiting', and takes a signal only
# then: a timer that fired meanwhile leaves no row to lock (PostgreSQL re-reads a row changed
# under it), so no signal is consumed by a position that timed out; and a timer that fires
# after the lock waits for this commit and finds the wait 'completed'.
_CONSUME = """
    WITH {lock} sig AS (
        SELECT id, payload FROM durable_signals
         WHERE workflow_id = :wid AND name = :name AND consumed_seq IS NULL {guard}
         ORDER BY id LIMIT 1
           FOR UPDATE
    ), c AS (
        UPDATE durable_signals d SET consumed_seq = :seq, consumed_at = now()
          FROM sig WHERE d.id = sig.id
        RETURNING d.id, d.payload
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT :wid, :seq, 'signal consumed',
               jsonb_build_object('name', CAST(:name AS text), 'signal', c.id)
          FROM c
    ), st AS (
        {write}
    ), t AS (
        INSERT INTO durable_timers (workflow_id, seq, purpose, fire_at)
        SELECT :wid, :seq, 'timeout', greatest(now(), CAST(:base AS timestamptz))
                                      + make_interval(secs => CAST(:timeout AS float8))
          FROM st WHERE :first AND st.completed_at IS NULL AND CAST(:timeout AS float8) IS NOT NULL
        RETURNING id, fire_at
    )
    SELECT (SELECT payload FROM c) AS payload, (SELECT count(*) FROM c) AS consumed,
           (SELECT completed_at FROM st) AS completed_at,
           (SELECT id FROM t) AS timer_id, (SELECT fire_at FROM t) AS fire_at
"""

_BEGIN_WAIT = statement(
    _CONSUME.format(
        lock="",
        guard="",
        write="""
        INSERT INTO durable_steps (workflow_id, seq, kind, name, status, result, started_at,
                                   completed_at, options)
        SELECT :wid, :seq, 'signal', :name,
               CASE WHEN EXISTS (SELECT 1 FROM c) THEN 'completed' ELSE 'waiting' END,
               (SELECT payload FROM c), now(),
               CASE WHEN EXISTS (SELECT 1 FROM c) THEN now() END,
               jsonb_build_object('timeout', CAST(:timeout AS float8))
        ON CONFLICT (workflow_id, seq) DO NOTHING
        RETURNING completed_at""",
    )
)

_RETRY_WAIT = statement(
    _CONSUME.format(
        lock="""w AS (
        SELECT 1 FROM durable_steps
         WHERE workflow_id = :wid AND seq = :seq AND status = 'waiting'
           FOR UPDATE
    ),""",
        guard="AND EXISTS (SELECT 1 FROM w)",
        write="""
        UPDATE durable_steps SET status = 'completed', result = (SELECT payload FROM c),
               completed_at = now()
         WHERE workflow_id = :wid AND seq = :seq AND status = 'waiting'
           AND EXISTS (SELECT 1 FROM c)
        RETURNING completed_at""",
    )
)


@dataclass(frozen=True)
class Consumed:
    """A signal taken by a wait (``consumed``) with its payload and commit time."""

    consumed: bool
    payload: Any
    completed_at: Any
    timer: tuple[int, float] | None
    """The timeout's timer (id, fire time as epoch), when this call set one."""


def wait_for_signal(
    conn: Connection,
    wid: str,
    seq: int,
    name: str,
    timeout: float | None,
    first: bool,
    base: Any = None,
) -> Consumed:
    """Record (``first``) or retry a wait at ``seq``, consuming a signal if one is there.

    A timeout's timer is due ``timeout`` seconds after the later of now and ``base``.
    """
    statement = _BEGIN_WAIT if first else _RETRY_WAIT
    params = {
        "wid": wid,
        "seq": seq,
        "name": name,
        "timeout": timeout,
        "first": first,
        "base": base,
    }
    row = conn.execute(statement, params).one()
    timer = (int(row.timer_id), row.fire_at.timestamp()) if row.timer_id else None
    return Consumed(bool(row.consumed), row.payload, row.completed_at, timer)


# The NOTIFY wakes ``durable.get_event`` waits on this run at the commit (see
# ``durable.store.notices``).
_SET_EVENT = statement(
    """
    WITH s AS (
        INSERT INTO durable_steps (workflow_id, seq, kind, name, status, result, started_at,
                                   completed_at)
        VALUES (:wid, :seq, 'event', :key, 'completed', CAST(:value AS jsonb), now(), now())
        ON CONFLICT (workflow_id, seq) DO NOTHING
        RETURNING completed_at
    ), e AS (
        INSERT INTO durable_events (workflow_id, key, value, updated_at)
        SELECT :wid, :key, CAST(:value AS jsonb), now() FROM s
        ON CONFLICT (workflow_id, key) DO UPDATE
           SET value = EXCLUDED.value, updated_at = EXCLUDED.updated_at
    ), h AS (
        INSERT INTO durable_history (workflow_id, seq, event, detail)
        SELECT :wid, :seq, 'event set', jsonb_build_object('key', CAST(:key AS text)) FROM s
    ), nt AS (
        SELECT """
    + notify_sql(EVENT, "CAST(:wid AS text)")
    + """ FROM s
    )
    SELECT completed_at, (SELECT count(*) FROM nt) AS notified FROM s
    """
)


def set_event(conn: Connection, wid: str, seq: int, key: str, value: str) -> Any:
    """Publish ``key`` (value as JSON text) at position ``seq``; returns its commit time."""
    row = first_row(conn, _SET_EVENT, {"wid": wid, "seq": seq, "key": key, "value": value})
    return None if row is None else row[0]


def get_event(conn: Connection, wid: str, key: str) -> Row[Any] | None:
    """The event's row (``value``, ``updated_at``), or None when not set."""
    query = select(events).where(events.c.workflow_id == wid, events.c.key == key)
    return conn.execute(query).first()


def list_events(conn: Connection, wid: str) -> dict[str, Any]:
    """Every event of a run as a dict."""
    query = select(events.c.key, events.c.value).where(events.c.workflow_id == wid)
    return {r.key: r.value for r in conn.execute(query)}


def list_signals(conn: Connection, wid: str) -> list[Row[Any]]:
    """Every signal of a run, oldest first."""
    query = select(signals).where(signals.c.workflow_id == wid).order_by(signals.c.id)
    return list(conn.execute(query))
