"""Pause and unpause: a paused run does nothing (no step dispatched or claimed, no timer
fired, left alone by the sweeps, signals kept) until it is unpaused, and then goes on where
it stopped; ``RetryPolicy(on_exhausted="pause")``; the bulk forms; the metric; bad input.

Real PostgreSQL, Redis and in-process workers; the beat's timer firing and sweeps are
called directly, so that "it did not fire" is a fact of a finished call, not of elapsed time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner, Result

from durable import Durable, RetryPolicy, WorkflowNotFound, WorkflowNotRunning, bulk, reconcile
from durable.activation import activate
from durable.beat import Beat
from durable.cli import cli
from durable.metrics import StoreCollector
from durable.runner import execute_step
from durable.store import recovery
from tests.apps.crash_app import build
from tests.conftest import (
    HISTORY_ROWS,
    ROOT,
    Workers,
    clean_keys,
    clean_tables,
    query,
    wait_until,
)

# The Durable of the running test, loaded by the command as --app tests.test_pause:CURRENT.
CURRENT: Durable | None = None


@pytest.fixture
def spec(durable: Durable) -> Iterator[str]:
    global CURRENT
    CURRENT = durable
    yield f"{__name__}:CURRENT"
    CURRENT = None


def durable_cli(spec: str, *args: str) -> Result:
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("DURABLE_")}
    return CliRunner().invoke(cli, ["-A", spec, *args], env=clean, catch_exceptions=False)


def threads_worker(app: Celery) -> Any:
    return start_worker(
        app, pool="threads", concurrency=2, perform_ping_check=False, loglevel="WARNING"
    )


def paused(database_url: str, wid: str) -> bool:
    rows = query(database_url, "SELECT paused FROM durable_workflows WHERE id = :id", id=wid)
    return bool(rows and rows[0].paused)


def step_rows(database_url: str, wid: str) -> list[Any]:
    sql = "SELECT seq, kind, status, attempts FROM durable_steps WHERE workflow_id = :id"
    return query(database_url, sql + " ORDER BY seq", id=wid)


def events(database_url: str, wid: str) -> list[Any]:
    sql = f"SELECT event, detail FROM {HISTORY_ROWS} WHERE workflow_id = :id ORDER BY pos"
    return query(database_url, sql, id=wid)


def test_a_paused_sleep_fires_only_after_unpause(durable: Durable, database_url: str) -> None:
    @durable.workflow("pz.nap")
    def nap(ctx: Any) -> str:
        ctx.sleep(timedelta(seconds=0.5))
        return "woke"

    beat = Beat(durable)
    with threads_worker(durable.app):
        run = durable.start("pz.nap", workflow_id="nap-1")
        wait_until(lambda: step_rows(database_url, "nap-1"), what="the sleep recorded")
        assert durable.pause("nap-1") is True
        assert durable.pause("nap-1") is False  # paused already: nothing changes
        # Past its fire time and past the overdue sweep's grace, by PostgreSQL's clock.
        due = "SELECT now() > fire_at + interval '1.5 seconds' AS due FROM durable_timers"
        wait_until(lambda: query(database_url, due)[0].due, what="the timer overdue")
        assert beat.fire_due() == 0  # claimed from the index, not fired
        beat.sweep()
        timer = query(database_url, "SELECT fired_at FROM durable_timers")[0]
        assert timer.fired_at is None
        assert [r.status for r in step_rows(database_url, "nap-1")] == ["waiting"]
        assert run.status() == "running"

        assert durable.unpause("nap-1") is True
        assert durable.unpause("nap-1") is False  # not paused any more
        assert beat.fire_due() == 1  # put back in the index by the unpause, due at once
        assert run.result(timeout=30) == "woke"
    names = [e.event for e in events(database_url, "nap-1")]
    assert names.index("paused") < names.index("unpaused") < names.index("timer fired")


def test_a_run_paused_between_steps_keeps_its_signal_and_schedules_nothing(
    durable: Durable, database_url: str
) -> None:
    app = durable.app

    @app.task(name="pz.add", shared=False)
    def add(a: int, b: int) -> int:
        return a + b

    @durable.workflow("pz.between")
    def between(ctx: Any) -> int:
        first = int(ctx.step(add, 1, 2))
        more = int(ctx.wait_for_signal("more"))
        return int(ctx.step(add, first, more))

    with threads_worker(app):
        run = durable.start("pz.between", workflow_id="btw-1")
        wait_until(
            lambda: (
                [r.status for r in step_rows(database_url, "btw-1")] == ["completed", "waiting"]
            ),
            what="the run waiting for its signal",
        )
        durable.pause("btw-1")
        durable.signal("btw-1", "more", 5)
        # What the activation the signal sent does, whichever worker gets it: nothing.
        assert activate(durable, "btw-1") == "busy-or-finished"
        # The sweep does not send it either, however long it has been owed.
        query(
            database_url,
            "UPDATE durable_workflows SET woken_at = now() - interval '1 hour' "
            "WHERE id = 'btw-1' RETURNING id",
        )
        with durable.connect() as conn:
            owed = recovery.owed_activations(conn, after=1.0)
        assert "btw-1" not in [wid for wid, _ in owed]
        assert not [f for f in reconcile.find(durable) if f.workflow_id == "btw-1"]
        signal = query(database_url, "SELECT consumed_seq FROM durable_signals")[0]
        assert signal.consumed_seq is None  # kept
        assert len(step_rows(database_url, "btw-1")) == 2  # the next step was not scheduled
        assert run.status() == "running"

        durable.unpause("btw-1")
        assert run.result(timeout=30) == 8
    signal = query(database_url, "SELECT consumed_seq FROM durable_signals")[0]
    assert signal.consumed_seq == 2


def test_a_step_message_of_a_paused_run_is_not_claimed(
    durable: Durable, spec: str, database_url: str, redis_url: str, prefix: str
) -> None:
    app = durable.app
    client = redis.Redis.from_url(redis_url, socket_timeout=60)  # blocking reads below

    @app.task(name="pz.count", shared=False)
    def count() -> int:
        return int(client.incr(f"{prefix}:count:pz"))

    @durable.workflow("pz.held")
    def held(ctx: Any) -> int:
        return int(ctx.step(count))

    # No worker yet: the step is scheduled and its message waits in the broker.
    run = durable.start("pz.held", workflow_id="held-1")
    assert [r.status for r in step_rows(database_url, "held-1")] == ["scheduled"]
    durable.pause("held-1")
    # What a worker does with that message now: the claim refuses it, the body never runs.
    assert execute_step(durable, "held-1", 1) == "ignored"
    assert client.get(f"{prefix}:count:pz") is None
    assert [(r.status, r.attempts) for r in step_rows(database_url, "held-1")] == [("scheduled", 0)]
    with durable.connect() as conn:  # nor does the unclaimed-step sweep send it again
        assert not recovery.stale_scheduled_steps(conn, after=0.0)

    with threads_worker(app):
        unpaused = durable_cli(spec, "unpause", "held-1", "--json")
        assert unpaused.exit_code == 0, unpaused.output
        assert json.loads(unpaused.stdout)["steps_sent"] == [1]
        assert run.result(timeout=30) == 1
    assert client.get(f"{prefix}:count:pz") == b"1"  # ran once


def test_on_exhausted_pause_pauses_the_run_and_unpause_tries_the_step_again(
    durable: Durable, database_url: str, redis_url: str, prefix: str
) -> None:
    app = durable.app
    client = redis.Redis.from_url(redis_url, socket_timeout=60)  # blocking reads below
    fixed = f"{prefix}:fixed"

    @app.task(name="pz.partner", shared=False)
    def partner(order: str) -> str:
        client.incr(f"{prefix}:count:partner")
        if not client.exists(fixed):
            raise ConnectionError("partner API answers 500 since the deploy")
        return f"sent {order}"

    @durable.workflow("pz.exhausted")
    def exhausted(ctx: Any, order: str) -> list[str]:
        policy = RetryPolicy(max_attempts=2, initial_interval=0.0, on_exhausted="pause")
        sent = str(ctx.step(partner, order, retry=policy))
        return [sent, str(ctx.step(partner, order + "-again"))]

    beat = Beat(durable)
    with threads_worker(app):
        run = durable.start("pz.exhausted", "o-7", workflow_id="exh-1")
        # The beat fires the first retry's timer; the second failure pauses the run.
        wait_until(lambda: beat.fire_due() >= 0 and paused(database_url, "exh-1"), what="the pause")
        assert run.status() == "running"
        [step] = step_rows(database_url, "exh-1")
        assert (step.status, step.attempts) == ("waiting", 2)  # not failed: held for a retry
        pause_event = [e for e in events(database_url, "exh-1") if e.event == "paused"]
        assert pause_event[0].detail["by"] == "on_exhausted"
        assert "ConnectionError" in pause_event[0].detail["error"]
        # The beat runs meanwhile: the retry's timer, due at once, stays unfired while paused.
        unfired = "SELECT id FROM durable_timers WHERE fired_at IS NULL"
        wait_until(
            lambda: query(database_url, unfired + " AND fire_at < now() - interval '1.5 s'"),
            what="the retry's timer overdue",
        )
        assert beat.fire_due() == 0
        beat.sweep()
        assert len(query(database_url, unfired)) == 1
        assert client.get(f"{prefix}:count:partner") == b"2"

        client.set(fixed, "1")  # the fix is deployed
        durable.unpause("exh-1")
        assert beat.fire_due() == 1  # the retry, indexed again by the unpause
        assert run.result(timeout=30) == ["sent o-7", "sent o-7-again"]
    steps = step_rows(database_url, "exh-1")
    assert [(r.status, r.attempts) for r in steps] == [("completed", 3), ("completed", 1)]
    assert client.get(f"{prefix}:count:partner") == b"4"


def test_on_exhausted_is_checked_and_stored() -> None:
    with pytest.raises(ValueError, match="on_exhausted must be one of 'fail', 'pause'"):
        RetryPolicy(on_exhausted="retry")
    policy = RetryPolicy(max_attempts=2, on_exhausted="pause")
    assert RetryPolicy.from_dict(policy.to_dict()) == policy
    assert "on_exhausted" not in RetryPolicy().to_dict()  # the default stores as before
    assert RetryPolicy.from_dict(RetryPolicy().to_dict()).on_exhausted == "fail"


def test_bulk_pause_by_filter_with_a_dry_run_then_unpause(
    durable: Durable, spec: str, database_url: str
) -> None:
    @durable.workflow("pz.wait")
    def wait(ctx: Any) -> Any:
        return ctx.wait_for_signal("go")

    @durable.workflow("pz.other")
    def other(ctx: Any) -> Any:
        return ctx.wait_for_signal("go")

    with threads_worker(durable.app):
        for n in range(3):
            durable.start("pz.wait", workflow_id=f"bw-{n}")
        durable.start("pz.other", workflow_id="bo-1")
        waiting = "SELECT count(*) AS n FROM durable_steps WHERE status = 'waiting'"
        wait_until(lambda: query(database_url, waiting)[0].n == 4, what="all four waiting")

        dry = durable_cli(spec, "pause", "--name", "pz.wait", "--dry-run", "--json")
        assert dry.exit_code == 0, dry.output
        assert json.loads(dry.stdout) == {
            "action": "pause",
            "dry_run": True,
            "matched": 3,
            "sample": ["bw-0", "bw-1", "bw-2"],
        }
        assert not query(database_url, "SELECT id FROM durable_workflows WHERE paused")

        done = durable_cli(spec, "pause", "--name", "pz.wait", "--yes", "--batch-size", "2")
        assert done.exit_code == 0, done.output
        assert "paused 3 run(s)" in done.stdout
        rows = query(database_url, "SELECT id FROM durable_workflows WHERE paused ORDER BY id")
        assert [r.id for r in rows] == ["bw-0", "bw-1", "bw-2"]
        listed = durable_cli(spec, "list", "--paused", "--json")
        assert sorted(r["id"] for r in json.loads(listed.stdout)) == ["bw-0", "bw-1", "bw-2"]
        assert all(r["paused"] and r["status"] == "running" for r in json.loads(listed.stdout))
        table = durable_cli(spec, "list", "--name", "pz.wait")
        assert table.stdout.count("running, paused") == 3, table.stdout
        shown = durable_cli(spec, "show", "bw-0")
        assert "paused: durable unpause lets it go on" in shown.stdout
        assert json.loads(durable_cli(spec, "show", "bo-1", "--json").stdout)["paused"] is False
        # Paused again: they no longer match.
        assert bulk.preview(durable, "pause", bulk.RunFilter(name="pz.wait")).matched == 0

        for n in range(3):
            durable.signal(f"bw-{n}", "go", n)
        unpaused = durable_cli(spec, "unpause", "--paused", "--yes", "--json")
        assert json.loads(unpaused.stdout)["acted"] == 3
        assert [durable.run(f"bw-{n}").result(timeout=30) for n in range(3)] == [0, 1, 2]
    assert not query(database_url, "SELECT id FROM durable_workflows WHERE paused")


def test_cancel_lifts_the_pause_and_cancels(durable: Durable, database_url: str) -> None:
    @durable.workflow("pz.cancel")
    def cancelled(ctx: Any) -> Any:
        return ctx.wait_for_signal("never")

    with threads_worker(durable.app):
        run = durable.start("pz.cancel", workflow_id="cx-1")
        wait_until(lambda: step_rows(database_url, "cx-1"), what="the wait recorded")
        durable.pause("cx-1")
        durable.cancel("cx-1")
        wait_until(lambda: run.status() == "cancelled", what="the cancellation")
    assert not paused(database_url, "cx-1")
    assert [e.detail for e in events(database_url, "cx-1") if e.event == "unpaused"] == [
        {"by": "cancel"}
    ]


def test_the_paused_gauge(durable: Durable, database_url: str) -> None:
    @durable.workflow("pz.gauge")
    def gauge(ctx: Any) -> Any:
        return ctx.wait_for_signal("go")

    for n in range(3):
        durable.start("pz.gauge", workflow_id=f"g-{n}")
    durable.pause("g-0")
    durable.pause("g-2")

    def paused_gauge() -> dict[str, float]:
        for family in StoreCollector(durable).collect():
            if family.name == "durable_workflows_paused":
                return {s.labels["workflow"]: s.value for s in family.samples}
        raise AssertionError("no durable_workflows_paused metric")

    assert paused_gauge() == {"pz.gauge": 2.0}
    durable.unpause("g-2")
    assert paused_gauge() == {"pz.gauge": 1.0}


def test_bad_input_is_one_line_and_changes_nothing(
    durable: Durable, spec: str, database_url: str
) -> None:
    @durable.workflow("pz.quick")
    def quick(ctx: Any) -> int:
        return 1

    with pytest.raises(WorkflowNotFound):
        durable.pause("no-such-run")
    with pytest.raises(WorkflowNotFound):
        durable.unpause("no-such-run")
    with threads_worker(durable.app):
        assert durable.start("pz.quick", workflow_id="q-1").result(timeout=30) == 1
    before = query(database_url, "SELECT count(*) AS n FROM durable_history")[0].n
    with pytest.raises(WorkflowNotRunning, match="cannot pause workflow 'q-1': it is already"):
        durable.pause("q-1")
    with pytest.raises(WorkflowNotRunning, match="cannot unpause workflow 'q-1'"):
        durable.unpause("q-1")
    for verb in ("pause", "unpause"):
        for wid, reason in (("q-1", "already completed"), ("nope", "nope")):
            result = durable_cli(spec, verb, wid)
            assert result.exit_code == 1
            lines = result.stderr.splitlines()
            assert len(lines) == 1 and lines[0].startswith("durable: "), result.stderr
            assert reason in lines[0]
    assert query(database_url, "SELECT count(*) AS n FROM durable_history")[0].n == before
    assert not paused(database_url, "q-1")
    mixed = durable_cli(spec, "pause", "q-1", "--name", "pz.quick")
    assert mixed.exit_code == 2 and "not both" in mixed.stderr


def test_a_step_running_when_the_pause_lands_commits_and_the_run_waits(
    durable: Durable, database_url: str, redis_url: str, prefix: str
) -> None:
    app = durable.app
    client = redis.Redis.from_url(redis_url, socket_timeout=60)  # blocking reads below

    @app.task(name="pz.slow", shared=False)
    def slow(n: int) -> int:
        client.rpush(f"{prefix}:began", n)
        assert client.blpop([f"{prefix}:go"], timeout=30), "never let go"
        return n * 10

    @durable.workflow("pz.running")
    def running(ctx: Any) -> list[int]:
        return [int(ctx.step(slow, 1)), int(ctx.step(slow, 2))]

    with threads_worker(app):
        run = durable.start("pz.running", workflow_id="run-1")
        assert client.blpop([f"{prefix}:began"], timeout=30) == (f"{prefix}:began".encode(), b"1")
        durable.pause("run-1")
        client.rpush(f"{prefix}:go", 1)
        done = (
            "SELECT result FROM durable_steps WHERE workflow_id = 'run-1' AND seq = 1 "
            "AND status = 'completed'"
        )
        assert wait_until(lambda: query(database_url, done), what="step 1's result")[0].result == 10
        # Its settle neither advanced the run nor took it: no step 2, and nothing holds it.
        wait_until(
            lambda: query(
                database_url,
                "SELECT 1 FROM durable_workflows WHERE id = 'run-1' AND lease_owner IS NULL",
            ),
            what="the lease free",
        )
        assert len(step_rows(database_url, "run-1")) == 1
        assert activate(durable, "run-1") == "busy-or-finished"
        assert len(step_rows(database_url, "run-1")) == 1
        assert run.status() == "running"

        durable.unpause("run-1")
        client.rpush(f"{prefix}:go", 2)
        assert run.result(timeout=30) == [10, 20]


def test_a_local_step_exhausting_its_retries_pauses_the_run_too(
    durable: Durable, database_url: str, redis_url: str, prefix: str
) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=60)  # blocking reads below
    fixed = f"{prefix}:fixed"

    def lookup(order: str) -> str:
        if not client.exists(fixed):
            raise KeyError(order)
        return f"found {order}"

    @durable.workflow("pz.local")
    def local(ctx: Any) -> str:
        policy = RetryPolicy(max_attempts=1, on_exhausted="pause")
        return str(ctx.step(lookup, "o-9", local=True, retry=policy))

    beat = Beat(durable)
    with threads_worker(durable.app):
        run = durable.start("pz.local", workflow_id="loc-1")
        wait_until(lambda: paused(database_url, "loc-1"), what="the pause")
        assert [(r.status, r.attempts) for r in step_rows(database_url, "loc-1")] == [
            ("waiting", 1)
        ]
        client.set(fixed, "1")
        durable.unpause("loc-1")
        assert beat.fire_due() == 1
        assert run.result(timeout=30) == "found o-9"


def test_a_step_timing_out_on_its_last_attempt_pauses_the_run(
    durable: Durable, database_url: str, redis_url: str, prefix: str
) -> None:
    app = durable.app
    client = redis.Redis.from_url(redis_url, socket_timeout=60)  # blocking reads below

    @app.task(name="pz.hangs_once", shared=False)
    def hangs_once() -> str:
        if client.incr(f"{prefix}:count:hangs") == 1:
            client.blpop([f"{prefix}:go"], timeout=30)  # past its timeout
            return "late"
        return "on time"

    @durable.workflow("pz.deadline")
    def deadline(ctx: Any) -> str:
        policy = RetryPolicy(max_attempts=1, on_exhausted="pause")
        return str(ctx.step(hangs_once, timeout=timedelta(seconds=0.5), retry=policy))

    beat = Beat(durable)
    with threads_worker(app):
        run = durable.start("pz.deadline", workflow_id="dl-1")
        past = (
            "SELECT 1 FROM durable_steps WHERE workflow_id = 'dl-1' AND status = 'started' "
            "AND deadline_at < now()"
        )
        wait_until(lambda: query(database_url, past), what="the step past its timeout")
        beat.sweep()  # the deadline sweep fails the last attempt: the run is paused
        assert paused(database_url, "dl-1")
        detail = [e.detail for e in events(database_url, "dl-1") if e.event == "paused"]
        assert detail[0]["error"] == "TimeoutError: attempt 1 ran past its timeout"
        client.rpush(f"{prefix}:go", 1)  # the hung body ends: its late result is dropped
        durable.unpause("dl-1")
        assert beat.fire_due() == 1
        assert run.result(timeout=30) == "on time"


@pytest.fixture
def processes(
    database_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> Iterator[tuple[Durable, Workers, redis.Redis]]:
    """Worker processes of ``tests/apps/crash_app.py``; no beat (the test drives one)."""
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
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield durable, workers, client
    finally:
        workers.stop_all()
        clean_keys(redis_url, prefix)


def test_a_step_whose_worker_died_while_paused_runs_again_after_unpause(
    processes: Any, database_url: str, prefix: str
) -> None:
    durable, workers, client = processes
    first = workers.start("first")
    run = durable.start("crash.step", 30, workflow_id="kp-1")
    step = "SELECT status FROM durable_steps WHERE workflow_id = 'kp-1' AND seq = 1"
    wait_until(
        lambda: query(database_url, step)[0].status == "started", timeout=30, what="the claim"
    )
    durable.pause("kp-1")
    workers.kill(first)  # SIGKILL mid-step
    expired = step + " AND lease_expires_at < now()"
    wait_until(lambda: query(database_url, expired), timeout=30, what="the lease expired")
    Beat(durable).sweep()  # the expired-lease sweep leaves the paused run's step alone
    assert query(database_url, step)[0].status == "started"
    assert not [f for f in reconcile.find(durable, grace=0.0) if f.workflow_id == "kp-1"]

    workers.start("second")
    assert durable.unpause("kp-1")  # reschedules the step and sends it
    assert run.result(timeout=60) == ["done on run 2", "after"]
    assert client.lrange(f"{prefix}:keys:slow", 0, -1) == ["kp-1:1", "kp-1:1"]
    lost = [e.detail for e in events(database_url, "kp-1") if e.event == "step lease expired"]
    assert lost == [{"by": "operator"}]
