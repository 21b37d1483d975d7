"""Imported ``beat_schedule`` entries keep their options: ``countdown``, ``expires``, the task's
own retry options (or a ``durable_retry`` policy), and the task learns its fire time; against
real PostgreSQL, Redis and workers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from durable import Durable, RetryPolicy, current_step
from durable.beat import Beat
from durable.builtin_workflows import TASK_WORKFLOW
from durable.cadence import fire_id
from durable.store import engine as store_engine
from tests.conftest import Background, query, wait_until


class Flaky(Exception):
    """Raised by ``shop.flaky`` until its third attempt."""


@pytest.fixture
def shop(
    durable_app: tuple[Celery, Durable], database_url: str, redis_url: str, prefix: str
) -> Iterator[tuple[Celery, Durable]]:
    """The test's app with tasks that count their attempts (``<prefix>:count:<task>``)."""
    with store_engine.autocommit(database_url).connect() as conn:
        conn.exec_driver_sql("TRUNCATE durable_schedules")
    app, durable = durable_app
    client = redis.Redis.from_url(redis_url)

    def count(name: str) -> int:
        return int(client.incr(f"{prefix}:count:{name}"))

    @app.task(name="shop.stamp", shared=False)
    def stamp() -> list[Any]:
        count("stamp")
        step = current_step()
        fired = step.fire_time
        return [step.schedule, fired.isoformat() if fired else None, step.idempotency_key]

    @app.task(
        name="shop.flaky",
        shared=False,
        autoretry_for=(Flaky,),
        max_retries=2,
        default_retry_delay=0.2,
    )
    def flaky() -> int:
        attempt = count("flaky")
        if attempt < 3:
            raise Flaky(f"attempt {attempt}")
        return attempt

    yield app, durable
    with store_engine.autocommit(database_url).connect() as conn:
        conn.exec_driver_sql("TRUNCATE durable_schedules")
    client.close()


def counted(redis_url: str, prefix: str, name: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.get(f"{prefix}:count:{name}") or 0)
    finally:
        client.close()


@contextmanager
def beating(durable: Durable, task: str, **options: Any) -> Iterator[None]:
    """A beat (timers, sweep) that imported the app's ``beat_schedule``: the entry ``job``."""
    entry: dict[str, Any] = {"task": task, "schedule": timedelta(hours=1)}
    if options:
        entry["options"] = options
    durable.app.conf.beat_schedule = {"job": entry}
    beat = Beat(durable, sweep_interval=0.5)
    thread = Background(beat.run)
    try:
        wait_until(lambda: [s.name for s in durable.schedules.list()] == ["job"], timeout=10)
        yield
    finally:
        beat.stopping.set()
        thread.join()


def fire(durable: Durable, at: datetime) -> str:
    """Start the run of schedule ``job``'s fire at ``at``, as the beat's leader does."""
    info = durable.schedules.get("job")
    return durable.start(info.workflow, *info.args, workflow_id=fire_id("job", at)).id


def step_row(database_url: str, workflow_id: str) -> Any:
    (row,) = query(
        database_url,
        "SELECT status, attempts, error, started_at FROM durable_steps WHERE workflow_id = :w",
        w=workflow_id,
    )
    return row


def test_an_imported_task_reads_its_fire_time_from_current_step(
    shop: tuple[Celery, Durable], worker: Any
) -> None:
    _, durable = shop
    with beating(durable, "shop.stamp"):
        at = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
        run = durable.run(fire(durable, at))
        assert run.result(timeout=20) == ["job", at.isoformat(), f"{run.id}:1"]


def test_countdown_starts_the_step_that_long_after_the_fire_time(
    shop: tuple[Celery, Durable], worker: Any, database_url: str
) -> None:
    _, durable = shop
    with beating(durable, "shop.stamp", countdown=2):
        at = datetime.now(UTC).replace(microsecond=0)
        run = durable.run(fire(durable, at))
        assert run.result(timeout=20)[1] == at.isoformat()
        kinds = query(
            database_url,
            "SELECT kind FROM durable_steps WHERE workflow_id = :w ORDER BY seq",
            w=run.id,
        )
        assert [k.kind for k in kinds] == ["sleep", "task"]  # a durable wait, not a broker ETA
        (started,) = query(
            database_url,
            "SELECT started_at FROM durable_steps WHERE workflow_id = :w AND kind = 'task'",
            w=run.id,
        )
        assert started.started_at >= at + timedelta(seconds=2)


def test_a_fire_started_past_its_expiry_does_not_run_the_task(
    shop: tuple[Celery, Durable], worker: Any, database_url: str, redis_url: str, prefix: str
) -> None:
    _, durable = shop
    with beating(durable, "shop.stamp", expires=30):
        at = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)  # a late catch-up
        run = durable.run(fire(durable, at))
        wait_until(lambda: run.status() == "failed", what="the expired run to fail")
        (row,) = query(database_url, "SELECT error FROM durable_workflows WHERE id = :w", w=run.id)
        expiry = (at + timedelta(seconds=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert f"TaskExpired: task shop.stamp expired: not started by {expiry}" in row.error
        assert (
            query(database_url, "SELECT 1 FROM durable_steps WHERE workflow_id = :w", w=run.id)
            == []
        )
        assert counted(redis_url, prefix, "stamp") == 0


def test_a_step_queued_past_its_expiry_is_revoked_by_the_worker_and_fails_for_good(
    shop: tuple[Celery, Durable], database_url: str, redis_url: str, prefix: str
) -> None:
    app, durable = shop
    with beating(durable, "shop.stamp", expires=2, queue="slow"):
        kw: dict[str, Any] = {"pool": "threads", "perform_ping_check": False, "loglevel": "WARNING"}
        at = datetime.now(UTC).replace(microsecond=0)
        with start_worker(app, **kw):  # runs the activation; nobody consumes "slow" yet
            run = durable.run(fire(durable, at))
            wait_until(lambda: _steps(database_url, run.id), what="the step to be sent")
        wait_until(lambda: datetime.now(UTC) > at + timedelta(seconds=2.5), timeout=5)
        with start_worker(app, queues=["celery", "slow"], **kw):
            wait_until(
                lambda: run.status() == "failed", timeout=20, what="the expired step to fail"
            )
        step = step_row(database_url, run.id)
        assert (step.status, step.attempts) == ("failed", 1)
        assert "TaskExpired: task shop.stamp expired" in step.error
        assert counted(redis_url, prefix, "stamp") == 0  # the body never ran


def _steps(database_url: str, workflow_id: str) -> list[Any]:
    return query(database_url, "SELECT 1 FROM durable_steps WHERE workflow_id = :w", w=workflow_id)


def test_an_imported_task_keeps_its_own_retry_options(
    shop: tuple[Celery, Durable], worker: Any, database_url: str
) -> None:
    _, durable = shop
    with beating(durable, "shop.flaky"):
        run = durable.run(fire(durable, datetime.now(UTC).replace(microsecond=0)))
        assert run.result(timeout=20) == 3  # autoretry_for, max_retries=2: a third attempt
        step = step_row(database_url, run.id)
        assert (step.status, step.attempts) == ("completed", 3)
        retries = query(
            database_url,
            "SELECT count(*) AS n FROM durable_timers WHERE workflow_id = :w AND purpose = 'retry'",
            w=run.id,
        )
        assert retries[0].n == 2  # each wait a durable timer


def test_a_durable_retry_option_wins_over_the_task_retry_options(
    shop: tuple[Celery, Durable], worker: Any, database_url: str
) -> None:
    _, durable = shop
    with beating(durable, "shop.flaky", durable_retry=RetryPolicy(max_attempts=1)):
        run = durable.run(fire(durable, datetime.now(UTC).replace(microsecond=0)))
        wait_until(lambda: run.status() == "failed", what="the run to fail on its first attempt")
        step = step_row(database_url, run.id)
        assert (step.status, step.attempts) == ("failed", 1)
        assert "Flaky: attempt 1" in step.error


def test_import_stores_moments_and_durations_as_json_and_reports_bad_options(
    shop: tuple[Celery, Durable],
) -> None:
    _, durable = shop
    until = datetime(2030, 1, 1, 3, tzinfo=UTC)
    entries: dict[str, Any] = {
        "good": {
            "task": "shop.stamp",
            "schedule": 60,
            "options": {"expires": until, "countdown": timedelta(seconds=5), "queue": "q"},
        },
        "bad": {"task": "shop.stamp", "schedule": 60, "options": {"expires": "soon"}},
    }
    report = durable.schedules.import_beat_schedule(entries)
    assert report.added == ["good"]
    assert report.problems == [
        "beat_schedule entry 'bad': options: expires must be seconds or a datetime"
    ]
    assert durable.schedules.get("good").args == [
        "shop.stamp",
        [],
        {},
        {"expires": until.isoformat(), "countdown": 5.0, "queue": "q"},
    ]
    assert durable.schedules.get("good").workflow == TASK_WORKFLOW
