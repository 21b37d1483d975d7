"""End to end on both brokers: Redis and RabbitMQ, with Redis holding the timer index.

Each test runs once per broker. RabbitMQ is the one :func:`durable.dev.services.find_rabbitmq`
finds (``DURABLE_TEST_AMQP_URL``, else the default local port); where none answers, the
RabbitMQ runs are skipped, each under its own name and with the reason, and
``DURABLE_TEST_REQUIRE_RABBITMQ=1`` turns that into a failure. A RabbitMQ run uses a queue
and an exchange of its own on the vhost, deleted afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from kombu import Connection

from durable import Durable
from durable.beat import Beat
from durable.dev.services import find_rabbitmq
from tests.apps.rabbit_app import build
from tests.conftest import HISTORY_ROWS, Background, clean_keys, clean_tables, query, wait_until

ROOT = Path(__file__).resolve().parent.parent


def delete_queue(url: str, name: str) -> None:
    """Delete a test's queue and exchange (both named ``name``) from RabbitMQ."""
    with Connection(url) as conn:
        channel: Any = conn.default_channel  # closed with the connection
        channel.queue_delete(name)
        channel.exchange_delete(name)


@dataclass
class Broker:
    """The broker a test runs on, and the test's isolated app on it."""

    name: str
    url: str
    prefix: str
    app: Celery
    durable: Durable
    counts: redis.Redis

    def count(self, kind: str) -> int:
        """How many times the task ``kind`` ran its body."""
        return int(self.counts.get(f"{self.prefix}:count:{kind}") or 0)

    def redelivered(self) -> list[str]:
        """What each message the broker redelivered did (see ``tests/apps/rabbit_app.py``)."""
        return list(self.counts.lrange(f"{self.prefix}:redelivered", 0, -1))

    def keys(self, kind: str) -> list[str]:
        """The idempotency keys its runs saw, in order."""
        return [str(key) for key in self.counts.lrange(f"{self.prefix}:keys:{kind}", 0, -1)]


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(
    request: pytest.FixtureRequest, database_url: str, redis_url: str, prefix: str
) -> Iterator[Broker]:
    if request.param == "redis":
        url = redis_url
    else:
        url, problem = find_rabbitmq()
        if problem is not None:
            reason = (
                f"{request.node.name} not run: RabbitMQ, an optional service, is not "
                f"available (not installed, or not running): {problem}"
            )
            if os.environ.get("DURABLE_TEST_REQUIRE_RABBITMQ") == "1":
                pytest.fail(reason)
            pytest.skip(reason)  # an optional service, not installed or not running
    clean_tables(database_url)
    app, durable = build(url, database_url, redis_url, prefix)
    counts = redis.Redis.from_url(redis_url, decode_responses=True)
    beat = Beat(durable, sweep_interval=0.5)
    thread = Background(beat.run)
    try:
        yield Broker(request.param, url, prefix, app, durable, counts)
    finally:
        beat.stopping.set()
        thread.join(5)
        app.close()
        if request.param == "rabbitmq":
            delete_queue(url, prefix)
        clean_keys(redis_url, prefix)
        counts.close()


@pytest.fixture
def worker(broker: Broker) -> Iterator[None]:
    """An in-process worker (threads pool) on the test's broker."""
    # Without Celery's worker heartbeats, which are events: nothing declares the shared
    # celeryev exchange on RabbitMQ.
    with start_worker(
        broker.app,
        pool="threads",
        concurrency=4,
        perform_ping_check=False,
        loglevel="WARNING",
        without_heartbeat=True,
    ):
        yield


def test_steps_retries_and_a_sleep(broker: Broker, worker: None, database_url: str) -> None:
    run = broker.durable.start("brokers.steps", 2, 1.0, workflow_id="steps-1")

    assert run.result(timeout=60) == [5, "ok on run 3", 15]
    assert (broker.count("add"), broker.count("flaky")) == (2, 3)
    assert broker.keys("flaky") == ["steps-1:2"] * 3  # one key for every attempt
    rows = query(
        database_url,
        "SELECT seq, kind, attempts FROM durable_steps WHERE workflow_id = 'steps-1' ORDER BY seq",
    )
    assert [(r.kind, r.attempts) for r in rows] == [
        ("task", 1),
        ("task", 3),
        ("sleep", 0),
        ("task", 1),
    ]
    fired = query(
        database_url,
        "SELECT purpose FROM durable_timers WHERE workflow_id = 'steps-1' AND fired_at IS NOT NULL",
    )
    assert sorted(r.purpose for r in fired) == ["retry", "retry", "sleep"]


def test_a_signal_wakes_a_waiting_workflow(broker: Broker, worker: None) -> None:
    durable = broker.durable
    run = durable.start("brokers.signal", workflow_id="signal-1")
    wait_until(lambda: durable.get_event("signal-1", "status") == "waiting", timeout=30)
    time.sleep(0.5)  # no worker is held meanwhile: the run waits in PostgreSQL
    assert run.status() == "running"

    durable.signal("signal-1", "approved", {"by": "ann"})

    assert run.result(timeout=30) == [{"by": "ann"}, 2]
    assert durable.get_event("signal-1", "status") == "approved"


def test_a_sigkilled_worker_step_runs_again_with_the_same_key(
    broker: Broker, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "BROKER_TEST_URL": broker.url,
        "BROKER_TEST_PREFIX": broker.prefix,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        "PYTHONPATH": str(ROOT),
    }
    first = start_celery_worker("first", env, tmp_path)
    second = None
    try:
        run = broker.durable.start("brokers.kill", 60, workflow_id="kill-1")
        wait_until(lambda: broker.count("slow") == 1, timeout=60, what="the step to start")
        held = list(broker.counts.hkeys(f"{broker.prefix}:unacked"))  # Redis only
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        second = start_celery_worker("second", env, tmp_path)
        wait_until(
            lambda: query(
                database_url,
                "SELECT 1 FROM durable_steps WHERE workflow_id = 'kill-1' AND kind = 'signal'",
            ),
            timeout=60,
            what="the re-run",
        )
        if broker.name == "redis":
            # Redis redelivers the killed worker's message an hour later (its visibility
            # timeout): age it in the broker's index so that the workers' sweep does now.
            assert held and broker.redelivered() == []
            broker.counts.zadd(f"{broker.prefix}:unacked_index", dict.fromkeys(held, 0), xx=True)
        # RabbitMQ redelivers it at once, when the killed worker's connection drops: before
        # the step's lease expired, or as the re-run itself. Either way it ran no body twice.
        redelivered = wait_until(broker.redelivered, timeout=30, what="the redelivery")
        if broker.name == "redis":
            assert redelivered == ["brokers.slow kill-1#1 ignored"]
        broker.durable.signal("kill-1", "go")
        assert run.result(timeout=60) == ["done on run 2", 1]
        assert (broker.count("slow"), broker.count("add")) == (2, 1)
        assert broker.keys("slow") == ["kill-1:1", "kill-1:1"]
        (step,) = query(
            database_url,
            "SELECT status, attempts FROM durable_steps WHERE workflow_id = 'kill-1' AND seq = 1",
        )
        # Attempts count claims: the killed attempt counts only if it had been claimed (it
        # began unclaimed, on its first delivery, and is claimed half-way to the redispatch).
        claims = query(
            database_url,
            "SELECT count(*) AS n FROM "
            + HISTORY_ROWS
            + " WHERE workflow_id = 'kill-1' AND seq = 1"
            " AND event = 'step started' AND detail->>'unclaimed' IS NULL",
        )[0].n
        assert step.status == "completed" and step.attempts == claims >= 1
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def start_celery_worker(name: str, env: dict[str, str], logdir: Path) -> subprocess.Popen[Any]:
    """A real ``celery worker`` of the broker app, in its own process group."""
    command = [sys.executable, "-m", "celery", "-A", "tests.apps.rabbit_app", "worker"]
    command += ["--pool=prefork", "--concurrency=1", f"--hostname={name}@%h"]
    command += ["--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel=INFO"]
    with open(logdir / f"{name}.log", "wb") as log:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
