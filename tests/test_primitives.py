"""Signals, events, cancellation, timeouts, parallel steps, child workflows, patching."""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy import text

from durable import (
    Durable,
    SignalTimeout,
    StepFailed,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowNotFound,
    WorkflowNotRunning,
    current_step,
)
from durable.activation import activate
from tests.conftest import HISTORY_ROWS, query, wait_until
from tests.store_helpers import schedule_step


def _bump(client: redis.Redis, prefix: str, key: str) -> int:
    return int(client.incr(f"{prefix}:count:{key}"))


def test_signals_are_kept_and_delivered_once_in_order(
    durable: Durable, app: Celery, database_url: str
) -> None:
    @durable.workflow("wf.signals")
    def wf(ctx: Any) -> list[Any]:
        ctx.set_event("stage", "waiting")
        first = ctx.wait_for_signal("item")
        second = ctx.wait_for_signal("item")
        other = ctx.wait_for_signal("other")
        return [first, second, other]

    # Sent before the run waits (and before it starts running: no worker yet), so that
    # both signals of a name are there when the first wait takes one: kept, in order.
    run = durable.start("wf.signals", workflow_id="sig-1")
    durable.signal("sig-1", "item", {"n": 1})
    durable.signal("sig-1", "other", "x")
    durable.signal("sig-1", "item", {"n": 2})
    with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
        assert run.result(timeout=20) == [{"n": 1}, {"n": 2}, "x"]
    rows = query(
        database_url,
        "SELECT name, consumed_seq FROM durable_signals WHERE workflow_id = 'sig-1' ORDER BY id",
    )
    assert [(r.name, r.consumed_seq) for r in rows] == [("item", 2), ("other", 4), ("item", 3)]
    assert durable.get_event("sig-1", "stage") == "waiting"


def test_signal_wait_times_out(durable: Durable, worker: Any, beat: Any) -> None:
    @durable.workflow("wf.sig_timeout")
    def wf(ctx: Any) -> str:
        try:
            return str(ctx.wait_for_signal("approved", timeout=timedelta(seconds=0.5)))
        except SignalTimeout as exc:
            return f"timed out waiting for {exc.name}"

    run = durable.start("wf.sig_timeout", workflow_id="sigto-1")
    assert run.result(timeout=20) == "timed out waiting for approved"


def test_signal_to_unknown_or_finished_workflow_is_an_error(durable: Durable, worker: Any) -> None:
    @durable.workflow("wf.quick")
    def wf(ctx: Any) -> int:
        return 1

    with pytest.raises(WorkflowNotFound):
        durable.signal("no-such-run", "x", 1)
    durable.start("wf.quick", workflow_id="quick-1").result(timeout=20)
    with pytest.raises(WorkflowNotRunning) as info:
        durable.signal("quick-1", "x", 1)
    assert "already completed" in str(info.value)
    with pytest.raises(WorkflowNotRunning):
        durable.cancel("quick-1")


def test_get_event_waits_for_the_key(durable: Durable, worker: Any) -> None:
    @durable.workflow("wf.events")
    def wf(ctx: Any) -> None:
        ctx.wait_for_signal("go")
        ctx.set_event("status", {"stage": "charged"})
        ctx.set_event("status", {"stage": "shipped"})

    run = durable.start("wf.events", workflow_id="ev-1")
    assert durable.get_event("ev-1", "status", timeout=0.2) is None
    durable.signal("ev-1", "go")
    assert durable.get_event("ev-1", "status", timeout=20) is not None
    run.result(timeout=20)
    assert durable.get_event("ev-1", "status") == {"stage": "shipped"}
    with pytest.raises(WorkflowNotFound):
        durable.get_event("nope", "status")


def test_cancel_during_a_sleep_runs_compensation(
    app: Celery,
    durable: Durable,
    worker: Any,
    beat: Any,
    redis_url: str,
    prefix: str,
    database_url: str,
) -> None:
    client = redis.Redis.from_url(redis_url)
    compensated = threading.Event()

    @app.task(name="t.release_stock", shared=False)
    def release_stock() -> str:
        _bump(client, prefix, "release")
        assert compensated.wait(20)  # held while the test looks at the timer
        return "released"

    @durable.workflow("wf.cancel_sleep")
    def wf(ctx: Any) -> str:
        try:
            ctx.sleep(timedelta(days=30))
        except WorkflowCancelled:
            ctx.step(release_stock)
            raise
        return "slept"

    run = durable.start("wf.cancel_sleep", workflow_id="cancel-1")
    wait_until(
        lambda: query(
            database_url,
            "SELECT 1 FROM durable_steps WHERE workflow_id = 'cancel-1' AND kind = 'sleep'",
        ),
        what="sleep",
    )
    durable.cancel("cancel-1")
    try:
        wait_until(lambda: client.get(f"{prefix}:count:release"), what="the compensation")
        # Retired when the cancellation was delivered at the sleep, not only when the run
        # ends: the 30-day timer will never fire, even while the compensation runs.
        (timer,) = query(
            database_url,
            "SELECT id, fired_at FROM durable_timers WHERE workflow_id = 'cancel-1'",
        )
        assert timer.fired_at is not None
        assert run.status() == "running"
    finally:
        compensated.set()
    with pytest.raises(WorkflowCancelled):
        run.result(timeout=20)
    assert run.status() == "cancelled"
    assert int(client.get(f"{prefix}:count:release") or 0) == 1
    # Retired, not fired: even an index entry that says it is due now fires nothing.
    durable.timer_index.add(timer.id, 0.0)
    member = (f"{prefix}:timers", str(timer.id))
    wait_until(lambda: client.zscore(*member) is None, what="the beat to claim the entry")
    events = [
        r.event
        for r in query(
            database_url, "SELECT event FROM " + HISTORY_ROWS + " WHERE workflow_id = 'cancel-1'"
        )
    ]
    assert "timer fired" not in events and "cancelled" in events, events
    steps = query(
        database_url,
        "SELECT seq, kind, status FROM durable_steps WHERE workflow_id = 'cancel-1' ORDER BY seq",
    )
    assert [(s.seq, s.kind, s.status) for s in steps] == [
        (1, "sleep", "cancelled"),
        (2, "task", "completed"),
    ]


def test_cancel_lets_a_running_step_finish_and_records_its_result(
    app: Celery, durable: Durable, worker: Any, redis_url: str, prefix: str, database_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)

    @app.task(name="t.slow_charge", shared=False)
    def slow_charge() -> str:
        _bump(client, prefix, "charge-started")
        time.sleep(1.5)
        return "charged"

    @durable.workflow("wf.cancel_step")
    def wf(ctx: Any) -> str:
        try:
            return str(ctx.step(slow_charge))
        except WorkflowCancelled:
            return "compensated"

    run = durable.start("wf.cancel_step", workflow_id="cancel-2")
    wait_until(lambda: client.get(f"{prefix}:count:charge-started"), what="the step")
    durable.cancel("cancel-2")
    with pytest.raises(WorkflowCancelled):
        run.result(timeout=20)
    wait_until(
        lambda: query(
            database_url,
            "SELECT 1 FROM durable_steps WHERE workflow_id = "
            "'cancel-2' AND seq = 1 AND status = 'completed'",
        ),
        what="result",
    )
    (step,) = query(
        database_url, "SELECT result FROM durable_steps WHERE workflow_id = 'cancel-2' AND seq = 1"
    )
    assert step.result == "charged"
    assert (run.status(), int(client.get(f"{prefix}:count:charge-started") or 0)) == (
        "cancelled",
        1,
    )


def test_parallel_steps_return_in_order_and_fail_after_the_others_settle(
    app: Celery, durable: Durable, worker: Any, redis_url: str, prefix: str, database_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)

    @app.task(name="t.square", shared=False)
    def square(x: int) -> int:
        _bump(client, prefix, f"square:{current_step().idempotency_key}")
        if x < 0:
            raise ValueError(f"negative {x}")
        time.sleep(0.05 * (5 - x % 5))  # finish out of order
        return x * x

    @durable.workflow("wf.fanout")
    def wf(ctx: Any, xs: list[int]) -> Any:
        try:
            return ctx.map(square, xs)
        except StepFailed as exc:
            return {"failed": exc.step, "error": exc.error}

    assert durable.start("wf.fanout", [1, 2, 3, 4, 5], workflow_id="fan-1").result(timeout=20) == [
        1,
        4,
        9,
        16,
        25,
    ]
    assert durable.start("wf.fanout", [1, -2, 3, -4], workflow_id="fan-2").result(timeout=20) == {
        "failed": 2,
        "error": "ValueError: negative -2",
    }
    rows = query(
        database_url,
        "SELECT seq, status FROM durable_steps WHERE workflow_id = 'fan-2' ORDER BY seq",
    )
    assert [r.status for r in rows] == ["completed", "failed", "completed", "failed"]
    assert all(int(client.get(f"{prefix}:count:square:fan-1:{i}") or 0) == 1 for i in range(1, 6))


def test_child_workflows(
    app: Celery, durable: Durable, worker: Any, beat: Any, database_url: str
) -> None:
    @app.task(name="t.double", shared=False)
    def double(x: int) -> int:
        return 2 * x

    @durable.workflow("wf.child")
    def child(ctx: Any, x: int) -> int:
        if x < 0:
            raise ValueError("negative input")
        return int(ctx.step(double, x))

    @durable.workflow("wf.sleepy_child")
    def sleepy_child(ctx: Any) -> None:
        ctx.sleep(3600)

    @durable.workflow("wf.parent")
    def parent(ctx: Any, x: int) -> Any:
        try:
            return ctx.child("wf.child", x) + ctx.child(child, x, workflow_id=f"named-{x}")
        except StepFailed as exc:
            return f"child failed: {exc.error}"

    @durable.workflow("wf.waiting_parent")
    def waiting_parent(ctx: Any) -> None:
        ctx.child("wf.sleepy_child")

    assert durable.start("wf.parent", 5, workflow_id="par-1").result(timeout=20) == 20
    assert durable.run("par-1/1").result(timeout=1) == 10
    assert durable.run("named-5").status() == "completed"
    failed = durable.start("wf.parent", -1, workflow_id="par-2").result(timeout=20)
    assert failed.startswith("child failed: failed: ValueError: negative input")
    run = durable.start("wf.waiting_parent", workflow_id="par-3")
    wait_until(
        lambda: query(
            database_url,
            "SELECT 1 FROM durable_steps WHERE workflow_id = 'par-3/1' AND kind = 'sleep'",
        ),
        what="the child's sleep",
    )
    durable.cancel("par-3")
    with pytest.raises(WorkflowCancelled):
        run.result(timeout=20)
    wait_until(lambda: durable.run("par-3/1").status() == "cancelled", what="child cancelled")


def test_patched_keeps_in_flight_runs_on_the_old_path(
    app: Celery, durable: Durable, worker: Any
) -> None:
    @app.task(name="t.email", shared=False)
    def email() -> str:
        return "email"

    @app.task(name="t.sms", shared=False)
    def sms() -> str:
        return "sms"

    @durable.workflow("wf.versioned")
    def v1(ctx: Any) -> list[str]:
        sent = ctx.step(email)
        ctx.wait_for_signal("done")
        return [sent]

    old = durable.start("wf.versioned", workflow_id="ver-old")
    wait_until(
        lambda: (
            durable.run("ver-old").status() == "running"
            and activate(durable, "ver-old") == "suspended"
        ),
        what="old run waiting",
    )

    def v2(ctx: Any) -> list[str]:  # deployed while ver-old waits
        sent = ctx.step(sms) if ctx.patched("use-sms") else ctx.step(email)
        ctx.wait_for_signal("done")
        later = "new-late" if ctx.patched("late-change") else "old-late"
        return [sent, later]

    durable.registry["wf.versioned"] = v2
    new = durable.start("wf.versioned", workflow_id="ver-new")
    durable.signal("ver-old", "done")
    durable.signal("ver-new", "done")
    assert old.result(timeout=20) == ["email", "new-late"]
    assert new.result(timeout=20) == ["sms", "new-late"]


def test_step_timeout_fails_the_attempt(
    app: Celery, durable: Durable, worker: Any, beat: Any
) -> None:
    @app.task(name="t.hang", shared=False)
    def hang() -> str:
        time.sleep(4)
        return "late"

    @durable.workflow("wf.step_timeout")
    def wf(ctx: Any) -> str:
        try:
            return str(ctx.step(hang, timeout=timedelta(seconds=0.5)))
        except StepFailed as exc:
            return exc.error

    result = durable.start("wf.step_timeout", workflow_id="sto-1").result(timeout=20)
    assert result.startswith("TimeoutError: attempt 1 ran past its timeout")


def test_execution_timeout_fails_the_run(durable: Durable, worker: Any, beat: Any) -> None:
    @durable.workflow("wf.exec_timeout", execution_timeout=timedelta(seconds=1))
    def wf(ctx: Any) -> None:
        ctx.sleep(3600)

    run = durable.start("wf.exec_timeout", workflow_id="eto-1")
    with pytest.raises(WorkflowFailed) as info:
        run.result(timeout=20)
    assert info.value.error == "execution timeout exceeded"


def test_cancel_inside_a_parallel_batch_then_compensate(
    app: Celery, durable: Durable, worker: Any, redis_url: str, prefix: str, database_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)

    @app.task(name="t.part_slow", shared=False)
    def part(i: int) -> int:
        _bump(client, prefix, "part-started")
        time.sleep(1.0)
        return i

    @app.task(name="t.undo", shared=False)
    def undo() -> str:
        return "undone"

    @durable.workflow("wf.cancel_batch")
    def wf(ctx: Any) -> Any:
        try:
            return ctx.map(part, [1, 2, 3, 4])
        except WorkflowCancelled:
            return ctx.step(undo)

    app.conf.worker_prefetch_multiplier = 1
    run = durable.start("wf.cancel_batch", workflow_id="cb-1")
    wait_until(lambda: client.get(f"{prefix}:count:part-started"), what="the batch")
    durable.cancel("cb-1")
    with pytest.raises(WorkflowCancelled):
        run.result(timeout=20)
    rows = query(
        database_url,
        "SELECT seq, name, status FROM durable_steps WHERE workflow_id = 'cb-1' ORDER BY seq",
    )
    assert rows[-1].name == "t.undo" and rows[-1].status == "completed"
    assert rows[-1].seq == 5  # compensation comes after every position of the batch
    assert not [r for r in rows if r.status in ("scheduled", "waiting", "ready")]


def test_map_keeps_a_partial_signatures_arguments(
    app: Celery, durable: Durable, worker: Any
) -> None:
    @app.task(name="t.summarise", shared=False)
    def summarise(model: str, text: str) -> str:
        return f"{model}:{text}"

    @durable.workflow("wf.map_partial")
    def wf(ctx: Any) -> list[str]:
        return list(ctx.map(summarise.s("model-x"), ["a", "b"]))

    run = durable.start("wf.map_partial", workflow_id="mp-1")
    assert run.result(timeout=20) == ["model-x:a", "model-x:b"]


def test_caught_non_determinism_still_fails_the_run(
    app: Celery, durable: Durable, worker: Any, database_url: str
) -> None:
    @app.task(name="t.old_step", shared=False)
    def old_step() -> str:
        return "old"

    @app.task(name="t.new_step", shared=False)
    def new_step() -> str:
        return "new"

    @durable.workflow("wf.swallow")
    def v1(ctx: Any) -> None:
        ctx.step(old_step)
        ctx.wait_for_signal("go")

    durable.start("wf.swallow", workflow_id="sw-1")
    wait_until(
        lambda: query(
            database_url,
            "SELECT 1 FROM durable_steps WHERE workflow_id = 'sw-1' AND kind = 'signal'",
        ),
        what="the wait",
    )

    def v2(ctx: Any) -> str:
        with contextlib.suppress(Exception):  # a broad except must not hide a changed history
            ctx.step(new_step)
        return "done"

    durable.registry["wf.swallow"] = v2
    durable.signal("sw-1", "go")
    with pytest.raises(WorkflowFailed) as info:
        durable.run("sw-1").result(timeout=20)
    assert "non-determinism" in info.value.error and "t.old_step" in info.value.error


def test_child_problems_fail_the_parent_clearly(durable: Durable, worker: Any) -> None:
    @durable.workflow("wf.leaf")
    def leaf(ctx: Any) -> str:
        return "leaf"

    @durable.workflow("wf.bad_child_name")
    def bad_name(ctx: Any) -> None:
        ctx.child("wf.not_registered")

    @durable.workflow("wf.taken_child_id")
    def taken(ctx: Any) -> None:
        ctx.child("wf.leaf", workflow_id="leaf-existing")

    durable.start("wf.leaf", workflow_id="leaf-existing").result(timeout=20)
    with pytest.raises(WorkflowFailed) as info:
        durable.start("wf.bad_child_name", workflow_id="bc-1").result(timeout=20)
    assert "unknown workflow 'wf.not_registered'" in info.value.error
    with pytest.raises(WorkflowFailed) as info:
        durable.start("wf.taken_child_id", workflow_id="bc-2").result(timeout=20)
    assert "leaf-existing" in info.value.error


def test_a_late_result_of_a_timed_out_attempt_is_dropped(
    durable: Durable, database_url: str
) -> None:
    from durable.store import steps as step_queries

    @durable.workflow("wf.attempts")
    def wf(ctx: Any) -> None:
        return None

    durable.start("wf.attempts", workflow_id="att-1")
    with durable.connect() as conn:
        schedule_step(conn, "att-1", 1, "t.any", "[]", "{}", "{}")
        first = step_queries.claim_step(conn, "att-1", 1, "w1#1", 30)
        assert first is not None and first.attempt == 1
        assert step_queries.schedule_retry(conn, "att-1", 1, "TimeoutError", 0) is not None
        conn.execute(
            text("UPDATE durable_steps SET status = 'scheduled' WHERE workflow_id = 'att-1'")
        )
        second = step_queries.claim_step(conn, "att-1", 1, "w2#1", 30)
        assert second is not None and second.attempt == 2
        late = step_queries.settle_step(conn, "att-1", 1, result='"late"', attempt=1)
        assert not late.settled
        assert step_queries.settle_step(conn, "att-1", 1, result='"on time"', attempt=2).settled
    (row,) = query(database_url, "SELECT result FROM durable_steps WHERE workflow_id = 'att-1'")
    assert row.result == "on time"
