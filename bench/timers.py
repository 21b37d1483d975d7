"""(d) Timer lateness with 10,000 and 100,000 timers pending.

On a database and key prefix of its own, with a real worker and a real ``durable beat``
process: the pending timers are written straight into ``durable_timers`` (one
``INSERT ... SELECT generate_series``, due in 30 days and more, on a parked run) and into the
Redis index (pipelined ``ZADD``), so the set-up takes seconds. Then ``DUE_SOON`` workflows
``ctx.sleep()`` for 2 to 6 seconds each; once they have all completed, the lateness of each
of their timers is read where the beat recorded it: the ``lateness`` of the ``timer fired``
history row, PostgreSQL's ``now() - fire_at`` in the statement that fired it.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from bench import common
from bench.app import NAP_WORKFLOW, build
from bench.common import BenchError, console, percentile, psycopg_url
from bench.harness import child_env, delete_keys
from durable.dev.services import Services, create_database, drop_database
from durable.store import engine as store_engine
from durable.store.migrate import upgrade
from durable.timer_index import TimerIndex

PENDING = (10_000, 100_000)
DUE_SOON = 400
SLEEPS = (2.0, 6.0)  # seconds, uniform
FILLER = "bench-filler"  # the parked run the pending timers belong to
WAIT = 60.0


@dataclass
class Lateness:
    """Lateness of the timers fired with ``pending`` others waiting, in seconds."""

    pending: int
    seconds: list[float] = field(default_factory=list)

    def ms(self, fraction: float) -> float:
        return percentile(self.seconds, fraction) * 1000


def add_pending(
    conn: psycopg.Connection[tuple[object, ...]], index: TimerIndex, count: int
) -> None:
    """Write ``count`` timers due in 30 days or later, in PostgreSQL and in the index."""
    conn.execute(
        "INSERT INTO durable_workflows (id, name, status, args, kwargs, wake_seq, run_seq)"
        " VALUES (%s, 'bench.filler', 'running', '[]', '{}', 1, 1) ON CONFLICT DO NOTHING",
        (FILLER,),
    )
    rows = conn.execute(
        "INSERT INTO durable_timers (workflow_id, seq, purpose, fire_at)"
        " SELECT %s, g, 'sleep', now() + interval '30 days' + g * interval '1 second'"
        " FROM generate_series(1, %s) g RETURNING id, extract(epoch FROM fire_at)",
        (FILLER, count),
    ).fetchall()
    pipe = index.client.pipeline(transaction=False)
    for start in range(0, len(rows), 5000):
        pipe.zadd(index.key, {str(i): float(at) for i, at in rows[start : start + 5000]})
    pipe.set(index.built_key, "1")
    pipe.execute()


class TimerBench:
    """The timer part's database, prefix, worker and beat."""

    def __init__(self, services: Services, logdir: Path, deadline: float) -> None:
        self.services = services
        self.logdir = logdir
        self.deadline = deadline
        self.prefix = f"bench{uuid.uuid4().hex[:10]}"
        self.db_name = f"durable_bench_{uuid.uuid4().hex[:10]}"
        self.database_url = ""
        self.children: list[common.Child] = []

    def run(self) -> list[Lateness]:
        try:
            return self._measure()
        finally:
            self._clean_up()

    def _measure(self) -> list[Lateness]:
        self.database_url = create_database(self.services.database_url, self.db_name)
        upgrade(self.database_url)
        _, durable, add = build(self.database_url, self.services.redis_url, self.prefix)
        results: list[Lateness] = []
        with psycopg.connect(psycopg_url(self.database_url), autocommit=True) as conn:
            add_pending(conn, durable.timer_index, PENDING[0])
            self._start_children(add)
            pending = PENDING[0]
            for size in PENDING:
                if size > pending:
                    add_pending(conn, durable.timer_index, size - pending)
                    pending = size
                console.print(f"[dim]timers: {pending:,} pending, {DUE_SOON} due soon…[/]")
                batch = uuid.uuid4().hex[:8]
                for i in range(DUE_SOON):
                    durable.start(
                        NAP_WORKFLOW, random.uniform(*SLEEPS), workflow_id=f"nap-{batch}-{i}"
                    )
                self._wait_completed(conn, f"nap-{batch}-%")
                results.append(Lateness(pending, self._lateness(conn, f"nap-{batch}-%")))
        return results

    def _start_children(self, add: object) -> None:
        env = child_env(self.services, self.database_url, self.prefix)
        self.children = [common.worker("prefork", env, self.logdir), common.beat(env, self.logdir)]
        for child in self.children:
            child.start()
        client = redis.Redis.from_url(self.services.redis_url)
        try:
            key = f"{self.prefix}:ready"
            add.apply_async((0, 1), {"notify": key}, ignore_result=True)  # type: ignore[attr-defined]
            if client.blpop([key], timeout=30) is None:
                raise BenchError(f"the timer bench's worker did not start:\n{self._tails()}")
        finally:
            client.close()

    def _wait_completed(self, conn: psycopg.Connection[tuple[object, ...]], pattern: str) -> None:
        end = min(time.monotonic() + WAIT, self.deadline)
        while time.monotonic() < end:
            for child in self.children:
                child.check()
            row = conn.execute(
                "SELECT count(*) FROM durable_workflows WHERE id LIKE %s AND status = 'completed'",
                (pattern,),
            ).fetchone()
            if row is not None and row[0] >= DUE_SOON:
                return
            time.sleep(0.5)
        raise BenchError(f"the naps did not all complete in time:\n{self._tails()}")

    @staticmethod
    def _lateness(conn: psycopg.Connection[tuple[object, ...]], pattern: str) -> list[float]:
        rows = conn.execute(
            "SELECT (detail->>'lateness')::float8 FROM durable_history"
            " WHERE event = 'timer fired' AND workflow_id LIKE %s",
            (pattern,),
        ).fetchall()
        return [float(r[0]) for r in rows]  # type: ignore[arg-type]

    def _tails(self) -> str:
        return "\n".join(f"-- {c.name}:\n{c.log_tail()}" for c in self.children)

    def _clean_up(self) -> None:
        for child in self.children:
            child.stop()
        store_engine.dispose_all()
        if self.database_url:
            drop_database(self.services.database_url, self.db_name)
        client = redis.Redis.from_url(self.services.redis_url)
        try:
            delete_keys(client, self.prefix)
        finally:
            client.close()
