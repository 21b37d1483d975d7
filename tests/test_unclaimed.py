"""Steps run without a claim on the first delivery of their only copy.

See ``durable.runner``: in the process that scheduled it, or after one read elsewhere, such a
step is settled from ``scheduled`` in one statement, claimed by the heartbeat thread if its
body is still running half-way to ``redispatch_after``, and claimed before a failure is
handled. Every other delivery claims first, as before.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy import text

from durable import Durable, RetryPolicy, current_step
from durable.activation import activate
from durable.beat import Beat
from durable.histories import HistoryCache, first_open
from durable.liveness import Heartbeat
from durable.runner import execute_step, first_delivery
from durable.store import steps as step_queries
from durable.store.records import StepRecord
from durable.store.runs import Activation
from durable.store.statement import on_statement
from tests.apps import pool_app
from tests.conftest import (
    HISTORY_ROWS,
    ROOT,
    Background,
    Workers,
    clean_keys,
    clean_tables,
    make_app,
    query,
    wait_until,
)
from tests.store_helpers import schedule_step


def _events(database_url: str, wid: str, seq: int) -> list[str]:
    rows = query(
        database_url,
        "SELECT event FROM " + HISTORY_ROWS + f" WHERE workflow_id = '{wid}' AND seq = {seq} "
        "ORDER BY pos",
    )
    return [r.event for r in rows]


def test_only_a_young_first_delivery_counts_as_one(durable: Durable) -> None:
    now = time.time()
    window = durable.settings.redispatch_after.total_seconds() * 0.3
    assert first_delivery(durable, now, redelivered=False) == now
    assert first_delivery(durable, now, redelivered=True) is None  # the broker's redelivery
    assert first_delivery(durable, None, redelivered=False) is None  # recovery or a retry
    assert first_delivery(durable, now - window - 1, redelivered=False) is None  # too old
    assert first_delivery(durable, "soon", redelivered=False) is None  # not ours


def test_the_kept_step_is_offered_once_and_only_alone() -> None:
    cache = HistoryCache(8)
    run = Activation(
        workflow_id="w", name="wf", args=[], kwargs={}, wake_seq=3,
        created_at=datetime.now(UTC), steps=[],
    )  # fmt: skip
    done = [StepRecord(1, "task", "t.first", "completed", attempts=1, settling=True)]
    nxt = step_queries.NewStep(2, "t.next", "[1]", "{}", "{}")
    cache.keep_advanced(run, done, [nxt], None)
    assert cache.take_fresh("w", 3) is None  # another step: nothing, and forgotten
    assert cache.take_fresh("w", 2) is None
    cache.keep_advanced(run, done, [nxt], None)
    kept = cache.take_fresh("w", 2)
    assert kept is not None and kept[1] == nxt and kept[0].wake_seq == 4
    assert cache.take_fresh("w", 2) is None  # once
    other = step_queries.NewStep(3, "t.other", "[]", "{}", "{}")
    cache.keep_advanced(run, done, [nxt, other], None)  # a parallel batch
    assert cache.take_fresh("w", 2) is None
    still_open = [*done, StepRecord(2, "task", "t.next", "started", attempts=1)]
    cache.keep_advanced(run, still_open, [other], None)  # another step still running
    assert cache.take_fresh("w", 3) is None
    cache.keep_advanced(run, done, [nxt], None, first=False)  # the row was there already
    assert cache.take_fresh("w", 2) is None


def test_a_settle_says_which_new_steps_it_wrote(durable: Durable) -> None:
    """A step row already there is not a first dispatch: its message may have run it."""

    @durable.workflow("wf.unclaimed.sleeper")
    def wf(ctx: Any) -> None:
        ctx.sleep(3600)

    durable.start("wf.unclaimed.sleeper", workflow_id="unc-5")
    with durable.connect() as conn:
        conn.execute(text("UPDATE durable_workflows SET run_seq = wake_seq WHERE id = 'unc-5'"))
        schedule_step(conn, "unc-5", 1, "t.part", "[]", "{}", "{}")
        schedule_step(conn, "unc-5", 2, "t.part", "[]", "{}", "{}")
        claimed = step_queries.claim_step(conn, "unc-5", 1, "w#1", 30, with_history=True)
        assert claimed is not None and claimed.rest_wake is not None
        settled = step_queries.settle_step(
            conn, "unc-5", 1, result="1", owner="w#1", ttl=30, attempt=claimed.attempt,
            expect_wake=claimed.rest_wake,
            new=[step_queries.NewStep(2, "t.part", "[]", "{}", "{}"),
                 step_queries.NewStep(3, "t.part", "[]", "{}", "{}")],
        )  # fmt: skip
    assert settled.advanced and settled.inserted == 1  # step 3 only


def test_a_deferred_call_runs_once_unless_settled_first() -> None:
    beat = Heartbeat(lambda tokens: 0, interval=0.05)
    beat.hold("w#1")
    calls: list[str] = []
    try:
        soon = beat.defer(time.monotonic() + 0.1, lambda: calls.append("soon") or "ran")
        never = beat.defer(time.monotonic() + 0.2, lambda: calls.append("never"))
        assert never.settle() == "cancelled"
        wait_until(lambda: soon.state == "done", timeout=5, what="the deferred call")
        assert soon.value == "ran" and soon.settle() == "done"
        time.sleep(0.3)
        assert calls == ["soon"]
    finally:
        beat.release("w#1")


def test_a_step_scheduled_here_runs_unclaimed_and_a_duplicate_does_not(
    durable: Durable, app: Celery, database_url: str
) -> None:
    runs: list[int] = []

    @app.task(name="t.count", shared=False)
    def count(x: int) -> int:
        runs.append(x)
        return x + 1

    @durable.workflow("wf.unclaimed")
    def wf(ctx: Any) -> int:
        return int(ctx.step(count, ctx.step(count, 0)))

    durable.start("wf.unclaimed", workflow_id="unc-1")
    assert activate(durable, "unc-1") == "suspended"
    assert execute_step(durable, "unc-1", 1) == "completed"  # claimed; schedules step 2
    (step,) = query(database_url, "SELECT status, attempts FROM durable_steps WHERE seq = 2")
    assert (step.status, step.attempts) == ("scheduled", 0)
    assert execute_step(durable, "unc-1", 2, fresh=time.time()) == "completed"
    assert runs == [0, 1]
    (step,) = query(
        database_url, "SELECT status, attempts, started_at FROM durable_steps WHERE seq = 2"
    )
    assert (step.status, step.attempts) == ("completed", 1) and step.started_at is not None
    assert _events(database_url, "unc-1", 2) == [
        "step scheduled",
        "step started",
        "step completed",
    ]
    start, end = query(
        database_url,
        "SELECT detail, at FROM " + HISTORY_ROWS + " WHERE workflow_id = 'unc-1' AND seq = 2 "
        "AND event IN ('step started', 'step completed') ORDER BY pos",
    )
    assert start.detail["unclaimed"] is True and start.at == step.started_at <= end.at
    assert durable.run("unc-1").result(timeout=5) == 2
    # The same message again, as if it were a first delivery: not kept any more, so it is
    # claimed, finds the step finished and does nothing.
    assert execute_step(durable, "unc-1", 2, fresh=time.time()) == "ignored"
    assert runs == [0, 1]


def test_a_first_step_runs_unclaimed_unless_the_activation_did_more(
    database_url: str, redis_url: str, prefix: str
) -> None:
    # Started by an activation, not eagerly: the activation schedules the first step.
    clean_tables(database_url)
    app, durable = make_app(database_url, redis_url, prefix, eager_start=False)

    @app.task(name="t.plain", shared=False)
    def plain(x: int) -> int:
        return x + 1

    def local_one() -> int:
        return 1

    @durable.workflow("wf.unclaimed.first")
    def first(ctx: Any) -> int:
        return int(ctx.step(plain, 0))

    @durable.workflow("wf.unclaimed.local_first")
    def local_first(ctx: Any) -> int:
        return int(ctx.step(plain, ctx.step(local_one, local=True)))

    def started(wid: str, seq: int) -> dict[str, Any]:
        (row,) = query(
            database_url,
            "SELECT detail FROM " + HISTORY_ROWS + f" WHERE workflow_id = '{wid}' AND seq = {seq} "
            "AND event = 'step started'",
        )
        return dict(row.detail)

    durable.start("wf.unclaimed.first", workflow_id="unc-7")
    assert activate(durable, "unc-7") == "suspended"  # kept: the run waits on step 1 only
    assert execute_step(durable, "unc-7", 1, fresh=time.time()) == "completed"
    assert started("unc-7", 1)["unclaimed"] is True
    assert durable.run("unc-7").result(timeout=5) == 1
    # A local step recorded in the same activation: its history is not the one it read, so
    # the step is not kept, and its message does not say it may run unclaimed.
    durable.start("wf.unclaimed.local_first", workflow_id="unc-8")
    assert activate(durable, "unc-8") == "suspended"
    assert durable.histories.take_fresh("unc-8", 2) is None
    assert execute_step(durable, "unc-8", 2) == "completed"
    assert "unclaimed" not in started("unc-8", 2)
    assert durable.run("unc-8").result(timeout=5) == 2


def test_a_step_cancelled_while_it_runs_unclaimed_keeps_its_outcome(
    durable: Durable, app: Celery, database_url: str
) -> None:
    """Cancellation marks a step it finds unclaimed ``cancelled``; this one was running."""

    @app.task(name="t.charge", shared=False)
    def charge() -> str:
        durable.cancel("unc-9")
        assert activate(durable, "unc-9") == "cancelled"  # lands on this step, ends the run
        return "charged"

    @durable.workflow("wf.unclaimed.cancel")
    def wf(ctx: Any) -> str:
        return str(ctx.step(charge))

    durable.start("wf.unclaimed.cancel", workflow_id="unc-9")
    assert activate(durable, "unc-9") == "suspended"
    assert execute_step(durable, "unc-9", 1, fresh=time.time()) == "completed"
    (step,) = query(
        database_url,
        "SELECT status, result, attempts FROM durable_steps WHERE workflow_id = 'unc-9'",
    )
    assert (step.status, step.result, step.attempts) == ("completed", "charged", 1)
    assert durable.run("unc-9").status() == "cancelled"


def test_a_step_with_a_timeout_is_claimed_even_on_its_first_delivery(
    durable: Durable, app: Celery, database_url: str
) -> None:
    """The claim sets the attempt's deadline, so such a step never runs unclaimed."""
    seen: list[Any] = []

    @app.task(name="t.deadline", shared=False)
    def deadline(x: int) -> int:
        seen.append(
            query(
                database_url,
                "SELECT status, deadline_at IS NOT NULL AS deadline FROM durable_steps "
                f"WHERE workflow_id = 'unc-6' AND seq = {current_step().step}",
            )[0]
        )
        return x + 1

    @durable.workflow("wf.unclaimed.timeout")
    def wf(ctx: Any) -> int:
        return int(ctx.step(deadline, ctx.step(deadline, 0, timeout=30), timeout=30))

    durable.start("wf.unclaimed.timeout", workflow_id="unc-6")
    assert activate(durable, "unc-6") == "suspended"
    assert execute_step(durable, "unc-6", 1) == "completed"
    assert execute_step(durable, "unc-6", 2, fresh=time.time()) == "completed"
    (start,) = query(
        database_url,
        "SELECT detail FROM " + HISTORY_ROWS + " WHERE workflow_id = 'unc-6' AND seq = 2 "
        "AND event = 'step started'",
    )
    assert "unclaimed" not in start.detail
    assert [(r.status, r.deadline) for r in seen] == [("started", True)] * 2
    assert durable.run("unc-6").result(timeout=5) == 2


def test_an_unclaimed_step_is_not_settled_over_a_claim(
    durable: Durable, app: Celery, database_url: str
) -> None:
    """Another delivery claimed the step meanwhile: the unclaimed body's outcome is dropped."""

    @app.task(name="t.inc", shared=False)
    def inc(x: int) -> int:
        if x == 1:  # step 2's body: another worker claims the step while it runs
            with durable.connect() as conn:
                assert step_queries.claim_step(conn, "unc-2", 2, "other#1", 30) is not None
        return x + 1

    @durable.workflow("wf.unclaimed.raced")
    def wf(ctx: Any) -> int:
        return int(ctx.step(inc, ctx.step(inc, 0)))

    durable.start("wf.unclaimed.raced", workflow_id="unc-2")
    assert activate(durable, "unc-2") == "suspended"
    assert execute_step(durable, "unc-2", 1) == "completed"
    assert execute_step(durable, "unc-2", 2, fresh=time.time()) == "superseded"
    (step,) = query(database_url, "SELECT status, lease_owner FROM durable_steps WHERE seq = 2")
    assert (step.status, step.lease_owner) == ("started", "other#1")


def test_a_failing_unclaimed_step_is_claimed_then_retried(
    durable: Durable, app: Celery, database_url: str, worker: Any, beat: Any
) -> None:
    tries: list[int] = []

    @app.task(name="t.flaky", shared=False)
    def flaky(x: int) -> int:
        tries.append(x)
        if len(tries) == 1:
            raise ConnectionError("flaky")
        return x * 10

    @app.task(name="t.one", shared=False)
    def one() -> int:
        return 1

    @durable.workflow("wf.unclaimed.flaky")
    def wf(ctx: Any) -> int:
        return int(ctx.step(flaky, ctx.step(one), retry=RetryPolicy(initial_interval=0.2)))

    assert durable.start("wf.unclaimed.flaky", workflow_id="unc-3").result(timeout=30) == 10
    assert tries == [1, 1]
    (step,) = query(
        database_url,
        "SELECT status, attempts FROM durable_steps WHERE workflow_id = 'unc-3' AND seq = 2",
    )
    assert (step.status, step.attempts) == ("completed", 2)
    assert _events(database_url, "unc-3", 2) == [
        "step scheduled",
        "step started",
        "retry scheduled",
        "timer fired",
        "step started",
        "step completed",
    ]


def test_a_long_unclaimed_step_is_claimed_before_it_would_be_sent_again(
    database_url: str, redis_url: str, prefix: str
) -> None:
    clean_tables(database_url)
    # Sent again after 1 s unclaimed: the body (2 s) must be claimed at 0.5 s, and only once.
    app, durable = make_app(database_url, redis_url, prefix, lease_ttl=1.5, redispatch_after=1)
    client = redis.Redis.from_url(redis_url)

    @app.task(name="t.quick", shared=False)
    def quick() -> int:
        return 1

    @app.task(name="t.slow", shared=False)
    def slow(x: int) -> int:
        client.incr(f"{prefix}:count:slow")
        time.sleep(2)
        return x + 1

    @durable.workflow("wf.unclaimed.long")
    def wf(ctx: Any) -> int:
        return int(ctx.step(slow, ctx.step(quick)))

    beat = Beat(durable, sweep_interval=0.2)
    thread = Background(beat.run)
    try:
        with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
            run = durable.start("wf.unclaimed.long", workflow_id="unc-4")
            assert run.result(timeout=30) == 2
        assert int(client.get(f"{prefix}:count:slow") or 0) == 1
    finally:
        beat.stopping.set()
        thread.join(5)
        clean_keys(redis_url, prefix)
    assert beat.stats.steps_redispatched == 0
    one, two = query(
        database_url,
        "SELECT seq, attempts, started_at, completed_at FROM durable_steps "
        "WHERE workflow_id = 'unc-4' ORDER BY seq",
    )
    assert two.attempts == 1
    # Claimed by the heartbeat half-way to the redispatch, not when the body began.
    assert (two.started_at - one.completed_at).total_seconds() >= 0.4
    assert _events(database_url, "unc-4", 2) == [
        "step scheduled",
        "step started",
        "step completed",
    ]


def _elsewhere(durable: Durable) -> None:
    """Forget what this process kept: as if the next delivery reached another process."""
    durable._histories = HistoryCache(durable.settings.history_cache_size)


def _sent(statements: list[str]) -> Callable[[], None]:
    return on_statement(lambda clause, seconds: statements.append(clause.text))


def test_a_first_delivery_to_another_process_reads_the_step_instead_of_claiming_it(
    durable: Durable, app: Celery, database_url: str
) -> None:
    """Another prefork child, say: one read (no write, no lease), then the one settle."""

    @app.task(name="t.hop", shared=False)
    def hop(x: int) -> int:
        return x + 1

    @durable.workflow("wf.unclaimed.elsewhere")
    def wf(ctx: Any) -> int:
        return int(ctx.step(hop, ctx.step(hop, ctx.step(hop, 0))))

    durable.start("wf.unclaimed.elsewhere", workflow_id="unc-10")
    assert activate(durable, "unc-10") == "suspended"
    assert execute_step(durable, "unc-10", 1) == "completed"  # claimed; schedules step 2
    _elsewhere(durable)
    statements: list[str] = []
    stop = _sent(statements)
    try:
        assert execute_step(durable, "unc-10", 2, fresh=time.time()) == "completed"
    finally:
        stop()
    assert statements == [step_queries._READ_FIRST.text, step_queries._SETTLE.text]
    (start,) = query(
        database_url,
        "SELECT detail FROM " + HISTORY_ROWS + " WHERE workflow_id = 'unc-10' AND seq = 2 "
        "AND event = 'step started'",
    )
    assert start.detail["unclaimed"] is True and start.detail["attempt"] == 1
    # The read's history was the run's: the settle advanced it as the claim's would.
    _elsewhere(durable)
    assert execute_step(durable, "unc-10", 3, fresh=time.time()) == "completed"
    assert durable.run("unc-10").result(timeout=5) == 3


def _two_step_run(durable: Durable, app: Celery, wid: str) -> None:
    """A run of two steps at rest on its second, scheduled by a settle elsewhere."""

    @app.task(name="t.twice", shared=False)
    def twice(x: int) -> int:
        return x * 2

    @durable.workflow("wf.unclaimed.two")
    def wf(ctx: Any) -> int:
        return int(ctx.step(twice, ctx.step(twice, 1)))

    durable.start("wf.unclaimed.two", workflow_id=wid)
    assert activate(durable, wid) == "suspended"
    assert execute_step(durable, wid, 1) == "completed"
    _elsewhere(durable)


@pytest.mark.parametrize(
    ("case", "change"),
    [
        ("sent again", "UPDATE durable_steps SET dispatch_count = 2 WHERE workflow_id = :w"),
        (
            "sent too long ago",
            "UPDATE durable_steps SET dispatched_at = now() - interval '4 seconds'"
            " WHERE workflow_id = :w AND seq = 2",
        ),
        ("its run woken", "UPDATE durable_workflows SET wake_seq = wake_seq + 1 WHERE id = :w"),
        (
            "its run leased",
            "UPDATE durable_workflows SET lease_owner = 'other#1',"
            " lease_expires_at = now() + interval '1 minute' WHERE id = :w",
        ),
        (
            "its run being cancelled",
            "UPDATE durable_workflows SET cancel_requested = true WHERE id = :w",
        ),
        ("its run paused", "UPDATE durable_workflows SET paused = true WHERE id = :w"),
        (
            "a timeout",
            "UPDATE durable_steps SET options = options || '{\"timeout\": 30}'"
            " WHERE workflow_id = :w AND seq = 2",
        ),
    ],
)
def test_a_first_delivery_elsewhere_is_claimed_unless_it_is_the_only_copy(
    durable: Durable, app: Celery, database_url: str, case: str, change: str
) -> None:
    """Each condition of the read, seen refusing: the step is claimed instead."""
    wid = f"unc-11-{case.replace(' ', '-')}"
    _two_step_run(durable, app, wid)
    with durable.connect() as conn:
        conn.execute(text(change), {"w": wid})
        found = step_queries.read_first_step(conn, wid, 2, window=3.0)
    assert found is None, case
    # The claim path records the start as a claimed one (or leaves a leased run alone).
    statements: list[str] = []
    stop = _sent(statements)
    try:
        execute_step(durable, wid, 2, fresh=time.time())
    finally:
        stop()
    assert step_queries._CLAIM.text in statements, case


def test_a_step_of_a_parallel_batch_elsewhere_is_claimed(
    durable: Durable, app: Celery, database_url: str
) -> None:
    """Not its run's one open position: its sibling may settle meanwhile."""

    @app.task(name="t.part", shared=False)
    def part(x: int) -> int:
        return x

    @durable.workflow("wf.unclaimed.batch")
    def wf(ctx: Any) -> int:
        return sum(ctx.parallel([part.s(1), part.s(2)]))

    durable.start("wf.unclaimed.batch", workflow_id="unc-12")
    assert activate(durable, "unc-12") == "suspended"
    _elsewhere(durable)
    with durable.connect() as conn:
        assert step_queries.read_first_step(conn, "unc-12", 1, 3.0) is not None  # the SQL allows it
    assert execute_step(durable, "unc-12", 1, fresh=time.time()) == "completed"
    (start,) = query(
        database_url,
        "SELECT detail FROM " + HISTORY_ROWS + " WHERE workflow_id = 'unc-12' AND seq = 1 "
        "AND event = 'step started'",
    )
    assert "unclaimed" not in start.detail


def test_a_read_elsewhere_returns_only_what_advances_changed_since_the_kept_history(
    durable: Durable, app: Celery, database_url: str
) -> None:
    """Prefork children take turns: one holds the run a few advances old, and reads the rest."""

    @app.task(name="t.inc", shared=False)
    def inc(x: int) -> int:
        return x + 1

    @durable.workflow("wf.unclaimed.turns")
    def wf(ctx: Any) -> int:
        x = 0
        for _ in range(4):
            x = ctx.step(inc, x)
        return x

    durable.start("wf.unclaimed.turns", workflow_id="unc-13")
    assert activate(durable, "unc-13") == "suspended"
    _elsewhere(durable)
    assert execute_step(durable, "unc-13", 1, fresh=time.time()) == "completed"  # read, kept
    first_child = durable._histories
    _elsewhere(durable)
    assert execute_step(durable, "unc-13", 2, fresh=time.time()) == "completed"  # the other
    durable._histories = first_child  # holds the run as it was after step 1
    kept = first_child.held("unc-13")
    assert kept is not None and kept.woken is not None
    held = step_queries.Held(kept.wake_seq, kept.woken, kept.created_at, first_open(kept.steps))
    assert held.since == 2  # step 2 was the open one then
    with durable.connect() as conn:
        found = step_queries.read_first_step(conn, "unc-13", 3, 3.0, held)
    assert found is not None and found.since == 2 and found.step.run is not None
    assert [r.seq for r in found.step.run.steps] == [2, 3]
    assert found.step.run.steps[0].status == "completed"
    # The merged history is the run's: the run goes on to the right result.
    assert execute_step(durable, "unc-13", 3, fresh=time.time()) == "completed"
    assert execute_step(durable, "unc-13", 4, fresh=time.time()) == "completed"
    assert durable.run("unc-13").result(timeout=5) == 4
    # Woken since (a signal, say, handled by an activation that released it): all is read.
    with durable.connect() as conn:
        conn.execute(
            text(
                "UPDATE durable_workflows SET wake_seq = wake_seq + 1, run_seq = run_seq + 1,"
                " status = 'running' WHERE id = 'unc-13'"
            )
        )
        conn.execute(
            text(
                "UPDATE durable_steps SET status = 'scheduled', attempts = 0, result = NULL,"
                " dispatched_at = now() WHERE workflow_id = 'unc-13' AND seq = 4"
            )
        )
        found = step_queries.read_first_step(conn, "unc-13", 4, 3.0, held)
    assert found is not None and found.since is None and found.step.run is not None
    assert [r.seq for r in found.step.run.steps] == [1, 2, 3, 4]


@pytest.mark.timeout(300)
def test_every_step_runs_unclaimed_on_either_child_of_a_prefork_worker(
    database_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """A real ``prefork -c 2`` worker: a run's first step, sent by this process, lands on a
    process that did not schedule it, and so do later steps whenever the other child takes
    them. There they are read, not claimed: every step of every run runs unclaimed. Claimed
    instead, as before, the steps that changed process would record a claimed start.

    Twenty runs at once fill the queue; which child takes a step then depends on timing. Three
    ``pool.hops`` runs, one at a time, make the change of child certain: the child that sent
    a step stays busy after it (``pool_app.hold_child``), and the worker hands the step to the
    idle one."""
    clean_tables(database_url)
    env = {
        **os.environ,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        # A first delivery runs unclaimed while younger than 0.3 of this: 18 s of margin
        # for a loaded machine's queue.
        "DURABLE_REDISPATCH_AFTER": "60",
        "POOL_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }
    _, durable = pool_app.build(prefix, redis_url, database_url=database_url, redispatch_after=60)
    workers = Workers(env, tmp_path, "tests.apps.pool_app")
    workers.start("unclaimed-two", concurrency=2)
    try:
        # The worker ready first: a first message that waited for it to boot may be too old.
        assert durable.start("pool.sum", 0, workflow_id=f"{prefix}-w").result(timeout=60) == 111
        runs = [durable.start("pool.sum", i, 0.05, workflow_id=f"{prefix}-u{i}") for i in range(20)]
        assert [r.result(timeout=120) for r in runs] == [i + 111 for i in range(20)]
        children = redis.Redis.from_url(redis_url).smembers(f"{prefix}:pids")
        for i in range(3):
            run = durable.start("pool.hops", i, workflow_id=f"{prefix}-h{i}")
            assert run.result(timeout=60) == i + 111
    finally:
        workers.stop_all()
        clean_keys(redis_url, prefix)
    assert len(children) == 2  # both children ran steps
    rows = query(
        database_url,
        "SELECT workflow_id, seq, detail FROM " + HISTORY_ROWS + " WHERE event = 'step started'"
        f" AND (workflow_id LIKE '{prefix}-u%' OR workflow_id LIKE '{prefix}-h%')"
        " ORDER BY workflow_id, seq",
    )
    assert len(rows) == 69
    claimed = [(r.workflow_id, r.seq) for r in rows if r.detail.get("unclaimed") is not True]
    assert claimed == []

    def pid(row: Any) -> str:
        return str(row.detail["worker"]).split(":")[1]

    hops = [r for r in rows if r.workflow_id.startswith(f"{prefix}-h")]
    stayed = [
        (r.workflow_id, r.seq)
        for before, r in pairwise(hops)
        if before.workflow_id == r.workflow_id and pid(before) == pid(r)
    ]
    assert stayed == [], "a step ran on the child that had just sent it"
