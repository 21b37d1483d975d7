"""(e) One activation's replay of a 1,000-step history; local steps in this process.

A run of ``bench.replay`` is inserted without a message (so no worker touches it) and
activated here once: that records its 1,000 local steps, one statement each, and parks it at
a one-hour sleep. Then :func:`durable.activation.activate` is called again and again on it,
timed, with every statement this process sends counted (SQLAlchemy events): each replay
takes the lease and loads the history, replays 1,000 recorded positions, finds the sleep
still waiting and gives the lease back.

The same in-process path, from the run's insert to the commit of its result, times a
workflow of local steps to compare with DBOS (:mod:`bench.dbos_steps`), which also runs its
workflow in the caller's process.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event

from bench.app import LOCAL_WORKFLOW, REPLAY_WORKFLOW, statement_label
from bench.common import BenchError, median
from bench.harness import Bench
from durable.activation import activate
from durable.store import runs

REPLAY_STEPS, REPLAY_RUNS = 1000, 20
LOCAL_STEPS, LOCAL_RUNS = 200, 5


@dataclass
class Replay:
    """Timings of one history's replays, and of recording it."""

    steps: int
    record_seconds: float = 0.0
    seconds: list[float] = field(default_factory=list)
    statements: list[int] = field(default_factory=list)
    sql_seconds: list[float] = field(default_factory=list)
    acquire_seconds: list[float] = field(default_factory=list)
    history_bytes: int = 0

    @property
    def ms(self) -> float:
        return median(self.seconds) * 1000


@dataclass
class StatementLog:
    """Statements sent by this process while :func:`counting` is active."""

    count: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)

    def clear(self) -> None:
        self.count.clear()
        self.seconds.clear()


@contextlib.contextmanager
def counting() -> Iterator[StatementLog]:
    """Count and time every statement this process sends, by label, inside the block."""
    log = StatementLog()

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        conn.info["bench_replay_sent"] = time.perf_counter()

    def after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: Any) -> None:
        label = statement_label(context, statement)
        log.count[label] += 1
        sent = conn.info.pop("bench_replay_sent", time.perf_counter())
        log.seconds[label] += time.perf_counter() - sent

    event.listen(Engine, "before_cursor_execute", before)
    event.listen(Engine, "after_cursor_execute", after)
    try:
        yield log
    finally:
        event.remove(Engine, "before_cursor_execute", before)
        event.remove(Engine, "after_cursor_execute", after)


def insert(bench: Bench, name: str, args: list[Any]) -> str:
    """A new run of ``name``, committed without sending its activation."""
    wid = f"inproc-{uuid.uuid4().hex[:12]}"
    encoded = json.dumps(args)
    bench.durable.store(lambda c: runs.insert_run(c, wid, name, encoded, "{}"))
    return wid


def measure_replay(bench: Bench) -> Replay:
    """Record the history once, then time ``REPLAY_RUNS`` replays of it."""
    result = Replay(REPLAY_STEPS)
    wid = insert(bench, REPLAY_WORKFLOW, [REPLAY_STEPS])
    started = time.perf_counter()
    outcome = activate(bench.durable, wid)
    result.record_seconds = time.perf_counter() - started
    if outcome != "suspended":
        raise BenchError(f"recording the {REPLAY_STEPS}-step history ended {outcome!r}")
    activate(bench.durable, wid)  # warm up
    with counting() as log:
        for _ in range(REPLAY_RUNS):
            log.clear()
            started = time.perf_counter()
            outcome = activate(bench.durable, wid)
            result.seconds.append(time.perf_counter() - started)
            if outcome != "suspended":
                raise BenchError(f"a replay of the {REPLAY_STEPS}-step history ended {outcome!r}")
            result.statements.append(sum(log.count.values()))
            result.sql_seconds.append(sum(log.seconds.values()))
            result.acquire_seconds.append(log.seconds.get("runs.acquire", 0.0))
    rows = bench.sql(
        "SELECT sum(pg_column_size(s.*)) FROM durable_steps s WHERE workflow_id = %s", (wid,)
    )
    result.history_bytes = int(rows[0][0] or 0)
    return result


def measure_local(bench: Bench, steps: int = LOCAL_STEPS, runs: int = LOCAL_RUNS) -> list[float]:
    """Seconds of in-process runs of ``steps`` local steps, from insert to committed result."""
    activate(bench.durable, insert(bench, LOCAL_WORKFLOW, [20]))  # warm up
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        wid = insert(bench, LOCAL_WORKFLOW, [steps])
        outcome = activate(bench.durable, wid)
        seconds.append(time.perf_counter() - started)
        if outcome != "completed":
            raise BenchError(f"the in-process run of {steps} local steps ended {outcome!r}")
    return seconds
