"""The operator's commands against real runs: list filters, show, resume, retry, fork, purge,
timers, signal and cancel, through the ``durable`` command with real workers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner, Result

from durable import Durable, RetryPolicy
from durable.admin import list_runs, parse_duration
from durable.cli import cli
from tests.conftest import HISTORY_ROWS, query, wait_until

# The Durable of the running test, loaded by the command as --app tests.test_admin:CURRENT.
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


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line_error(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("durable: "), result.stderr
    return lines[0]


@pytest.fixture
def shop(app: Celery, durable: Durable, redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    """Tasks that count their runs in Redis, and the workflows of these tests."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def bump(label: str) -> int:
        return int(client.incr(f"{prefix}:count:{label}"))

    @app.task(name="adm.work", shared=False)
    def work(label: str) -> str:
        return f"{label} run {bump(label)}"

    @app.task(name="adm.flaky", shared=False)
    def flaky(label: str) -> str:
        n = bump(label)
        if not client.exists(f"{prefix}:ok:{label}"):
            raise RuntimeError(f"{label} broke on run {n}")
        return f"{label} run {n}"

    app.conf.task_routes = {"adm.held": {"queue": "held"}}

    @app.task(name="adm.held", shared=False)
    def held() -> str:
        return f"held run {bump('held')}"

    @durable.workflow("adm.three")
    def three(ctx: Any, tag: str) -> list[str]:
        return [ctx.step(work, f"{tag}-{n}") for n in (1, 2, 3)]

    @durable.workflow("adm.fails")
    def fails(ctx: Any) -> list[str]:
        return [ctx.step(work, "f-1"), ctx.step(flaky, "f-2"), ctx.step(work, "f-3")]

    @durable.workflow("adm.sleepy")
    def sleepy(ctx: Any, seconds: float) -> str:
        ctx.sleep(seconds)
        return "rested"

    @durable.workflow("adm.signal")
    def signal(ctx: Any) -> Any:
        return ctx.wait_for_signal("go")

    @durable.workflow("adm.held")
    def held_wf(ctx: Any) -> str:
        return str(ctx.step(held))

    yield client
    client.close()


def count(client: redis.Redis, prefix: str, label: str) -> int:
    return int(client.get(f"{prefix}:count:{label}") or 0)


def test_parse_duration() -> None:
    assert parse_duration("90") == timedelta(seconds=90)
    assert parse_duration("1d12h") == timedelta(hours=36)
    assert parse_duration(" 2w ") == timedelta(weeks=2)
    assert parse_duration("1.5h") == timedelta(minutes=90)
    for bad in ("", "h", "3x", "1d 2h", "-5s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_list_filters_by_status_name_age_and_what_runs_wait_on(
    durable: Durable, shop: Any, worker: Any, spec: str
) -> None:
    durable.start("adm.sleepy", 3600, workflow_id="l-timer")
    durable.start("adm.signal", workflow_id="l-signal")
    durable.start("adm.held", workflow_id="l-step")
    done = durable.start("adm.three", "l", workflow_id="l-done")
    assert done.result(timeout=20)

    def waiting() -> dict[str, Any]:
        with durable.connect() as conn:
            rows = list_runs(conn, status="running")
        return {r["id"]: r["waiting"]["on"] for r in rows}

    wait_until(
        lambda: waiting() == {"l-timer": "timer", "l-signal": "signal", "l-step": "step"},
        what="every run to reach its wait",
    )
    for on, expected in (("timer", "l-timer"), ("signal", "l-signal"), ("step", "l-step")):
        rows = as_json(durable_cli(spec, "list", "--waiting", on, "--json"))
        assert [r["id"] for r in rows] == [expected]
    (row,) = as_json(durable_cli(spec, "list", "--waiting", "step", "--json"))
    assert (row["waiting"]["seq"], row["waiting"]["name"]) == (1, "adm.held")
    (row,) = as_json(durable_cli(spec, "list", "--waiting", "timer", "--json"))
    assert datetime.fromisoformat(row["waiting"]["until"]) > datetime.now(UTC)

    rows = as_json(durable_cli(spec, "list", "--status", "completed", "--json"))
    assert [(r["id"], r["waiting"]) for r in rows] == [("l-done", None)]
    rows = as_json(durable_cli(spec, "list", "--name", "adm.signal", "--json"))
    assert [r["id"] for r in rows] == ["l-signal"]
    assert len(as_json(durable_cli(spec, "list", "--since", "1h", "--json"))) == 4
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert as_json(durable_cli(spec, "list", "--since", later, "--json")) == []
    assert [r["id"] for r in as_json(durable_cli(spec, "list", "--limit", "1", "--json"))] == [
        "l-done"
    ]
    table = durable_cli(spec, "list", "--status", "running")
    assert "waiting on" in table.stdout
    assert "signal #1 go" in table.stdout and "step #1 adm.held" in table.stdout

    bad = durable_cli(spec, "list", "--since", "yesterday")
    assert bad.exit_code == 2
    assert "--since" in one_line_error(bad)


def test_show_is_a_timeline_of_attempts_timers_signals_and_events(
    app: Celery, durable: Durable, shop: redis.Redis, prefix: str, worker: Any, beat: Any, spec: str
) -> None:
    @app.task(name="adm.once_broken", shared=False)
    def once_broken() -> str:
        if shop.incr(f"{prefix}:count:once") == 1:
            raise ConnectionError("upstream 503")
        return "fine"

    def add(a: int, b: int) -> int:
        return a + b

    @durable.workflow("adm.rich")
    def rich(ctx: Any) -> dict[str, Any]:
        fine = ctx.step(once_broken, retry=RetryPolicy(max_attempts=3, initial_interval=0.2))
        total = ctx.step(add, 2, 3, local=True)
        ctx.set_event("stage", "approval")
        approval = ctx.wait_for_signal("approved")
        ctx.sleep(0.2)
        return {"fine": fine, "total": total, "approval": approval}

    run = durable.start("adm.rich", workflow_id="rich-1")
    wait_until(lambda: durable.get_event("rich-1", "stage") == "approval", what="the event")
    durable.signal("rich-1", "approved", {"by": "ann"})
    assert run.result(timeout=20) == {"fine": "fine", "total": 5, "approval": {"by": "ann"}}

    shown = as_json(durable_cli(spec, "show", "rich-1", "--json"))
    remote, local, event, wait, nap = shown["steps"]
    assert (remote["name"], remote["status"], remote["attempts"]) == (
        "adm.once_broken", "completed", 2,
    )  # fmt: skip
    first, second = remote["attempt_history"]
    assert (first["attempt"], first["outcome"]) == (1, "failed, retrying")
    assert "upstream 503" in first["error"]
    assert (second["attempt"], second["outcome"], second["error"]) == (2, "completed", None)
    assert second["duration"] >= 0 and remote["duration"] >= 0
    assert (local["kind"], local["result"], local["attempts"]) == ("local", 5, 1)
    assert (event["kind"], wait["kind"], wait["result"]) == ("event", "signal", {"by": "ann"})
    assert nap["kind"] == "sleep" and nap["duration"] >= 0.2
    assert shown["events"] == {"stage": "approval"}
    (sig,) = shown["signals"]
    assert (sig["name"], sig["payload"], sig["consumed_seq"]) == ("approved", {"by": "ann"}, 4)
    purposes = {t["purpose"]: t for t in shown["timers"]}
    assert set(purposes) == {"retry", "sleep"}
    assert all(t["fired_at"] is not None and t["lateness"] is not None for t in shown["timers"])

    text = durable_cli(spec, "show", "rich-1")
    assert text.exit_code == 0
    for word in ("attempts", "upstream 503", "timers", "signals", "events", "approval", "timeline"):
        assert word in text.stdout, word


def test_resume_resends_a_lost_step_and_the_activation(
    app: Celery, durable: Durable, shop: redis.Redis, prefix: str, spec: str
) -> None:
    # One in-process worker at a time: they share Celery's process-wide worker state.
    with start_worker(app, pool="threads", perform_ping_check=False, loglevel="WARNING"):
        durable.start("adm.held", workflow_id="r-1")
        wait_until(lambda: shop.llen(f"{prefix}:held") == 1, what="the step message")
    shop.delete(f"{prefix}:held")  # the broker lost it
    result = durable_cli(spec, "resume", "r-1")
    assert result.exit_code == 0, result.output
    assert "r-1" in result.stdout and "steps re-sent: 1" in result.stdout
    assert shop.llen(f"{prefix}:held") == 1
    queues = ["celery", "held"]
    with start_worker(app, pool="threads", queues=queues, perform_ping_check=False):
        assert durable.run("r-1").result(timeout=20) == "held run 1"
    assert count(shop, prefix, "held") == 1
    events = [r.event for r in query(durable.settings.database_url, HISTORY, id="r-1")]
    assert "resumed" in events

    finished = durable_cli(spec, "resume", "r-1")
    assert finished.exit_code == 1
    assert "already completed" in one_line_error(finished)
    unknown = durable_cli(spec, "resume", "no-such-run")
    assert unknown.exit_code == 1
    assert "no-such-run" in one_line_error(unknown)


HISTORY = "SELECT event FROM " + HISTORY_ROWS + " WHERE workflow_id = :id ORDER BY pos"


def test_retry_runs_a_failed_run_again_from_its_failed_step(
    durable: Durable, shop: redis.Redis, prefix: str, worker: Any, spec: str
) -> None:
    run = durable.start("adm.fails", workflow_id="retry-1")
    wait_until(lambda: run.status() == "failed", what="the run to fail")
    running = durable.start("adm.signal", workflow_id="retry-running")

    shop.set(f"{prefix}:ok:f-2", "1")  # the fix is deployed
    result = durable_cli(spec, "retry", "retry-1", "--json")
    assert as_json(result) == {"id": "retry-1", "from_step": 2, "removed": 1}
    assert run.result(timeout=20) == ["f-1 run 1", "f-2 run 2", "f-3 run 1"]
    assert [count(shop, prefix, k) for k in ("f-1", "f-2", "f-3")] == [1, 2, 1]
    events = [r.event for r in query(durable.settings.database_url, HISTORY, id="retry-1")]
    assert events.count("failed") == 1 and events[-1] == "completed" and "retried" in events

    not_failed = durable_cli(spec, "retry", running.id)
    assert not_failed.exit_code == 1
    assert "running, not failed" in one_line_error(not_failed)


def test_retry_starts_a_failed_child_run_afresh(
    durable: Durable, shop: redis.Redis, prefix: str, worker: Any, spec: str
) -> None:
    @durable.workflow("adm.parent")
    def parent(ctx: Any) -> list[Any]:
        return [ctx.step(work_task(durable), "c-0"), ctx.child("adm.fails")]

    run = durable.start("adm.parent", workflow_id="parent")
    wait_until(lambda: run.status() == "failed", what="the parent to fail with its child")
    assert durable.run("parent/2").status() == "failed"
    shop.set(f"{prefix}:ok:f-2", "1")
    assert as_json(durable_cli(spec, "retry", "parent", "--json"))["from_step"] == 2
    assert run.result(timeout=20) == ["c-0 run 1", ["f-1 run 2", "f-2 run 2", "f-3 run 1"]]
    # The failed child was deleted with its history: the new one's starts with one 'started'.
    events = [r.event for r in query(durable.settings.database_url, HISTORY, id="parent/2")]
    assert events.count("started") == 1 and "failed" not in events, events


def work_task(durable: Durable) -> Any:
    return durable.app.tasks["adm.work"]


def test_fork_reruns_from_a_step_reusing_earlier_results(
    durable: Durable, shop: redis.Redis, prefix: str, worker: Any, spec: str
) -> None:
    original = durable.start("adm.three", "k", workflow_id="fork-src")
    assert original.result(timeout=20) == ["k-1 run 1", "k-2 run 1", "k-3 run 1"]

    result = durable_cli(spec, "fork", "fork-src", "--from-step", "2")
    assert result.exit_code == 0, result.output
    new_id = result.stdout.strip()
    assert new_id.startswith("fork-src-fork-") and result.stdout == f"{new_id}\n"
    assert durable.run(new_id).result(timeout=20) == ["k-1 run 1", "k-2 run 2", "k-3 run 2"]
    assert [count(shop, prefix, f"k-{n}") for n in (1, 2, 3)] == [1, 2, 2]
    assert original.result(timeout=1) == ["k-1 run 1", "k-2 run 1", "k-3 run 1"]

    named = as_json(
        durable_cli(spec, "fork", "fork-src", "--from-step", "4", "--id", "f-all", "--json")
    )
    assert (named["id"], named["copied"]) == ("f-all", 3)
    assert durable.run("f-all").result(timeout=20) == original.result(timeout=1)
    assert count(shop, prefix, "k-3") == 2

    taken = durable_cli(spec, "fork", "fork-src", "--from-step", "1", "--id", "f-all")
    assert taken.exit_code == 1 and "is taken" in one_line_error(taken)
    assert durable_cli(spec, "fork", "nope", "--from-step", "1").exit_code == 1
    assert durable_cli(spec, "fork", "fork-src", "--from-step", "0").exit_code == 2


def test_purge_deletes_old_finished_runs_with_everything_they_recorded(
    durable: Durable, shop: Any, worker: Any, spec: str, database_url: str
) -> None:
    for wid in ("p-old", "p-new"):
        durable.start("adm.three", wid, workflow_id=wid).result(timeout=20)
    durable.start("adm.signal", workflow_id="p-running")
    durable.signal("p-running", "other", 1)
    query(  # finished 40 days ago (and a running run as old: never purged)
        database_url,
        "UPDATE durable_workflows SET finished_at = now() - interval '40 days', "
        "created_at = now() - interval '40 days' WHERE id IN ('p-old', 'p-running') "
        "RETURNING id",
    )
    dry = as_json(durable_cli(spec, "purge", "--older-than", "30d", "--dry-run", "--json"))
    assert dry == {"purged": 0, "matched": 1, "dry_run": True}
    result = durable_cli(spec, "purge", "--older-than", "30d")
    assert result.exit_code == 0 and "purged 1 run(s)" in result.stdout
    left = {r.id for r in query(database_url, "SELECT id FROM durable_workflows")}
    assert left == {"p-new", "p-running"}
    for table in ("durable_steps", "durable_history", "durable_timers"):
        assert query(database_url, f"SELECT 1 FROM {table} WHERE workflow_id = 'p-old'") == []
    assert query(database_url, "SELECT 1 FROM durable_signals WHERE workflow_id = 'p-running'")

    bad = durable_cli(spec, "purge", "--older-than", "soon")
    assert bad.exit_code == 2 and "--older-than" in one_line_error(bad)


def test_a_run_started_under_a_deleted_run_s_id_shows_only_its_own_history(
    durable: Durable, shop: Any, worker: Any, database_url: str
) -> None:
    durable.start("adm.three", "h", workflow_id="h-1").result(timeout=20)
    # Deleted by hand (as TRUNCATE ... CASCADE would): the history has no foreign key.
    query(database_url, "DELETE FROM durable_workflows WHERE id = 'h-1' RETURNING id")
    assert query(database_url, "SELECT 1 FROM durable_history WHERE workflow_id = 'h-1'")
    durable.start("adm.three", "h", workflow_id="h-1").result(timeout=20)
    events = [r.event for r in query(database_url, HISTORY, id="h-1")]
    assert events.count("started") == 1 and events.count("completed") == 1, events
    assert events[0] == "started"


def test_timers_list(durable: Durable, shop: Any, worker: Any, beat: Any, spec: str) -> None:
    durable.start("adm.sleepy", 3600, workflow_id="t-long")
    quick = durable.start("adm.sleepy", 0.1, workflow_id="t-quick")
    assert quick.result(timeout=20) == "rested"
    wait_until(lambda: as_json(durable_cli(spec, "timers", "list", "--json")), what="the timer")
    (pending,) = as_json(durable_cli(spec, "timers", "list", "--json"))
    assert (pending["workflow_id"], pending["seq"], pending["purpose"]) == ("t-long", 1, "sleep")
    assert pending["fired_at"] is None and pending["step"] == "sleep"
    every = as_json(durable_cli(spec, "timers", "list", "--all", "--json"))
    assert [t["workflow_id"] for t in every] == ["t-quick", "t-long"]
    only = as_json(durable_cli(spec, "timers", "list", "--all", "--workflow", "t-quick", "--json"))
    assert [t["workflow_id"] for t in only] == ["t-quick"]
    table = durable_cli(spec, "timers", "list").stdout
    assert "t-long" in table and "in 59m" in table


def test_signal_and_cancel(durable: Durable, shop: Any, worker: Any, spec: str) -> None:
    waiting = durable.start("adm.signal", workflow_id="s-1")
    result = durable_cli(spec, "signal", "s-1", "go", "--payload", '{"carrier": "ups"}')
    assert result.exit_code == 0, result.output
    assert waiting.result(timeout=20) == {"carrier": "ups"}

    ended = durable_cli(spec, "signal", "s-1", "go")
    assert ended.exit_code == 1 and "already completed" in one_line_error(ended)
    assert durable_cli(spec, "signal", "nope", "go").exit_code == 1
    bad = durable_cli(spec, "signal", "s-1", "go", "--payload", "{")
    assert bad.exit_code == 2 and "--payload" in one_line_error(bad)

    sleeping = durable.start("adm.sleepy", 3600, workflow_id="c-1")
    wait_until(lambda: query(durable.settings.database_url, TIMERS, id="c-1"), what="the sleep")
    result = durable_cli(spec, "cancel", "c-1")
    assert result.exit_code == 0, result.output
    wait_until(lambda: sleeping.status() == "cancelled", what="the cancellation")
    again = durable_cli(spec, "cancel", "c-1")
    assert again.exit_code == 1 and "already cancelled" in one_line_error(again)


TIMERS = "SELECT id FROM durable_timers WHERE workflow_id = :id"
