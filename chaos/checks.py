"""What the soak checks at the end, each a query on its PostgreSQL with a list of problems.

1. **Every workflow finished**, ``completed``, with the result its input implies.
2. **Each step committed exactly once**: every task or local position of a finished run has
   exactly one ``step completed`` (or, for the step meant to fail, one ``step failed``)
   history event (a written row, or the one a remote step's row stands for, as ``durable
   show`` reads them: ``durable.store.history``); positions run 1..n without gaps, n as the
   workflow's shape implies.
3. **Each side effect applied once**: every committed step with a side effect has exactly
   one ``chaos_effects`` row under its idempotency key, whose token is the step's committed
   result; no effect row belongs to a step that did not commit.
4. **No timer lost or doubled**: every timer has fired (``fired_at``); no timer id has two
   ``timer fired`` rows; every sleep, retry back-off and expired signal wait fired exactly
   once, and no sleep ended before its due time.
5. **No schedule fire doubled or missed**: the runs of the two-second schedule are at
   distinct fire times, consecutive fires two seconds apart (the catch-up policy is ``all``,
   so none may be missing), up to the end of the soak.
6. **Each signal delivered once**: every ``go`` signal taken by exactly one wait.
7. **The limit held**: the reserve steps, under a concurrency limit of two per key, never
   ran more than two at once per key (from their recorded start and end times, which lie
   inside the time each held its slot), and none stayed ``queued``.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg

from chaos.app import (
    ORDER,
    RESERVE_LIMIT,
    RESERVE_SLOTS,
    SCHEDULE,
    TICK,
    TICK_EVERY,
    expected,
)
from durable.store.history import events_sql

SHOWN = 8  # problems printed per check


@dataclass
class Check:
    """One check: its name, what it counted, and what went wrong."""

    name: str
    summary: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing went wrong."""
        return not self.problems


def positions(i: int) -> int:
    """How many positions ``chaos.order(i)`` records."""
    count = 1 + 3 + 1 + 1 + 1 + 1 + 1  # reserve, 3 parts, sleep, charge, go, ship, event
    count += 1 if i % 4 == 0 else 0  # the wait that times out
    count += 2 if i % 5 == 0 else 0  # doomed, refund
    return count


def _rows(conn: psycopg.Connection[Any], sql: str, params: Any = None) -> list[Any]:
    return list(conn.execute(sql, params).fetchall())


def check_workflows(conn: psycopg.Connection[Any], started: dict[str, int]) -> Check:
    check = Check("every workflow finished")
    rows = {
        r[0]: r
        for r in _rows(
            conn,
            "SELECT id, name, status, result, error, wake_seq, run_seq, lease_owner,"
            " (SELECT string_agg(seq || ' ' || kind || ' ' || status, ', ' ORDER BY seq)"
            "  FROM durable_steps s WHERE s.workflow_id = w.id) FROM durable_workflows w",
        )
    }
    ticks = 0
    for wid, i in sorted(started.items(), key=lambda item: item[1]):
        row = rows.get(wid)
        if row is None:
            check.problems.append(f"{wid}: no run")
        elif row[2] == "running":
            owed = "owed an activation" if row[5] > row[6] else "NOT owed an activation"
            check.problems.append(
                f"{wid}: running, {owed} (wake_seq {row[5]}, run_seq {row[6]}), lease"
                f" {row[7] or 'free'}; positions: {row[8] or 'none'}"
            )
        elif row[2] != "completed":
            check.problems.append(f"{wid}: {row[2]} {row[4] or ''}".strip())
        elif (problem := _result_problem(i, row[3])) is not None:
            check.problems.append(f"{wid}: {problem}")
    for wid, row in rows.items():
        if row[1] == TICK:
            ticks += 1
            if row[2] != "completed":
                check.problems.append(f"{wid}: {row[2]} {row[4] or ''}".strip())
    done = sum(1 for wid in started if rows.get(wid) and rows[wid][2] == "completed")
    check.summary = f"{done}/{len(started)} orders completed, {ticks} schedule runs"
    return check


def _result_problem(i: int, result: Any) -> str | None:
    want = expected(i)
    got = dict(result or {})
    values = [str(t).split("#", 1)[0] for t in got.pop("tokens", [])]
    if values != want.pop("values") or got != want:
        return f"result {json.dumps(result)[:160]} is not what chaos.order({i}) returns"
    return None


def check_steps(conn: psycopg.Connection[Any], started: dict[str, int]) -> Check:
    check = Check("each step committed exactly once")
    rows = _rows(
        conn,
        """
        WITH h AS (
            SELECT workflow_id, seq, count(*) FILTER (WHERE event = 'step completed') AS c,
                   count(*) FILTER (WHERE event = 'step failed') AS f
              FROM ("""
        + events_sql("")
        + """) AS e WHERE seq IS NOT NULL GROUP BY workflow_id, seq)
        SELECT s.workflow_id, s.seq, s.kind, s.name, s.status,
               coalesce(h.c, 0), coalesce(h.f, 0)
          FROM durable_steps s LEFT JOIN h USING (workflow_id, seq)
        """,
    )
    seqs: dict[str, list[int]] = defaultdict(list)
    settled = 0
    for wid, seq, kind, name, status, completed, failed in rows:
        seqs[wid].append(seq)
        if kind not in ("task", "local"):
            continue
        settled += 1
        want = (0, 1) if name == "chaos.doomed" else (1, 0)
        wanted_status = "failed" if name == "chaos.doomed" else "completed"
        if status != wanted_status or (completed, failed) != want:
            check.problems.append(
                f"{wid}#{seq} {name}: {status}, {completed} 'step completed' and {failed}"
                f" 'step failed' history rows (want {wanted_status}, once)"
            )
    for wid, i in started.items():
        got = sorted(seqs.get(wid, []))
        if got != list(range(1, positions(i) + 1)):
            check.problems.append(f"{wid}: positions {_span(got)}, want 1..{positions(i)}")
    check.summary = f"{settled} task and local steps, {sum(map(len, seqs.values()))} positions"
    return check


def _span(seqs: list[int]) -> str:
    return f"{seqs[0]}..{seqs[-1]} ({len(seqs)})" if seqs else "none"


def check_effects(conn: psycopg.Connection[Any]) -> Check:
    check = Check("each side effect applied once")
    rows = _rows(
        conn,
        """
        SELECT s.workflow_id, s.seq, s.name, s.status, s.result #>> '{}', e.token
          FROM durable_steps s
          LEFT JOIN chaos_effects e ON e.key = s.workflow_id || ':' || s.seq
         WHERE s.kind IN ('task', 'local')
        """,
    )
    for wid, seq, name, status, result, token in rows:
        if name == "chaos.doomed":
            if token is not None:
                check.problems.append(f"{wid}#{seq}: the failing step has an effect")
        elif status == "completed" and (token is None or result != token):
            check.problems.append(f"{wid}#{seq} {name}: result {result!r}, effect {token!r}")
    orphans = _rows(
        conn,
        """
        SELECT e.key FROM chaos_effects e WHERE NOT EXISTS (
            SELECT 1 FROM durable_steps s WHERE s.workflow_id || ':' || s.seq = e.key
               AND s.status = 'completed')
        """,
    )
    check.problems += [f"effect {k} has no committed step" for (k,) in orphans]
    runs = _rows(
        conn,
        "SELECT count(*), (SELECT count(*) FROM chaos_effects),"
        " (SELECT count(*) FROM (SELECT key FROM chaos_attempts"
        "  WHERE task NOT IN ('charge', 'doomed') GROUP BY key HAVING count(*) > 1) AS again)"
        " FROM chaos_attempts",
    )[0]
    check.summary = (
        f"{runs[1]} effects applied; step bodies ran {runs[0]} times in all; {runs[2]} bodies"
        " that never fail on purpose ran more than once (crashes, outages)"
    )
    return check


def check_timers(conn: psycopg.Connection[Any]) -> Check:
    check = Check("no timer lost or doubled")
    rows = _rows(
        conn,
        """
        WITH f AS (
            SELECT (detail ->> 'timer')::bigint AS id, count(*) AS n,
                   max((detail ->> 'lateness')::float8) AS lateness
              FROM durable_history WHERE event = 'timer fired' GROUP BY 1)
        SELECT t.id, t.workflow_id, t.seq, t.purpose, t.fire_at, t.fired_at, coalesce(f.n, 0),
               f.lateness, s.status, s.completed_at
          FROM durable_timers t LEFT JOIN f USING (id)
          LEFT JOIN durable_steps s ON s.workflow_id = t.workflow_id AND s.seq = t.seq
        """,
    )
    late: list[float] = []
    by_purpose: Counter[str] = Counter()
    for tid, wid, seq, purpose, fire_at, fired_at, fires, lateness, status, done_at in rows:
        by_purpose[purpose] += 1
        where = f"timer {tid} ({purpose}, {wid}#{seq})"
        if fired_at is None:
            check.problems.append(f"{where}: never fired")
        if fires > 1:
            check.problems.append(f"{where}: fired {fires} times")
        must_fire = purpose in ("sleep", "retry") or (purpose == "timeout" and status == "timeout")
        if must_fire and fires != 1:
            check.problems.append(f"{where}: {fires} 'timer fired' rows, want 1")
        if purpose == "sleep" and isinstance(done_at, datetime) and done_at < fire_at:
            check.problems.append(f"{where}: the sleep ended {fire_at - done_at} early")
        if lateness is not None:
            late.append(float(lateness))
    late.sort()
    shown = ", ".join(f"{p} {n}" for p, n in sorted(by_purpose.items()))
    if late:
        p50, p99 = late[len(late) // 2], late[min(int(len(late) * 0.99), len(late) - 1)]
        shown += f"; lateness p50 {p50 * 1000:.0f} ms, p99 {p99:.2f} s, max {late[-1]:.2f} s"
    check.summary = f"{len(rows)} timers ({shown})"
    return check


def check_schedule(conn: psycopg.Connection[Any], until: datetime) -> Check:
    check = Check("no schedule fire doubled or missed")
    ids = [r[0] for r in _rows(conn, "SELECT id FROM durable_workflows WHERE name = %s", (TICK,))]
    times = sorted(datetime.fromisoformat(i.split("@", 1)[1].replace("Z", "+00:00")) for i in ids)
    if len(set(times)) != len(times):
        doubled = [t for t, n in Counter(times).items() if n > 1]
        check.problems.append(f"fire times started twice: {doubled[:SHOWN]}")
    for before, after in itertools.pairwise(times):
        gap = (after - before).total_seconds()
        if gap != TICK_EVERY:
            check.problems.append(
                f"{gap:g} s between the fires of {before:%H:%M:%S} and {after:%H:%M:%S}"
            )
    if not times:
        check.problems.append(f"schedule {SCHEDULE} never fired")
    elif (until - times[-1]).total_seconds() > 15:
        check.problems.append(
            f"the last fire was at {times[-1]:%H:%M:%S}, the soak ended at {until:%H:%M:%S}"
        )
    if times:
        check.summary = (
            f"{len(times)} fires, {times[0]:%H:%M:%S} to {times[-1]:%H:%M:%S}, every {TICK_EVERY} s"
        )
    return check


def check_signals(conn: psycopg.Connection[Any], started: dict[str, int]) -> Check:
    check = Check("each signal delivered once")
    rows = _rows(
        conn,
        "SELECT workflow_id, count(*), count(consumed_seq) FROM durable_signals"
        " WHERE name = 'go' GROUP BY workflow_id",
    )
    found = {wid: (sent, taken) for wid, sent, taken in rows}
    for wid in started:
        sent, taken = found.get(wid, (0, 0))
        if sent < 1 or taken != 1:
            check.problems.append(f"{wid}: {sent} 'go' signals sent, {taken} taken (want 1)")
    check.summary = f"{sum(s for s, _ in found.values())} 'go' signals to {len(found)} runs"
    return check


def most_at_once(spans: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one moment; an end at the instant of a start comes first."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    peak = running = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    return peak


def check_limit(conn: psycopg.Connection[Any]) -> Check:
    check = Check("the limit held")
    rows = _rows(
        conn,
        "SELECT workflow_id, seq, limit_key, status, started_at, completed_at"
        " FROM durable_steps WHERE limit_name = %s",
        (RESERVE_LIMIT,),
    )
    spans: dict[str, list[tuple[datetime, datetime]]] = defaultdict(list)
    for wid, seq, key, status, started_at, completed_at in rows:
        if status != "completed" or started_at is None or completed_at is None:
            check.problems.append(f"{wid}#{seq} ({key}): {status}, not completed")
        else:
            spans[key].append((started_at, completed_at))
    for key, found in sorted(spans.items()):
        peak = most_at_once(found)
        if peak > RESERVE_SLOTS:
            check.problems.append(f"{key}: {peak} steps at once (limit {RESERVE_SLOTS})")
    peaks = ", ".join(f"{k} {most_at_once(v)}" for k, v in sorted(spans.items()))
    check.summary = f"{len(rows)} limited steps; most at once per key: {peaks or 'none'}"
    return check


def run_checks(url: str, started: dict[str, int], until: datetime) -> list[Check]:
    """Every check, in order."""
    with psycopg.connect(url, autocommit=True) as conn:
        return [
            check_workflows(conn, started),
            check_steps(conn, started),
            check_effects(conn),
            check_timers(conn),
            check_schedule(conn, until),
            check_signals(conn, started),
            check_limit(conn),
        ]


__all__ = ["ORDER", "Check", "run_checks"]
