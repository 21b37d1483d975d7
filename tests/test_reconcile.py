"""``durable reconcile`` finds each way a workflow can be stuck, created for real (messages
deleted from Redis, a worker SIGKILLed, index entries and rows removed, no beat running), and
``--fix`` repairs it so that the run completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner, Result

from durable import Durable
from durable.beat import Beat
from durable.cli import cli
from tests.apps.crash_app import build
from tests.conftest import HISTORY_ROWS, clean_keys, clean_tables, make_app, query, wait_until

ROOT = Path(__file__).resolve().parent.parent
GRACE = "0.5"

# The Durable of the running test, loaded by the command as --app tests.test_reconcile:CURRENT.
CURRENT: Durable | None = None


def use(durable: Durable) -> str:
    global CURRENT
    CURRENT = durable
    return f"{__name__}:CURRENT"


def worker_on(app: Celery, *queues: str) -> Any:
    """An in-process worker on these queues (one at a time: they share Celery's state)."""
    return start_worker(
        app, pool="threads", concurrency=2, queues=list(queues), perform_ping_check=False,
        loglevel="WARNING",
    )  # fmt: skip


def reconcile(spec: str, *args: str) -> tuple[Result, dict[str, Any]]:
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("DURABLE_")}
    argv = ["-A", spec, "reconcile", "--json", "--grace", GRACE, *args]
    result = CliRunner().invoke(cli, argv, env=clean, catch_exceptions=False)
    return result, json.loads(result.stdout)


def found(spec: str) -> set[tuple[str, str]]:
    """(finding, workflow id) of everything stuck now."""
    return {(f["kind"], f["workflow_id"]) for f in reconcile(spec)[1]["findings"]}


def fix(spec: str, expected: set[tuple[str, str]]) -> list[dict[str, Any]]:
    """Check that reconcile reports ``expected`` and exits 1, then repair it."""
    result, report = reconcile(spec)
    assert {(f["kind"], f["workflow_id"]) for f in report["findings"]} == expected
    assert result.exit_code == 1
    assert result.stderr.startswith("durable: ") and "--fix" in result.stderr
    assert not any(f["fixed"] for f in report["findings"])
    result, report = reconcile(spec, "--fix")
    assert result.exit_code == 0, result.output
    assert all(f["fixed"] for f in report["findings"]), report
    return list(report["findings"])


@pytest.fixture
def spec(durable: Durable) -> Iterator[str]:
    yield use(durable)
    global CURRENT
    CURRENT = None


@pytest.fixture
def held(app: Celery, durable: Durable) -> None:
    """Workflow rec.held: one step on the queue ``held``, which no worker consumes at first."""
    app.conf.task_routes = {"rec.held": {"queue": "held"}}

    @app.task(name="rec.held", shared=False)
    def held_task() -> str:
        return "held done"

    @durable.workflow("rec.held")
    def held_wf(ctx: Any) -> str:
        return str(ctx.step(held_task))


def test_a_lost_step_message_is_sent_again(
    app: Celery, durable: Durable, held: None, spec: str, prefix: str, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    with worker_on(app, "celery"):
        run = durable.start("rec.held", workflow_id="lost-step")
        wait_until(lambda: client.llen(f"{prefix}:held") == 1, what="the step message")
    client.delete(f"{prefix}:held")
    wait_until(lambda: found(spec), what="the finding")
    (finding,) = fix(spec, {("step-message-lost", "lost-step")})
    assert (finding["seq"], finding["name"], finding["action"]) == (
        1,
        "rec.held",
        "re-sent the step",
    )
    assert client.llen(f"{prefix}:held") == 1
    with worker_on(app, "celery", "held"):
        assert run.result(timeout=20) == "held done"
    result, report = reconcile(spec)
    assert (result.exit_code, report["findings"]) == (0, [])
    text = CliRunner().invoke(cli, ["-A", spec, "reconcile"], catch_exceptions=False)
    assert (text.exit_code, text.stdout) == (0, "nothing is stuck\n")


def test_a_running_run_with_nothing_pending_is_woken(
    app: Celery, durable: Durable, held: None, spec: str, prefix: str, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    with worker_on(app, "celery"):
        run = durable.start("rec.held", workflow_id="idle")
        wait_until(lambda: client.llen(f"{prefix}:held") == 1, what="the step message")
    # An operator's clean-up gone wrong: the step's row and its message are gone, so the run
    # is running with no step, no timer, no signal wait, and no activation owed.
    client.delete(f"{prefix}:held")
    query(
        durable.settings.database_url,
        "DELETE FROM durable_steps WHERE workflow_id = 'idle' RETURNING seq",
    )
    wait_until(lambda: found(spec), what="the finding")
    (finding,) = fix(spec, {("workflow-idle", "idle")})
    assert finding["action"] == "woke the run and sent an activation"
    with worker_on(app, "celery", "held"):
        assert run.result(timeout=20) == "held done"


def test_lost_timers_are_restored_fired_and_indexed(
    durable: Durable, worker: Any, spec: str, prefix: str, redis_url: str, database_url: str
) -> None:
    @durable.workflow("rec.nap")
    def nap(ctx: Any, seconds: float) -> str:
        ctx.sleep(seconds)
        return "rested"

    client = redis.Redis.from_url(redis_url)
    index = f"{prefix}:timers"

    def timer_of(wid: str) -> str | None:
        rows = query(database_url, "SELECT id FROM durable_timers WHERE workflow_id = :w", w=wid)
        timer = str(rows[0].id) if rows else None
        return timer if timer and client.zscore(index, timer) is not None else None

    long, due, gone = (durable.start("rec.nap", s, workflow_id=w) for w, s in LOST_TIMERS)
    timers = {w: wait_until(lambda w=w: timer_of(w), what=f"{w}'s timer") for w, _ in LOST_TIMERS}
    client.zrem(index, timers["t-long"])  # lost from the index only
    client.zrem(index, timers["t-gone"])  # lost from the index and PostgreSQL
    query(database_url, "DELETE FROM durable_timers WHERE workflow_id = 't-gone' RETURNING id")
    client.zrem(index, timers["t-due"])  # left to no beat: overdue once its time passes
    expected = {
        ("timer-not-indexed", "t-long"),
        ("timer-overdue", "t-due"),
        ("step-waiting-without-timer", "t-gone"),
    }
    wait_until(lambda: found(spec) == expected, what="the findings")
    actions = {f["workflow_id"]: f["action"] for f in fix(spec, expected)}
    assert actions == {
        "t-long": "added the timer to the index",
        "t-due": "fired the timer",
        "t-gone": "set a new timer",
    }
    assert due.result(timeout=20) == "rested"
    assert client.zscore(index, timers["t-long"]) is not None
    Beat(durable).fire_due()  # a beat fires the restored timer from the index
    assert gone.result(timeout=20) == "rested"
    assert long.status() == "running"
    assert reconcile(spec)[1]["findings"] == []


LOST_TIMERS = (("t-long", 3600.0), ("t-due", 0.2), ("t-gone", 0.2))


def test_a_completed_step_whose_workflow_was_never_resumed(
    database_url: str, redis_url: str, prefix: str
) -> None:
    clean_tables(database_url)
    # Activations travel on their own queue, and the worker that settles the step does not
    # continue the workflow itself: the activation message is all that resumes it.
    app, durable = make_app(
        database_url, redis_url, prefix, inline_activation=False, workflow_queue="wf"
    )
    spec = use(durable)
    client = redis.Redis.from_url(redis_url)

    @app.task(name="rec.first", shared=False)
    def first() -> str:
        return "first"

    @durable.workflow("rec.one")
    def one(ctx: Any) -> str:
        return str(ctx.step(first))

    try:
        with worker_on(app, "wf"):
            run = durable.start("rec.one", workflow_id="unresumed")
            wait_until(lambda: client.llen(f"{prefix}:celery") == 1, what="the step message")
        with worker_on(app, "celery"):
            wait_until(lambda: STEP_DONE in events(database_url), what="the step")
        client.delete(f"{prefix}:wf")  # whatever activation was sent is lost
        wait_until(lambda: found(spec), what="the finding")
        (finding,) = fix(spec, {("workflow-not-resumed", "unresumed")})
        assert "step 1 completed" in finding["detail"]
        assert client.llen(f"{prefix}:wf") == 1
        with worker_on(app, "wf", "celery"):
            assert run.result(timeout=30) == "first"
    finally:
        clean_keys(redis_url, prefix)


STEP_DONE = (1, "step completed")


def events(database_url: str) -> list[tuple[int, str]]:
    rows = query(database_url, "SELECT seq, event FROM " + HISTORY_ROWS + " ORDER BY pos")
    return [(r.seq, r.event) for r in rows]


def test_a_step_whose_worker_was_killed_is_rescheduled(
    database_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    clean_tables(database_url)
    _, durable = build(database_url, redis_url, prefix)
    spec = use(durable)
    env = {
        **os.environ,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        "DURABLE_LEASE_TTL": "2",  # the dead worker's lease runs out 2 s after its last renewal
        "CRASH_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    procs: list[subprocess.Popen[bytes]] = []

    def worker(name: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        command = [sys.executable, "-m", "celery", "-A", "tests.apps.crash_app", "worker"]
        options = ["--pool=prefork", "--concurrency=1", f"--hostname={name}@%h"]
        options += ["--without-gossip", "--without-mingle", "--loglevel=INFO"]
        proc = subprocess.Popen(
            [*command, *options],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    try:
        first = worker("first")
        run = durable.start("crash.step", 60, workflow_id="killed")
        wait_until(lambda: client.get(f"{prefix}:count:slow") == "1", timeout=30, what="the step")
        # Begun unclaimed on its first delivery, the step is claimed by the heartbeat
        # half-way to redispatch_after: kill the worker once it holds the step's lease.
        claimed = "SELECT status FROM durable_steps WHERE workflow_id = 'killed' AND seq = 1"
        wait_until(
            lambda: query(database_url, claimed)[0].status == "started",
            timeout=30,
            what="the claim",
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
        wait_until(lambda: found(spec), what="the finding")
        (finding,) = fix(spec, {("step-worker-dead", "killed")})
        assert (finding["seq"], finding["name"]) == (1, "crash.slow")
        assert finding["action"] == "rescheduled and re-sent the step"
        worker("second")
        assert run.result(timeout=30) == ["done on run 2", "after"]
        assert client.lrange(f"{prefix}:keys:slow", 0, -1) == ["killed:1", "killed:1"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        clean_keys(redis_url, prefix)
