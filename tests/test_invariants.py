"""The invariants of the design, each with a test that fails without the mechanism."""

from __future__ import annotations

import threading
from typing import Any

import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.signals import task_postrun
from sqlalchemy import event

from durable import Durable, WorkflowFailed
from durable.activation import activate
from durable.beat import Beat
from durable.dev.services import start_private_redis
from durable.runner import execute_step
from durable.store import engine as store_engine
from durable.store.statement import on_statement
from tests.conftest import Background, clean_keys, clean_tables, make_app, query, wait_until
from tests.store_helpers import schedule_step


def test_one_writer_per_workflow(durable: Durable, app: Celery, database_url: str) -> None:
    entered, proceed = threading.Event(), threading.Event()
    bodies: list[int] = []
    sent: list[int] = []
    original_send = durable.send_step
    durable.send_step = lambda wid, seq, *a, **k: (
        sent.append(seq),
        original_send(wid, seq, *a, **k),
    )  # type: ignore[method-assign]

    @app.task(name="t.one", shared=False)
    def one() -> int:
        return 1

    def gate() -> str:
        entered.set()
        assert proceed.wait(10)
        return "through"

    @durable.workflow("wf.writer")
    def wf(ctx: Any) -> int:
        bodies.append(1)
        ctx.step(gate, local=True)
        return int(ctx.step(one))

    durable.start("wf.writer", workflow_id="writer-1")  # no worker consumes it
    bodies.clear()  # the start ran the code in memory up to the local step (eager start)
    first = Background(activate, durable, "writer-1")
    assert entered.wait(10)
    # A second activation while the first runs the workflow's code must not run it too.
    assert activate(durable, "writer-1") == "busy-or-finished"
    assert len(bodies) == 1
    proceed.set()
    first.join(10)
    assert sent == [2]
    rows = query(
        database_url,
        "SELECT seq, dispatch_count FROM durable_steps WHERE workflow_id = 'writer-1' ORDER BY seq",
    )
    assert [(r.seq, r.dispatch_count) for r in rows] == [(1, 0), (2, 1)]


def test_duplicate_delivery_never_runs_a_finished_step_again(
    durable: Durable,
    app: Celery,
    worker: Any,
    redis_url: str,
    prefix: str,
    counter: Any,
    database_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    outcomes: list[str] = []

    @app.task(name="t.charge", shared=False)
    def charge() -> str:
        client.incr(f"{prefix}:count:charge")
        return "txn-1"

    @durable.workflow("wf.dup")
    def wf(ctx: Any) -> str:
        txn = str(ctx.step(charge))
        ctx.wait_for_signal("go")  # the run goes on: only the step's status stops a copy
        return txn

    def note(task: Any = None, kwargs: Any = None, retval: Any = None, **_: Any) -> None:
        if task is not None and (kwargs or {}).get("durable_step") == "dup-1#1":
            outcomes.append(str(retval))

    task_postrun.connect(note, weak=False)
    try:
        run = durable.start("wf.dup", workflow_id="dup-1")
        wait_until(
            lambda: query(
                database_url,
                "SELECT 1 FROM durable_steps WHERE workflow_id = 'dup-1' AND kind = 'signal'",
            ),
            what="step 1 committed",
        )
        wait_until(lambda: outcomes == ["completed"], what="the first delivery to end")
        # The same message again, straight into the step runner, and through the broker.
        assert execute_step(durable, "dup-1", 1) == "ignored"
        app.send_task("t.charge", kwargs={"durable_step": "dup-1#1"})
        wait_until(lambda: len(outcomes) == 2, what="the worker to run the copy")
    finally:
        task_postrun.disconnect(note)
    assert outcomes == ["completed", "ignored"]
    durable.signal("dup-1", "go")
    assert run.result(timeout=20) == "txn-1"
    assert counter("charge") == 1
    (row,) = query(
        database_url,
        "SELECT status, attempts, result FROM durable_steps"
        " WHERE workflow_id = 'dup-1' AND seq = 1",
    )
    assert (row.status, row.attempts, row.result) == ("completed", 1, "txn-1")


def test_messages_lost_after_commit_are_sent_again(
    database_url: str, redis_url: str, prefix: str
) -> None:
    clean_tables(database_url)
    # Started by an activation (not eagerly), so both kinds of message can be lost.
    app, durable = make_app(database_url, redis_url, prefix, redispatch_after=1, eager_start=False)
    client = redis.Redis.from_url(redis_url)

    @app.task(name="t.ship", shared=False)
    def ship() -> str:
        return "shipped"

    @durable.workflow("wf.lost")
    def wf(ctx: Any) -> str:
        return str(ctx.step(ship))

    try:
        durable.start("wf.lost", workflow_id="lost-1")
        assert client.delete(f"{prefix}:celery") == 1  # the activation message is gone
        assert activate(durable, "lost-1") == "suspended"  # step committed and sent ...
        assert client.delete(f"{prefix}:celery") == 1  # ... and that message is gone too
        beat = Beat(durable, sweep_interval=0.2)
        thread = Background(beat.run)
        with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
            assert durable.run("lost-1").result(timeout=20) == "shipped"
        beat.stopping.set()
        thread.join(5)
        assert beat.stats.steps_redispatched >= 1
    finally:
        clean_keys(redis_url, prefix)


def test_replay_detects_non_determinism(
    durable: Durable, app: Celery, worker: Any, database_url: str
) -> None:
    @app.task(name="t.reserve", shared=False)
    def reserve() -> str:
        return "reserved"

    @app.task(name="t.charge2", shared=False)
    def charge() -> str:
        return "charged"

    @durable.workflow("wf.changed")
    def v1(ctx: Any) -> None:
        ctx.step(reserve)
        ctx.sleep(3600)

    durable.start("wf.changed", workflow_id="nd-1")
    wait_until(
        lambda: query(
            database_url,
            "SELECT 1 FROM durable_steps WHERE workflow_id = 'nd-1' AND kind = 'sleep'",
        ),
        what="the sleep",
    )

    def v2(ctx: Any) -> None:  # a deploy changed the code: another step at position 1
        ctx.step(charge)
        ctx.sleep(3600)

    durable.registry["wf.changed"] = v2
    assert activate(durable, "nd-1") == "failed"
    try:
        durable.run("nd-1").result(timeout=1)
    except WorkflowFailed as exc:
        assert "step 1" in exc.error
        assert "task t.charge2" in exc.error and "task t.reserve" in exc.error
    else:
        raise AssertionError("the changed workflow should have failed")
    (row,) = query(
        database_url, "SELECT status FROM durable_steps WHERE workflow_id = 'nd-1' AND seq = 1"
    )
    assert row.status == "completed"  # the history is left intact


class _WatchedBeat(Beat):
    """A beat that counts the timers its sweep fired (overdue in PostgreSQL, not indexed)."""

    swept = 0

    def sweep(self) -> None:
        before = self.stats.timers_fired
        super().sweep()
        self.swept += self.stats.timers_fired - before


def test_timers_survive_a_redis_flush(database_url: str, prefix: str) -> None:
    clean_tables(database_url)
    url, stop = start_private_redis()
    try:
        app, durable = make_app(database_url, url, prefix, redispatch_after=1)

        @durable.workflow("wf.nap")
        def wf(ctx: Any) -> str:
            ctx.sleep(5)
            return "awake"

        client = redis.Redis.from_url(url)
        beat = _WatchedBeat(durable, sweep_interval=0.2)
        thread = Background(beat.run)
        try:
            # The beat's first start builds the (empty) index; then the timer is indexed.
            wait_until(lambda: beat.stats.index_rebuilds == 1, what="the first index build")
            with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
                run = durable.start("wf.nap", workflow_id="nap-1")
                wait_until(lambda: client.zcard(f"{prefix}:timers") == 1, what="the timer")
                client.flushall()  # Redis restarted with nothing on disk
                # The running beat sees the index gone and rebuilds it from PostgreSQL,
                # with the timer at its fire time, before that time comes.
                (timer,) = query(
                    database_url,
                    "SELECT id, fire_at FROM durable_timers WHERE workflow_id = 'nap-1'",
                )
                wait_until(lambda: beat.stats.index_rebuilds == 2, what="the index rebuild")
                score = client.zscore(f"{prefix}:timers", str(timer.id))
                assert score == timer.fire_at.timestamp()
                assert run.result(timeout=30) == "awake"
        finally:
            beat.stopping.set()
            thread.join()
        # Fired from the rebuilt index, not by the sweep of timers overdue in PostgreSQL.
        assert (beat.stats.timers_fired, beat.swept) == (1, 0)
        (timer,) = query(
            database_url, "SELECT fired_at FROM durable_timers WHERE workflow_id = 'nap-1'"
        )
        assert timer.fired_at is not None
    finally:
        stop()


def _statements_during(database_url: str, fn: Any) -> list[str]:
    seen: list[str] = []
    engines = store_engine.engines(database_url)

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    # The step path's claim and settle go straight to the driver: counted by their hook.
    stop_counting = on_statement(lambda clause, seconds: record(None, None, clause.text))
    try:
        fn()
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)
        stop_counting()
    return seen


def test_replay_loads_history_in_one_query(durable: Durable, database_url: str) -> None:
    def bump(i: int) -> int:
        return i + 1

    @durable.workflow("wf.long")
    def wf(ctx: Any, n: int) -> None:
        for i in range(n):
            ctx.step(bump, i, local=True)
        ctx.sleep(3600)

    counts = {}
    for n in (5, 60):
        wid = f"long-{n}"
        durable.start("wf.long", n, workflow_id=wid)
        assert activate(durable, wid) == "suspended"  # runs the local steps, parks at sleep
        statements = _statements_during(database_url, lambda wid=wid: activate(durable, wid))
        reading_steps = [s for s in statements if "durable_steps" in s]
        assert len(reading_steps) == 1, reading_steps
        counts[n] = len(statements)
    assert counts[5] == counts[60] == 2  # acquire-and-load, release


def test_no_wake_up_is_lost_when_two_steps_settle_at_once(
    durable: Durable, app: Celery, database_url: str
) -> None:
    """A settle that waited for another settle's row lock must not release on its read."""
    from durable.store import runs as run_queries
    from durable.store import steps as step_queries

    @durable.workflow("wf.pair")
    def wf(ctx: Any) -> None:
        ctx.sleep(3600)

    durable.start("wf.pair", workflow_id="pair-1")
    engine = store_engine.get_engine(database_url)
    with durable.connect() as conn:
        for seq in (1, 2):
            schedule_step(conn, "pair-1", seq, "t.part", "[]", "{}", "{}")
            assert step_queries.claim_step(conn, "pair-1", seq, f"w{seq}#1", 30) is not None
    holder = engine.connect()
    holder_tx = holder.begin()
    step_queries.settle_step(holder, "pair-1", 1, result='"one"')  # locks the run's row
    outcome: dict[str, Any] = {}

    def settle_two() -> None:
        with durable.connect() as conn:
            outcome["settled"] = step_queries.settle_step(
                conn, "pair-1", 2, result='"two"', owner="B#1", ttl=30, acquire=True
            )

    waiter = Background(settle_two)
    wait_until(
        lambda: query(
            database_url,
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            " AND datname = current_database()",
        ),
        what="the second settle to wait for the row lock",
    )
    holder_tx.commit()
    holder.close()
    waiter.join(10)
    leased = outcome["settled"].activation
    assert leased is not None
    seen = {s.seq: s.status for s in leased.steps}
    assert seen[1] == "started"  # its snapshot predates the first settle's commit ...
    with durable.connect() as conn:
        # ... so releasing on it must fail, and the activation must read again.
        assert not run_queries.release(conn, "pair-1", "B#1", leased.wake_seq)


def test_a_timer_fired_by_one_beat_is_not_fired_again_by_another(
    durable: Durable, app: Celery, worker: Any, database_url: str, redis_url: str, prefix: str
) -> None:
    """The Redis claim keeps two beats' index paths apart; PostgreSQL's gate (a timer fires
    while ``fired_at`` is null) keeps one beat's sweep of overdue timers apart from the
    other's index. Here each beat in turn fires a batch by its sweep, and the other then
    claims the same timers from the index and must fire none of them."""
    _, other = make_app(database_url, redis_url, prefix)
    first, second = Beat(durable), Beat(other)

    @durable.workflow("wf.doze")
    def wf(ctx: Any) -> str:
        ctx.sleep(0.2)
        return "awake"

    def overdue_batch(batch: str) -> list[Any]:
        runs = [durable.start("wf.doze", workflow_id=f"{batch}-{i}") for i in range(10)]
        wait_until(
            lambda: (
                query(
                    database_url,
                    "SELECT count(*) AS n FROM durable_timers WHERE workflow_id LIKE :batch"
                    " AND fire_at < now() - interval '1.5 seconds'",
                    batch=f"{batch}-%",
                )[0].n
                == 10
            ),
            what="the batch's timers to be overdue",
        )
        # Still in the index, due: the claim there would fire them but for the gate.
        assert durable.timer_index.size() == 10
        return runs

    for batch, sweeping, claiming in (("a", first, second), ("b", second, first)):
        runs = overdue_batch(batch)
        sweeping.sweep()
        assert durable.timer_index.size() == 10
        assert claiming.fire_due() == 0
        assert durable.timer_index.size() == 0
        assert [run.result(timeout=30) for run in runs] == ["awake"] * 10
    assert (first.stats.timers_fired, second.stats.timers_fired) == (10, 10)
    fired = query(
        database_url,
        "SELECT workflow_id, count(*) AS n FROM durable_history "
        "WHERE event = 'timer fired' GROUP BY workflow_id",
    )
    assert len(fired) == 20 and all(row.n == 1 for row in fired), fired
