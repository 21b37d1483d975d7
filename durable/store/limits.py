"""Queries of concurrency limits: admission, the keys' queues, and the limits table.

A step under a limit is inserted ``queued`` (``durable.store.statement.insert_new_steps``)
with its limit's name, its key and its priority. It holds one of its key's slots from its
admission (``queued`` → ``scheduled``) until it leaves ``scheduled``, ``started`` and
``waiting`` (a retry's back-off keeps the slot), or its run ends. Every slot is thus a step
row that the existing recovery moves on: a SIGKILLed worker's ``started`` step is
re-sent when its lease expires and runs again in the same slot; a run that ends cancels its
unstarted steps; a step of a run that is no longer running holds nothing.

:func:`admit` is the one way into a slot. It runs in a transaction that first takes a
transaction-level advisory lock on (limit, key), so that admissions of one key are serial
across every process; its statement then sees every slot taken or freed before it. Freeing
a slot needs no lock: a release can only make room, and whoever freed it calls
:func:`admit` afterwards (the beat's sweep does too, for a release whose process died).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from durable.store.recovery import Dispatch, dispatches_from
from durable.store.statement import statement

StepKey = tuple[str, int]
"""A step: (workflow id, step number)."""

LimitKey = tuple[str, str, int | None, float | None]
"""A key to admit: (limit name, key, declared concurrency, seconds between starts or None)."""

HOLDING = "('scheduled', 'started', 'waiting')"
"""Statuses of a limited step that hold a slot of its key (while its run is running)."""

_LOCK = statement("SELECT pg_advisory_xact_lock(hashtextextended(:name || chr(31) || :key, 20))")

# The limit's row is written once and again only when the declaration (its concurrency, its
# rate's interval) changes, so
# an admission writes nothing but the steps it admits. Its cap is the operators' override
# when set, else the declaration (the step's, if the row is new); NULL (a rate-only limit):
# no cap. Queued steps are picked by priority (highest first), then in the order they were
# scheduled, as many as the key has free slots.
_PICK = f"""
    WITH ins AS (
        INSERT INTO durable_limits AS l (name, concurrency, rate_interval)
        VALUES (:name, :declared, :interval)
        ON CONFLICT (name) DO UPDATE SET concurrency = excluded.concurrency,
                                         rate_interval = excluded.rate_interval,
                                         updated_at = now()
         WHERE l.concurrency IS DISTINCT FROM excluded.concurrency
            OR l.rate_interval IS DISTINCT FROM excluded.rate_interval
        RETURNING coalesce(concurrency_override, concurrency) AS cap
    ), cap AS (
        SELECT cap FROM ins
        UNION ALL
        SELECT coalesce(concurrency_override, concurrency) FROM durable_limits
         WHERE name = :name AND NOT EXISTS (SELECT 1 FROM ins)
    ), held AS (
        SELECT count(*) AS n FROM durable_steps st
          JOIN durable_workflows w ON w.id = st.workflow_id AND w.status = 'running'
         WHERE st.limit_name = :name AND st.limit_key = :key AND st.status IN {HOLDING}
    ), pick AS (
        -- A paused run's queued step waits: the sweep admits it once the run is unpaused.
        SELECT st.workflow_id, st.seq, st.priority, st.created_at FROM durable_steps st
          JOIN durable_workflows w ON w.id = st.workflow_id AND w.status = 'running'
                                  AND NOT w.paused
         WHERE st.limit_name = :name AND st.limit_key = :key AND st.status = 'queued'
         ORDER BY st.priority DESC, st.created_at, st.workflow_id, st.seq
         LIMIT (SELECT CASE WHEN max(cap.cap) IS NULL THEN NULL
                            ELSE greatest(max(cap.cap) - max(held.n), 0) END
                  FROM cap, held)
           FOR UPDATE OF st SKIP LOCKED
    )"""

_ADMIT = statement(
    _PICK
    + """
    UPDATE durable_steps st
       SET status = 'scheduled', dispatched_at = now(), dispatch_count = st.dispatch_count + 1
      FROM pick WHERE st.workflow_id = pick.workflow_id AND st.seq = pick.seq
    RETURNING st.workflow_id, st.seq, st.name, st.options
    """
)

_CANDIDATES = statement(
    _PICK
    + """
    SELECT workflow_id, seq,
           (SELECT rate_interval_override FROM durable_limits WHERE name = :name) AS override
      FROM pick ORDER BY priority DESC, created_at, workflow_id, seq
    """
)

_MARK = statement(
    """
    UPDATE durable_steps st
       SET status = 'scheduled', dispatched_at = now(), dispatch_count = st.dispatch_count + 1
      FROM jsonb_to_recordset(CAST(:keys AS jsonb)) AS k(wid text, seq int)
     WHERE st.workflow_id = k.wid AND st.seq = k.seq AND st.status = 'queued'
    RETURNING st.workflow_id, st.seq, st.name, st.options
    """
)

# The next start of a rate-limited key is free in :wait seconds: a durable timer on the
# key's first queued step (purpose 'admit'; firing it admits the key again), unless that step
# has one pending already.
_ADMIT_TIMER = statement(
    """
    INSERT INTO durable_timers (workflow_id, seq, purpose, fire_at)
    SELECT :wid, :seq, 'admit', now() + make_interval(secs => :wait)
     WHERE NOT EXISTS (SELECT 1 FROM durable_timers WHERE workflow_id = :wid AND seq = :seq
                          AND purpose = 'admit' AND fired_at IS NULL)
    RETURNING id, extract(epoch FROM fire_at) AS fire_at
    """
)


def lock_key(conn: Connection, name: str, key: str) -> None:
    """Make admissions of (``name``, ``key``) serial until ``conn``'s transaction ends."""
    conn.execute(_LOCK, {"name": name, "key": key})


def admit(
    conn: Connection, name: str, key: str, declared: int | None, interval: float | None = None
) -> list[Dispatch]:
    """Admit the queued steps of (``name``, ``key``) that fit; returns the messages to send.

    ``conn`` must be in a transaction (its advisory lock holds until the commit), and the
    messages sent only after the commit. ``declared``: the concurrency the code declares,
    recorded as the limit's default (None: none, a rate-only limit); ``interval``: its rate's
    seconds between starts, recorded for ``durable limits``.
    """
    lock_key(conn, name, key)
    params = {"name": name, "key": key, "declared": declared, "interval": interval}
    return dispatches_from(conn.execute(_ADMIT, params))


def candidates(
    conn: Connection, name: str, key: str, declared: int | None, interval: float | None
) -> tuple[list[StepKey], float | None]:
    """As :func:`admit` (lock included), but only pick: the steps that fit, in order.

    Also returns the operators' override of the rate's interval (None: none, or nothing
    picked): it wins over ``interval`` for the starts these steps take.
    """
    lock_key(conn, name, key)
    params = {"name": name, "key": key, "declared": declared, "interval": interval}
    rows = conn.execute(_CANDIDATES, params).all()
    override = rows[0].override if rows else None
    return [(r.workflow_id, r.seq) for r in rows], override


def mark_admitted(conn: Connection, picked: list[StepKey]) -> list[Dispatch]:
    """Admit the steps :func:`candidates` picked (those that got a start of their rate)."""
    if not picked:
        return []
    keys = json.dumps([{"wid": wid, "seq": seq} for wid, seq in picked])
    return dispatches_from(conn.execute(_MARK, {"keys": keys}))


def admit_later(conn: Connection, step: StepKey, wait: float) -> tuple[int, float] | None:
    """A timer admitting ``step``'s key again in ``wait`` s: (id, fire time) or None.

    None: the step has one pending already.
    """
    row = conn.execute(_ADMIT_TIMER, {"wid": step[0], "seq": step[1], "wait": wait}).first()
    return None if row is None else (int(row.id), float(row.fire_at))


# Every key with queued steps and a free slot, and the concurrency its newest queued step
# declares: what the beat's sweep admits, for releases whose admission never ran (a process
# killed after its settle committed, a run cancelled or ended) and for raised overrides.
_QUEUED_KEYS = statement(
    f"""
    WITH q AS (
        SELECT DISTINCT ON (limit_name, limit_key) limit_name, limit_key,
               CAST(options -> 'limit' ->> 'concurrency' AS int) AS declared,
               CAST(options -> 'limit' ->> 'interval' AS float8) AS interval
          FROM durable_steps
         WHERE status = 'queued' AND (CAST(:name AS text) IS NULL OR limit_name = :name)
         ORDER BY limit_name, limit_key, created_at DESC
    )
    SELECT q.limit_name, q.limit_key, q.declared, q.interval
      FROM q LEFT JOIN durable_limits l ON l.name = q.limit_name
     WHERE coalesce(l.concurrency_override, q.declared, l.concurrency) IS NULL
        OR (SELECT count(*) FROM durable_steps st
              JOIN durable_workflows w ON w.id = st.workflow_id AND w.status = 'running'
             WHERE st.limit_name = q.limit_name AND st.limit_key = q.limit_key
               AND st.status IN {HOLDING})
           < coalesce(l.concurrency_override, q.declared, l.concurrency)
     LIMIT :limit
    """
)


def queued_keys(conn: Connection, name: str | None = None, limit: int = 1000) -> list[LimitKey]:
    """The keys with queued steps and room, as :data:`LimitKey`.

    A rate-limited key without a concurrency cap is always listed: its bucket decides.
    """
    params = {"name": name, "limit": limit}
    rows = conn.execute(_QUEUED_KEYS, params)
    return [(r.limit_name, r.limit_key, r.declared, r.interval) for r in rows]


# Each override is written only when asked (:set_concurrency, :set_rate); a rate override
# only on a limit that declares a rate (its steps' admissions consult the bucket).
_SET = statement(
    """
    UPDATE durable_limits
       SET concurrency_override = CASE WHEN :set_concurrency THEN CAST(:concurrency AS int)
                                       ELSE concurrency_override END,
           rate_interval_override = CASE WHEN :set_rate THEN CAST(:interval AS float8)
                                         ELSE rate_interval_override END,
           updated_at = now()
     WHERE name = :name
       AND (NOT :set_rate OR CAST(:interval AS float8) IS NULL OR rate_interval IS NOT NULL)
    RETURNING name
    """
)

_DECLARED_RATE = statement("SELECT rate_interval FROM durable_limits WHERE name = :name")


def declared_rate(conn: Connection, name: str) -> tuple[bool, float | None]:
    """(the limit exists, its declared rate's interval or None)."""
    row = conn.execute(_DECLARED_RATE, {"name": name}).first()
    return (row is not None, None if row is None else row.rate_interval)


def set_override(
    conn: Connection,
    name: str,
    concurrency: int | None,
    interval: float | None = None,
    *,
    set_concurrency: bool = True,
    set_rate: bool = False,
) -> bool:
    """Set (or with None clear) a limit's run-time overrides; False if no such limit.

    ``set_concurrency`` / ``set_rate``: which of the two to write (the other is kept).
    ``interval``: the rate override's seconds between starts; refused (False) on a limit
    that declares no rate.
    """
    params = {
        "name": name,
        "concurrency": concurrency,
        "interval": interval,
        "set_concurrency": set_concurrency,
        "set_rate": set_rate,
    }
    return conn.execute(_SET, params).first() is not None


# Slots held and waiters per (limit, key): steps under the limit, and runs of workflows
# declared with it (``durable.store.run_limits``), each kind counted as its admission does.
_IN_USE = f"""
    SELECT st.limit_name, st.limit_key,
           count(*) FILTER (WHERE st.status IN {HOLDING}) AS running,
           count(*) FILTER (WHERE st.status = 'queued') AS queued
      FROM durable_steps st
      JOIN durable_workflows w ON w.id = st.workflow_id AND w.status = 'running'
     WHERE st.limit_name IS NOT NULL
       AND st.status IN ('queued', 'scheduled', 'started', 'waiting')
     GROUP BY st.limit_name, st.limit_key
    UNION ALL
    SELECT limit_name, limit_key, count(*) FILTER (WHERE NOT queued) AS running,
           count(*) FILTER (WHERE queued) AS queued
      FROM durable_workflows
     WHERE limit_name IS NOT NULL AND status = 'running'
     GROUP BY limit_name, limit_key
"""


@dataclass(frozen=True)
class LimitUse:
    """A limit and its use, as ``durable limits`` shows it."""

    name: str
    concurrency: int | None
    """As the code declared it (the latest step admitted under it)."""
    override: int | None
    """Set by ``durable limits set``; wins while set."""
    rate_interval: float | None
    """Seconds between two starts of a key under the declared rate; None: no rate."""
    rate_override: float | None
    """Set by ``durable limits set --rate``: the interval admissions use while set."""
    running: int
    """Slots held (by steps, or by runs of a workflow's limit), over every key."""
    queued: int
    """Steps (or runs) queued, over every key."""
    keys: list[dict[str, Any]]
    """Per key with slots held or waiters: {key, running, queued}, busiest first."""

    @property
    def effective(self) -> int | None:
        """The concurrency admissions use."""
        return self.override if self.override is not None else self.concurrency


_USE = statement(
    f"""
    WITH k AS (
        SELECT limit_name, limit_key, sum(running) AS running, sum(queued) AS queued
          FROM ({_IN_USE}) u
         GROUP BY limit_name, limit_key
    )
    SELECT l.name, l.concurrency, l.concurrency_override, l.rate_interval,
           l.rate_interval_override,
           coalesce((SELECT sum(running) FROM k WHERE k.limit_name = l.name), 0) AS running,
           coalesce((SELECT sum(queued) FROM k WHERE k.limit_name = l.name), 0) AS queued,
           coalesce((SELECT jsonb_agg(jsonb_build_object('key', limit_key, 'running', running,
                                                         'queued', queued)
                                      ORDER BY running + queued DESC, limit_key)
                       FROM (SELECT * FROM k WHERE k.limit_name = l.name
                              ORDER BY running + queued DESC, limit_key
                              LIMIT :keys) top), '[]') AS keys
      FROM durable_limits l
     WHERE CAST(:name AS text) IS NULL OR l.name = :name
     ORDER BY l.name
    """
)


def limit_use(conn: Connection, name: str | None = None, keys: int = 20) -> list[LimitUse]:
    """Every registered limit (or the one named) with its use; at most ``keys`` keys each."""
    rows = conn.execute(_USE, {"name": name, "keys": keys})
    return [
        LimitUse(
            r.name,
            r.concurrency,
            r.concurrency_override,
            r.rate_interval,
            r.rate_interval_override,
            int(r.running),
            int(r.queued),
            list(r.keys),
        )
        for r in rows
    ]


# A run's limited steps, and a queued one's place in its key's queue: 1 + the queued steps
# of its key that admission takes before it (higher priority, or equal and older).
_STEP_LIMITS = statement(
    """
    SELECT q.seq, q.limit_name, q.limit_key, q.priority,
           CASE WHEN q.status = 'queued' THEN
           (SELECT count(*) FROM durable_steps o
              JOIN durable_workflows w ON w.id = o.workflow_id AND w.status = 'running'
             WHERE o.limit_name = q.limit_name AND o.limit_key = q.limit_key
               AND o.status = 'queued'
               AND (o.priority > q.priority
                    OR (o.priority = q.priority
                        AND (o.created_at, o.workflow_id, o.seq)
                            < (q.created_at, q.workflow_id, q.seq)))) + 1 END AS position
      FROM durable_steps q
     WHERE q.workflow_id = :wid AND q.limit_name IS NOT NULL
    """
)


def step_limits(conn: Connection, workflow_id: str) -> dict[int, dict[str, Any]]:
    """Per limited step of a run: {limit, key, priority, position}.

    ``position`` is the step's place in its key's queue (1: admitted next) while it is
    queued, else None.
    """
    return {
        r.seq: {
            "limit": r.limit_name,
            "key": r.limit_key,
            "priority": r.priority,
            "position": None if r.position is None else int(r.position),
        }
        for r in conn.execute(_STEP_LIMITS, {"wid": workflow_id})
    }


# Metrics: queued steps and held slots per limit name (keys are not labels: unbounded).
_COUNTS = statement(
    f"""
    SELECT limit_name, sum(running) AS running, sum(queued) AS queued
      FROM ({_IN_USE}) u
     GROUP BY limit_name
    """
)


def counts_by_limit(conn: Connection) -> dict[str, tuple[int, int]]:
    """{limit name: (slots held, steps or runs queued)} over running runs."""
    return {r.limit_name: (int(r.running), int(r.queued)) for r in conn.execute(_COUNTS)}
