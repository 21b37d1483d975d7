"""End-to-end behaviour of workflows on an in-process worker and beat."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from sqlalchemy import event

from durable import (
    Durable,
    RetryPolicy,
    StepFailed,
    WorkflowFailed,
    current_step,
)
from durable.errors import ResultTimeout, WorkflowIdConflict
from durable.store import engine as store_engine
from durable.testing import TestEnv
from tests.conftest import HISTORY_ROWS, query


class CardDeclined(Exception):
    pass


def counting_tasks(app: Celery, redis_url: str, prefix: str) -> dict[str, Any]:
    """Tasks that count each run of their body in Redis, keyed by idempotency key."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def bump(key: str) -> int:
        return int(client.incr(f"{prefix}:count:{key}"))

    @app.task(name="t.add", shared=False)
    def add(x: int, y: int) -> int:
        bump(f"add:{current_step().idempotency_key}")
        return x + y

    @app.task(name="t.flaky", shared=False)
    def flaky(fail_times: int) -> str:
        key = current_step().idempotency_key
        n = bump(f"flaky:{key}")
        if n <= fail_times:
            raise RuntimeError(f"attempt {n} failed")
        return f"ok after {n}"

    @app.task(name="t.decline", shared=False)
    def decline() -> None:
        bump("decline")
        raise CardDeclined("card declined")

    @app.task(name="t.release", shared=False)
    def release(item: str) -> str:
        bump(f"release:{item}")
        return f"released {item}"

    return {"add": add, "flaky": flaky, "decline": decline, "release": release}


def test_steps_run_in_order_and_results_are_committed(
    app: Celery,
    durable: Durable,
    worker: Any,
    redis_url: str,
    prefix: str,
    counter: Any,
    database_url: str,
) -> None:
    t = counting_tasks(app, redis_url, prefix)

    @durable.workflow("wf.sum")
    def wf(ctx: Any, a: int) -> dict[str, Any]:
        x = ctx.step(t["add"], a, 1)
        y = ctx.step(t["add"].s(x, 10))
        z = ctx.step(lambda v: v * 2, y, local=True)
        return {"x": x, "y": y, "z": z, "key": None}

    run = durable.start("wf.sum", 1, workflow_id="sum-1")
    assert run.result(timeout=20) == {"x": 2, "y": 12, "z": 24, "key": None}
    assert run.status() == "completed"
    rows = query(
        database_url,
        "SELECT seq, kind, status, attempts FROM durable_steps "
        "WHERE workflow_id = 'sum-1' ORDER BY seq",
    )
    assert [(r.seq, r.kind, r.status, r.attempts) for r in rows] == [
        (1, "task", "completed", 1),
        (2, "task", "completed", 1),
        (3, "local", "completed", 1),
    ]
    assert counter("add:sum-1:1") == 1
    assert counter("add:sum-1:2") == 1


def test_start_is_idempotent_by_id(durable: Durable, app: Celery, worker: Any) -> None:
    @app.task(name="t.echo", shared=False)
    def echo(v: str) -> str:
        return v

    @durable.workflow("wf.echo")
    def wf(ctx: Any, v: str) -> str:
        return str(ctx.step(echo, v))

    first = durable.start("wf.echo", "a", workflow_id="echo-1")
    second = durable.start(wf, "b", workflow_id="echo-1")
    assert first.id == second.id == "echo-1"
    assert second.result(timeout=20) == "a"


def test_retry_policy_retries_with_durable_timers(
    app: Celery,
    durable: Durable,
    worker: Any,
    beat: Any,
    redis_url: str,
    prefix: str,
    counter: Any,
    database_url: str,
) -> None:
    t = counting_tasks(app, redis_url, prefix)

    @durable.workflow("wf.retry")
    def wf(ctx: Any) -> str:
        return str(ctx.step(t["flaky"], 2, retry=RetryPolicy(max_attempts=5, initial_interval=0.2)))

    run = durable.start("wf.retry", workflow_id="retry-1")
    assert run.result(timeout=20) == "ok after 3"
    assert counter("flaky:retry-1:1") == 3
    timers = query(
        database_url, "SELECT purpose, fired_at FROM durable_timers WHERE workflow_id = 'retry-1'"
    )
    assert [t.purpose for t in timers] == ["retry", "retry"]
    assert all(t.fired_at is not None for t in timers)
    events = [
        r.event
        for r in query(
            database_url,
            "SELECT event FROM " + HISTORY_ROWS + " WHERE workflow_id = 'retry-1' ORDER BY pos",
        )
    ]
    assert events.count("retry scheduled") == 2
    assert events[0] == "started" and events[-1] == "completed"
    # The history reads attempt by attempt, each start before its end, though only the
    # step row's current attempt is not written as rows.
    attempts = [
        (r.event, r.detail.get("attempt"))
        for r in query(
            database_url,
            "SELECT event, detail FROM " + HISTORY_ROWS + " WHERE workflow_id = 'retry-1'"
            " AND event IN ('step started', 'retry scheduled', 'step completed') ORDER BY pos",
        )
    ]
    assert attempts == [
        ("step started", 1),
        ("retry scheduled", 1),
        ("step started", 2),
        ("retry scheduled", 2),
        ("step started", 3),
        ("step completed", 3),
    ]
    written = query(
        database_url,
        "SELECT event FROM durable_history WHERE workflow_id = 'retry-1'"
        " AND event IN ('step started', 'step completed', 'step scheduled') ORDER BY id",
    )
    assert [r.event for r in written] == ["step started", "step started"]  # attempts 1, 2


def test_exhausted_step_raises_step_failed_and_workflow_compensates(
    app: Celery,
    durable: Durable,
    worker: Any,
    beat: Any,
    redis_url: str,
    prefix: str,
    counter: Any,
    database_url: str,
) -> None:
    t = counting_tasks(app, redis_url, prefix)
    policy = RetryPolicy(max_attempts=3, initial_interval=0.1, backoff=2.0)

    @durable.workflow("wf.compensate")
    def wf(ctx: Any) -> dict[str, Any]:
        try:
            ctx.step(t["flaky"], 10, retry=policy)  # fails every attempt, each retryable
        except StepFailed as exc:
            return {"released": ctx.step(t["release"], "sku-1"), "error": exc.error}
        return {"released": None, "error": None}

    result = durable.start("wf.compensate", workflow_id="comp-1").result(timeout=30)
    assert result["released"] == "released sku-1"
    assert "attempt 3 failed" in result["error"]  # the last attempt's error
    assert counter("flaky:comp-1:1") == 3  # every attempt the policy allows, no more
    assert counter("release:sku-1") == 1
    (step,) = query(
        database_url,
        "SELECT status, attempts FROM durable_steps WHERE workflow_id = 'comp-1' AND seq = 1",
    )
    assert (step.status, step.attempts) == ("failed", 3)
    timers = query(database_url, "SELECT purpose FROM durable_timers WHERE workflow_id = 'comp-1'")
    assert [row.purpose for row in timers] == ["retry", "retry"]


def test_a_non_retryable_error_fails_the_step_at_once(
    app: Celery, durable: Durable, worker: Any, beat: Any, redis_url: str, prefix: str, counter: Any
) -> None:
    t = counting_tasks(app, redis_url, prefix)

    @durable.workflow("wf.declined")
    def wf(ctx: Any) -> str:
        try:
            ctx.step(t["decline"], retry=RetryPolicy(max_attempts=4, non_retryable=(CardDeclined,)))
        except StepFailed as exc:
            return exc.error
        return "charged"

    error = durable.start("wf.declined", workflow_id="declined-1").result(timeout=20)
    assert "CardDeclined: card declined" in error
    assert counter("decline") == 1  # non-retryable: one attempt only


def test_retry_waits_follow_the_back_off_formula(
    app: Celery, durable: Durable, redis_url: str, prefix: str, counter: Any, database_url: str
) -> None:
    """Wait n (n >= 1) is ``min(initial_interval * backoff ** (n - 1), max_interval)``, each
    a durable timer; the clock is skipped past each one instead of waited for."""
    t = counting_tasks(app, redis_url, prefix)
    policy = RetryPolicy(
        max_attempts=6,
        initial_interval=timedelta(seconds=10),
        backoff=3.0,
        max_interval=timedelta(seconds=200),
    )

    @durable.workflow("wf.backoff")
    def wf(ctx: Any) -> str:
        try:
            return str(ctx.step(t["flaky"], 10, retry=policy))
        except StepFailed:
            return "gave up"

    with TestEnv(durable) as env:
        assert env.result(durable.start("wf.backoff", workflow_id="backoff-1")) == "gave up"
    assert counter("flaky:backoff-1:1") == 6
    # Each timer is written in the statement that records the failure: its fire time less
    # its creation time is the wait.
    timers = query(
        database_url,
        "SELECT purpose, extract(epoch FROM fire_at - created_at) AS wait, fired_at "
        "FROM durable_timers WHERE workflow_id = 'backoff-1' ORDER BY id",
    )
    assert [row.purpose for row in timers] == ["retry"] * 5
    assert [float(row.wait) for row in timers] == [10.0, 30.0, 90.0, 200.0, 200.0]
    assert all(row.fired_at is not None for row in timers)


def test_uncaught_step_failure_fails_the_workflow(
    app: Celery,
    durable: Durable,
    worker: Any,
    beat: Any,
    redis_url: str,
    prefix: str,
) -> None:
    t = counting_tasks(app, redis_url, prefix)

    @durable.workflow("wf.fail")
    def wf(ctx: Any) -> None:
        ctx.step(t["flaky"], 10, retry=RetryPolicy(max_attempts=2, initial_interval=0.1))

    run = durable.start("wf.fail", workflow_id="fail-1")
    with pytest.raises(WorkflowFailed) as info:
        run.result(timeout=20)
    assert "StepFailed" in info.value.error and "attempt 2 failed" in info.value.error
    assert run.status() == "failed"


def test_sleep_is_a_durable_timer(
    durable: Durable, worker: Any, beat: Any, database_url: str
) -> None:
    @durable.workflow("wf.sleep")
    def wf(ctx: Any) -> list[str]:
        before = ctx.now()
        ctx.sleep(timedelta(seconds=1))
        after = ctx.now()
        return [before.isoformat(), after.isoformat()]

    before, after = durable.start("wf.sleep", workflow_id="sleep-1").result(timeout=20)
    assert (_dt(after) - _dt(before)).total_seconds() >= 1.0
    (timer,) = query(
        database_url, "SELECT fire_at, fired_at FROM durable_timers WHERE workflow_id = 'sleep-1'"
    )
    assert timer.fired_at >= timer.fire_at


def _dt(value: str) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(value)


def test_deterministic_helpers_replay_identically(
    app: Celery, durable: Durable, worker: Any
) -> None:
    @app.task(name="t.noop", shared=False)
    def noop() -> None:
        return None

    seen: list[tuple[str, float, str]] = []

    @durable.workflow("wf.det")
    def wf(ctx: Any) -> list[Any]:
        values = (str(ctx.uuid4()), ctx.random(), ctx.now().isoformat())
        seen.append(values)
        ctx.step(noop)
        ctx.step(noop)
        return list(values)

    result = durable.start("wf.det", workflow_id="det-1").result(timeout=20)
    assert len(seen) >= 3  # one activation per step, each replaying from the top
    assert all(v == seen[0] for v in seen)
    assert result == list(seen[0])


def test_local_step_failure_retries_then_succeeds(durable: Durable, worker: Any, beat: Any) -> None:
    attempts: list[str | None] = []

    def sometimes(x: int) -> int:
        attempts.append(current_step().idempotency_key)
        if len(attempts) < 3:
            raise ValueError("not yet")
        return x + 1

    @durable.workflow("wf.local")
    def wf(ctx: Any) -> int:
        return int(
            ctx.step(
                sometimes, 1, local=True, retry=RetryPolicy(max_attempts=3, initial_interval=0.1)
            )
        )

    assert durable.start("wf.local", workflow_id="local-1").result(timeout=20) == 2
    assert attempts == ["local-1:1"] * 3


def test_result_timeout_is_a_timeout_error(durable: Durable) -> None:
    @durable.workflow("wf.never")
    def wf(ctx: Any) -> None:
        ctx.sleep(3600)

    run = durable.start("wf.never", workflow_id="never-1")  # no worker: stays running
    with pytest.raises(ResultTimeout) as info:
        run.result(timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert run.status() == "running"


def test_builtin_task_workflow_runs_a_task_by_name(
    app: Celery, durable: Durable, worker: Any
) -> None:
    @app.task(name="t.mul", shared=False)
    def mul(x: int, y: int) -> int:
        return x * y

    run = durable.start("durable.task", "t.mul", [6, 7], workflow_id="builtin-1")
    assert run.result(timeout=20) == 42


def test_durable_chain_passes_results_like_celery(
    app: Celery, durable: Durable, worker: Any, database_url: str
) -> None:
    @app.task(name="t.validate", shared=False)
    def validate(order_id: str) -> dict[str, Any]:
        return {"id": order_id, "total": 10}

    @app.task(name="t.reserve", shared=False)
    def reserve(order: dict[str, Any], warehouse: str) -> dict[str, Any]:
        return {**order, "warehouse": warehouse}

    @app.task(name="t.notify", shared=False)
    def notify(message: str) -> str:
        return message

    run = durable.chain(
        validate.s("o-1"), reserve.s("north"), notify.si("done").set(queue="celery")
    ).start(workflow_id="c-1")
    assert run.result(timeout=20) == "done"
    rows = query(
        database_url,
        "SELECT seq, name, result FROM durable_steps WHERE workflow_id = 'c-1' ORDER BY seq",
    )
    assert [(r.seq, r.name) for r in rows] == [(1, "t.validate"), (2, "t.reserve"), (3, "t.notify")]
    assert rows[1].result == {"id": "o-1", "total": 10, "warehouse": "north"}


def test_without_inline_activation_each_step_sends_an_activation(
    database_url: str, redis_url: str, prefix: str
) -> None:
    from celery.contrib.testing.worker import start_worker

    from tests.conftest import clean_keys, clean_tables, make_app

    clean_tables(database_url)
    app, durable = make_app(database_url, redis_url, prefix, inline_activation=False)

    @app.task(name="t.inc", shared=False)
    def inc(x: int) -> int:
        return x + 1

    @durable.workflow("wf.no_inline")
    def wf(ctx: Any) -> int:
        return int(ctx.step(inc, ctx.step(inc, ctx.step(inc, 0))))

    try:
        with start_worker(app, pool="threads", concurrency=2, perform_ping_check=False):
            # No beat runs: progress can only come from the activation each step sends.
            assert durable.start("wf.no_inline", workflow_id="noinl-1").result(timeout=20) == 3
    finally:
        clean_keys(redis_url, prefix)


def test_start_many_starts_runs_in_one_statement_idempotent_per_id(
    app: Celery, durable: Durable, worker: Any, beat: Any, database_url: str
) -> None:
    @app.task(name="t.double", shared=False)
    def double(x: int) -> int:
        return 2 * x

    @durable.workflow("wf.many")
    def wf(ctx: Any, x: int, plus: int = 0) -> int:
        return int(ctx.step(double, x)) + plus

    @durable.workflow("wf.many_sleep")
    def sleepy(ctx: Any, x: int) -> int:
        ctx.sleep(0)
        return x

    inserts: list[str] = []

    def record(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "INSERT INTO durable_workflows" in statement:
            inserts.append(statement)

    engines = store_engine.engines(database_url)
    for engine in engines:
        event.listen(engine, "before_cursor_execute", record)
    try:
        ids = [f"many-{i}" for i in range(20)]
        runs = durable.start_many(
            "wf.many", [(i,) for i in range(20)], workflow_ids=ids, kwargs_list=[{"plus": 1}] * 20
        )
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", record)
    assert len(inserts) == 1  # twenty runs and their first steps: one statement
    assert [r.id for r in runs] == ids
    assert [r.result(timeout=30) for r in runs] == [2 * i + 1 for i in range(20)]
    # Again, with the same ids and one new: the existing runs are returned, nothing doubled.
    again = durable.start_many("wf.many", [(5,), (7,)], workflow_ids=["many-5", "many-new"])
    assert [r.result(timeout=30) for r in again] == [11, 14]
    steps = query(
        database_url, "SELECT count(*) AS n FROM durable_steps WHERE workflow_id = 'many-5'"
    )
    assert steps[0].n == 1
    with pytest.raises(WorkflowIdConflict):
        durable.start_many("wf.many_sleep", [(1,), (2,)], workflow_ids=["many-sleep", "many-1"])
    # A first action that is not a remote step: started by an activation, as start() does.
    assert durable.run("many-sleep").result(timeout=30) == 1
