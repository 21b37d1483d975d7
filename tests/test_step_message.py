"""A step is its task's own Celery message: what the task declares holds inside a workflow.

In-process workers where Celery supports the option on its threads pool, a real prefork
worker for time limits.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals
from celery.contrib.testing.worker import start_worker

from durable import Durable, RetryPolicy, StepFailed
from durable.beat import Beat
from tests.apps.crash_app import build
from tests.conftest import ROOT, Workers, clean_keys, clean_tables, make_app, query, wait_until


class Declined(Exception):
    pass


class Recorder:
    """What the tasks saw, appended from the worker's threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[dict[str, Any]] = []

    def add(self, **fields: Any) -> None:
        with self.lock:
            self.seen.append(fields)

    def of(self, **match: Any) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.seen if all(s.get(k) == v for k, v in match.items())]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def tasks(app: Celery, recorder: Recorder) -> dict[str, Any]:
    """Tasks defined before the worker starts, as a worker imports them."""

    @app.task(name="m.request", bind=True, shared=False)
    def request_fields(self: Any, x: int) -> int:
        recorder.add(kind="request", id=self.request.id, retries=self.request.retries, x=x)
        return x + 1

    @app.task(
        name="m.autoretry",
        bind=True,
        shared=False,
        autoretry_for=(ValueError,),
        max_retries=2,
        default_retry_delay=0.2,
    )
    def autoretry(self: Any) -> str:
        recorder.add(kind="autoretry", retries=self.request.retries, at=time.monotonic())
        raise ValueError(f"attempt {self.request.retries + 1}")

    @app.task(name="m.retry_once", bind=True, shared=False)
    def retry_once(self: Any, countdown: float) -> str:
        recorder.add(kind="retry_once", retries=self.request.retries, at=time.monotonic())
        if self.request.retries == 0:
            raise self.retry(exc=Declined("not yet"), countdown=countdown)
        return f"ok after {self.request.retries} retry"

    @app.task(name="m.exhaust", bind=True, shared=False, max_retries=1)
    def exhaust(self: Any) -> str:
        recorder.add(kind="exhaust", retries=self.request.retries)
        try:
            raise self.retry(countdown=0.1)
        except self.MaxRetriesExceededError:
            recorder.add(kind="exhausted", retries=self.request.retries)
            raise

    @app.task(name="m.limited", shared=False, rate_limit="120/m")
    def limited(i: int) -> int:
        recorder.add(kind="limited", i=i, at=time.monotonic())
        return i

    app.conf.task_annotations = {"m.annotated": {"rate_limit": "120/m"}}

    @app.task(name="m.annotated", shared=False)
    def annotated(i: int) -> int:
        recorder.add(kind="limited", i=i, at=time.monotonic())
        return i

    @app.task(name="m.policy", bind=True, shared=False, autoretry_for=(Declined,), max_retries=5)
    def policy(self: Any) -> str:
        recorder.add(kind="policy", retries=self.request.retries)
        raise Declined("no")

    return {
        "request": request_fields,
        "autoretry": autoretry,
        "retry_once": retry_once,
        "exhaust": exhaust,
        "limited": limited,
        "annotated": annotated,
        "policy": policy,
    }


@pytest.fixture
def running(app: Celery, durable: Durable, tasks: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """An in-process worker started after the tasks exist, and a beat for retry timers."""
    beat = Beat(durable, sweep_interval=0.2)
    thread = threading.Thread(target=beat.run, daemon=True)
    thread.start()
    try:
        with start_worker(
            app, pool="threads", concurrency=4, perform_ping_check=False, loglevel="WARNING"
        ):
            yield tasks
    finally:
        beat.stopping.set()
        thread.join(5)
        assert not thread.is_alive()


@pytest.fixture
def celery_signals() -> Iterator[list[tuple[str, str, Any]]]:
    """(signal, sender task's name, detail) for every task signal sent meanwhile."""
    seen: list[tuple[str, str, Any]] = []
    details = {
        "task_prerun": lambda kw: kw.get("task_id"),
        "task_postrun": lambda kw: kw.get("retval"),
        "task_success": lambda kw: kw.get("result"),
        "task_failure": lambda kw: repr(kw.get("exception")),
        "task_retry": lambda kw: str(kw.get("reason")),
    }
    handlers = {}
    for kind, detail in details.items():

        def handler(sender: Any = None, _k: str = kind, _d: Any = detail, **kw: Any) -> None:
            seen.append((_k, str(getattr(sender, "name", sender)), _d(kw)))

        handlers[kind] = handler
        getattr(signals, kind).connect(handler, weak=False)
    yield seen
    for kind, handler in handlers.items():
        getattr(signals, kind).disconnect(handler)


def of_task(seen: list[tuple[str, str, Any]], name: str, kind: str) -> list[Any]:
    return [detail for k, sender, detail in seen if sender == name and k == kind]


def test_the_step_is_the_tasks_own_message_with_its_request_and_signals(
    durable: Durable,
    running: dict[str, Any],
    recorder: Recorder,
    database_url: str,
    celery_signals: list[tuple[str, str, Any]],
) -> None:
    task = running["request"]

    @durable.workflow("m.request_wf")
    def wf(ctx: Any, x: int) -> Any:
        return ctx.step(task, x)

    assert durable.start("m.request_wf", 41, workflow_id="req-1").result(timeout=30) == 42
    [seen] = recorder.of(kind="request")
    assert seen["x"] == 41 and seen["retries"] == 0
    assert seen["id"] and seen["id"].startswith("req-1:1:")  # the message's own task id
    # Celery's signals, sent with the task as sender for the message's id.
    assert of_task(celery_signals, "m.request", "task_prerun") == [seen["id"]]
    # What Celery sees returned is the outcome, never the step's value (it is in PostgreSQL).
    # The run's end is committed before the worker returns to Celery, which signals after.
    wait_until(
        lambda: of_task(celery_signals, "m.request", "task_postrun"),
        what="Celery's task_postrun signal",
    )
    assert of_task(celery_signals, "m.request", "task_success") == ["completed"]
    assert of_task(celery_signals, "m.request", "task_postrun") == ["completed"]
    [row] = query(database_url, "SELECT result FROM durable_steps WHERE workflow_id = 'req-1'")
    assert row.result == 42


def test_a_wrapped_task_called_outside_a_workflow_is_plain_celery(
    app: Celery, running: dict[str, Any], recorder: Recorder
) -> None:
    running["request"].delay(7)
    wait_until(lambda: recorder.of(kind="request"), what="the plain call to run")
    [seen] = recorder.of(kind="request")
    assert (seen["x"], seen["retries"]) == (7, 0)
    assert seen["id"] and ":" not in seen["id"]  # Celery's own uuid, no step's id


def test_self_retry_cannot_change_a_steps_arguments(
    app: Celery, durable: Durable, worker: Any
) -> None:
    @app.task(name="m.reargue", bind=True, shared=False)
    def reargue(self: Any, x: int) -> int:
        raise self.retry(args=(x + 1,), countdown=0)

    @durable.workflow("m.reargue_wf")
    def wf(ctx: Any) -> str:
        try:
            return str(ctx.step(reargue, 1))
        except StepFailed as failed:
            return str(failed)

    result = durable.start("m.reargue_wf", workflow_id="reargue-1").result(timeout=30)
    assert "cannot change a durable step's arguments" in result


def test_autoretry_options_are_the_steps_default_policy_as_durable_timers(
    durable: Durable,
    running: dict[str, Any],
    recorder: Recorder,
    database_url: str,
    celery_signals: list[tuple[str, str, Any]],
) -> None:
    task = running["autoretry"]

    @durable.workflow("m.autoretry_wf")
    def wf(ctx: Any) -> str:
        try:
            return str(ctx.step(task))
        except StepFailed as failed:
            return f"failed: {failed}"

    result = durable.start("m.autoretry_wf", workflow_id="auto-1").result(timeout=30)
    assert "ValueError" in result and "attempt 3" in result
    # max_retries=2: three attempts, each told how many came before it.
    assert [s["retries"] for s in recorder.of(kind="autoretry")] == [0, 1, 2]
    [row] = query(
        database_url, "SELECT status, attempts FROM durable_steps WHERE workflow_id = 'auto-1'"
    )
    assert (row.status, row.attempts) == ("failed", 3)
    # The waits were durable timers, written to PostgreSQL, not broker countdowns.
    timers = query(
        database_url, "SELECT count(*) AS n FROM durable_timers WHERE workflow_id = 'auto-1'"
    )
    assert timers[0].n == 2
    # Celery saw two retries and one failure of its own task. The run's end is committed
    # before the worker returns to Celery, which sends task_failure after: wait for it.
    wait_until(
        lambda: of_task(celery_signals, "m.autoretry", "task_failure"),
        what="Celery's task_failure signal",
    )
    assert len(of_task(celery_signals, "m.autoretry", "task_retry")) == 2
    assert of_task(celery_signals, "m.autoretry", "task_failure") == ["ValueError('attempt 3')"]


def test_self_retry_countdown_is_a_durable_timer(
    durable: Durable, running: dict[str, Any], recorder: Recorder, database_url: str
) -> None:
    task = running["retry_once"]

    @durable.workflow("m.retry_wf")
    def wf(ctx: Any) -> str:
        return str(ctx.step(task, 1.0))

    before = datetime.now(UTC)
    assert durable.start("m.retry_wf", workflow_id="retry-1").result(timeout=30) == (
        "ok after 1 retry"
    )
    first, second = recorder.of(kind="retry_once")
    assert (first["retries"], second["retries"]) == (0, 1)
    assert second["at"] - first["at"] >= 1.0  # not before the countdown
    [timer] = query(
        database_url, "SELECT fire_at FROM durable_timers WHERE workflow_id = 'retry-1'"
    )
    assert (timer.fire_at - before).total_seconds() >= 1.0


def test_max_retries_exceeded_is_raised_where_celery_raises_it(
    durable: Durable, running: dict[str, Any], recorder: Recorder
) -> None:
    task = running["exhaust"]

    @durable.workflow("m.exhaust_wf")
    def wf(ctx: Any) -> str:
        try:
            return str(ctx.step(task))
        except StepFailed as failed:
            return f"failed: {failed}"

    result = durable.start("m.exhaust_wf", workflow_id="exhaust-1").result(timeout=30)
    assert "MaxRetriesExceededError" in result
    assert [s["retries"] for s in recorder.of(kind="exhaust")] == [0, 1]
    assert [s["retries"] for s in recorder.of(kind="exhausted")] == [1]


def test_a_retry_policy_given_to_the_step_wins_over_the_tasks_options(
    durable: Durable, running: dict[str, Any], recorder: Recorder
) -> None:
    task = running["policy"]

    @durable.workflow("m.policy_wf")
    def wf(ctx: Any) -> str:
        try:
            return str(ctx.step(task, retry=RetryPolicy(max_attempts=2, initial_interval=0.1)))
        except StepFailed:
            return "failed"

    assert durable.start("m.policy_wf", workflow_id="policy-1").result(timeout=30) == "failed"
    assert len(recorder.of(kind="policy")) == 2  # the policy's 2, not the task's 1 + 5


@pytest.mark.parametrize("which", ["limited", "annotated"])
def test_the_tasks_rate_limit_spaces_its_steps(
    durable: Durable, running: dict[str, Any], recorder: Recorder, which: str
) -> None:
    task = running[which]  # rate_limit on the decorator, or from task_annotations

    @durable.workflow("m.limited_wf")
    def wf(ctx: Any) -> list[int]:
        return [int(ctx.step(task, i)) for i in range(3)]

    assert durable.start("m.limited_wf", workflow_id="rate-1").result(timeout=30) == [0, 1, 2]
    at = [s["at"] for s in recorder.of(kind="limited")]
    # 120/m: one token every 0.5 s; the worker holds the next message until it has one.
    # (0.3 s at least: the worker's timers are coarse; unlimited, they come milliseconds apart)
    assert all(later - earlier >= 0.3 for earlier, later in itertools.pairwise(at))


def test_a_worker_without_durable_never_runs_the_body(
    redis_url: str,
    prefix: str,
    durable: Durable,
    app: Celery,
    worker: Any,
    counter: Any,
    tmp_path: Path,
    database_url: str,
) -> None:
    @app.task(name="m.plain", shared=False)
    def same_name(x: int) -> int:
        return x

    @durable.workflow("m.plain_wf")
    def wf(ctx: Any) -> int:
        return int(ctx.step(same_name.s(1).set(queue="plain")))

    # The workflow runs on the durable worker; its step goes to the plain worker's queue.
    env = {**os.environ, "DURABLE_REDIS_URL": redis_url, "PLAIN_PREFIX": prefix}
    workers = Workers(env, tmp_path, "tests.apps.plain_app")
    proc = workers.start("plain", concurrency=1)
    try:
        durable.start("m.plain_wf", workflow_id="plain-1")
        log = tmp_path / "plain.log"
        wait_until(
            lambda: "unexpected keyword argument 'durable_step'" in log.read_text(),
            timeout=60,
            what="the plain worker to refuse the step message",
        )
    finally:
        workers.kill(proc)
    assert counter("plain-body") == 0
    [row] = query(database_url, "SELECT status FROM durable_steps WHERE workflow_id = 'plain-1'")
    assert row.status in ("scheduled", "started")  # left to recovery, for a durable worker


@pytest.fixture
def prefork(database_url: str, redis_url: str, prefix: str, tmp_path: Path) -> Iterator[Any]:
    clean_tables(database_url)
    env = {
        **os.environ,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        "CRASH_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }
    _, durable = build(database_url, redis_url, prefix)
    workers = Workers(env, tmp_path, "tests.apps.crash_app")
    try:
        yield durable, workers
    finally:
        workers.stop_all()
        clean_keys(redis_url, prefix)


def test_the_tasks_soft_time_limit_interrupts_the_step(
    prefork: Any, redis_url: str, prefix: str
) -> None:
    from redis import Redis

    durable, workers = prefork
    workers.start("limits")
    run = durable.start("crash.limited", 3.0, workflow_id="limited-1")
    result = run.result(timeout=60)
    assert result.startswith("failed:") and "SoftTimeLimitExceeded" in result
    client = Redis.from_url(redis_url)
    assert int(client.get(f"{prefix}:count:limited-interrupted") or 0) == 1
    client.close()


def test_an_expired_step_message_fails_the_step_unrun(
    database_url: str, redis_url: str, prefix: str
) -> None:
    clean_tables(database_url)
    # Eager start: the first step's message is sent by start() itself, with no worker up.
    app, durable = make_app(database_url, redis_url, prefix, eager_start=True)
    ran: list[int] = []

    @app.task(name="m.expiring", shared=False, expires=0.5)
    def expiring() -> str:
        ran.append(1)
        return "ran"

    @durable.workflow("m.expiring_wf")
    def wf(ctx: Any) -> str:
        try:
            return str(ctx.step(expiring))
        except StepFailed as failed:
            return f"failed: {failed}"

    try:
        run = durable.start("m.expiring_wf", workflow_id="expiring-1")
        time.sleep(1.0)  # the message's expiry passes while no worker runs
        with start_worker(
            app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING"
        ):
            result = run.result(timeout=30)
    finally:
        clean_keys(redis_url, prefix)
    assert "TaskExpired" in result and "task m.expiring expired: not started by" in result
    assert ran == []
    [row] = query(
        database_url, "SELECT status, error FROM durable_steps WHERE workflow_id = 'expiring-1'"
    )
    assert row.status == "failed" and "TaskExpired" in row.error
