"""Prometheus metrics served by a real ``durable beat --metrics-port``, scraped over HTTP after
real runs: started/completed/failed by workflow, step durations, retries, timer lateness, and
the stuck count."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery.contrib.testing.worker import start_worker
from prometheus_client.parser import text_string_to_metric_families

from durable import RetryPolicy
from tests.apps.crash_app import build
from tests.conftest import clean_keys, clean_tables, query, wait_until

ROOT = Path(__file__).resolve().parent.parent

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> Samples | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.fixture
def beat_process(database_url: str, redis_url: str, prefix: str, tmp_path: Path) -> Iterator[int]:
    """A ``durable beat`` serving metrics; stuck items count after 1 s."""
    clean_tables(database_url)
    port = free_port()
    env = {
        **os.environ,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        "DURABLE_REDISPATCH_AFTER": "1",
        "CRASH_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "durable.cli", "beat", "--app", "tests.apps.crash_app"]
    options = ["--metrics-port", str(port), "--metrics-address", "127.0.0.1"]
    log = open(tmp_path / "beat.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [*command, *options, "--sweep-interval", "0.2"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield port
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert scrape(port) is None  # the metrics server stopped with the beat
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        clean_keys(redis_url, prefix)


def test_metrics_from_the_store(
    beat_process: int, database_url: str, redis_url: str, prefix: str
) -> None:
    port = beat_process
    app, durable = build(database_url, redis_url, prefix)
    client = redis.Redis.from_url(redis_url)

    @app.task(name="metrics.once_broken", shared=False)
    def once_broken() -> str:
        if client.incr(f"{prefix}:count:once") == 1:
            raise ConnectionError("upstream 503")
        return "fine"

    @app.task(name="metrics.held", shared=False)
    def held() -> str:
        return "held"

    @durable.workflow("metrics.retried")
    def retried(ctx: Any) -> str:
        return str(ctx.step(once_broken, retry=RetryPolicy(max_attempts=2, initial_interval=0.1)))

    @durable.workflow("metrics.broken")
    def broken(ctx: Any) -> None:
        raise ValueError("no such order")

    @durable.workflow("metrics.held")
    def held_wf(ctx: Any) -> str:
        # On a queue no worker consumes; recorded with the step, so a beat re-sends it there.
        return str(ctx.step(held.s().set(queue="held")))

    with start_worker(app, pool="threads", perform_ping_check=False, loglevel="WARNING"):
        runs = [durable.start("crash.step", 0.3, workflow_id=f"step-{n}") for n in range(2)]
        nap = durable.start("crash.nap", 0.2, workflow_id="nap")
        again = durable.start("metrics.retried", workflow_id="retried")
        failed = durable.start("metrics.broken", workflow_id="broken")
        durable.start("crash.nap", 3600, workflow_id="long-nap")
        durable.start("metrics.held", workflow_id="idle")
        for run in (*runs, nap, again):
            run.result(timeout=30)
        wait_until(lambda: failed.status() == "failed", what="the failure")
        wait_until(lambda: client.llen(f"{prefix}:held") >= 1, what="the held step")
    # Stuck for good: the step's row and message are gone, nothing pending, nothing owed.
    client.delete(f"{prefix}:held")
    query(database_url, "DELETE FROM durable_steps WHERE workflow_id = 'idle' RETURNING seq")

    def stuck() -> Samples | None:
        samples = scrape(port)
        found = samples and value(samples, "durable_stuck", finding="workflow-idle")
        return samples if found == 1 else None

    samples = wait_until(stuck, timeout=20, what="the stuck run in the metrics")
    assert value(samples, "durable_store_up") == 1
    started = "durable_workflows_started_total"
    assert value(samples, started, workflow="crash.step") == 2
    assert value(samples, started, workflow="crash.nap") == 2
    assert value(samples, "durable_workflows_completed_total", workflow="crash.step") == 2
    assert value(samples, "durable_workflows_failed_total", workflow="metrics.broken") == 1
    assert value(samples, "durable_workflows_running", workflow="crash.nap") == 1
    assert value(samples, "durable_workflows_running", workflow="metrics.held") == 1

    duration = "durable_step_duration_seconds"
    assert value(samples, f"{duration}_count", step="crash.slow") == 2
    assert value(samples, f"{duration}_bucket", step="crash.slow", le="+Inf") == 2
    assert value(samples, f"{duration}_bucket", step="crash.slow", le="0.1") == 0
    assert (value(samples, f"{duration}_sum", step="crash.slow") or 0) >= 0.4
    assert value(samples, "durable_step_retries_total", step="metrics.once_broken") == 1
    assert value(samples, "durable_step_retries_total", step="crash.slow") == 0

    lateness = "durable_timer_lateness_seconds"
    assert value(samples, f"{lateness}_count", purpose="sleep") == 1
    assert value(samples, f"{lateness}_count", purpose="retry") == 1
    assert value(samples, f"{lateness}_bucket", purpose="sleep", le="+Inf") == 1
    assert value(samples, "durable_timers_pending") == 1
    assert value(samples, "durable_stuck", finding="step-message-lost") == 0
    assert (value(samples, "durable_beat_timers_fired_total") or 0) >= 2
