"""Workflows under a concurrency limit: runs queued per key, priority, cancellation, child
workflows, what operators see, bad input; across real worker processes and a SIGKILL."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import redis
from celery import Celery
from prometheus_client import CollectorRegistry

from durable import Durable, InvalidLimit, Limit, LimitKeyError
from durable import admin as admin_verbs
from durable.beat import Beat
from durable.errors import WorkflowNotRunning
from durable.metrics import StoreCollector
from tests.apps.run_limits_app import build
from tests.conftest import ROOT, Background, Workers, clean_keys, clean_tables, query, wait_until
from tests.limit_helpers import all_completed, entered, in_process, invoke

# -- helpers --------------------------------------------------------------------------------


def run_spans(database_url: str, name: str) -> dict[str, tuple[datetime, datetime | None]]:
    """Each run of workflow ``name``: from its recorded 'started' to its recorded end."""
    rows = query(
        database_url,
        """
        SELECT w.id,
               (SELECT min(h.at) FROM durable_history h
                 WHERE h.workflow_id = w.id AND h.seq IS NULL AND h.event = 'started') AS began,
               (SELECT min(h.at) FROM durable_history h
                 WHERE h.workflow_id = w.id AND h.seq IS NULL
                   AND h.event IN ('completed', 'failed', 'cancelled')) AS ended
          FROM durable_workflows w WHERE w.name = :n
        """,
        n=name,
    )
    return {r.id: (r.began, r.ended) for r in rows}


def most_at_once(spans: list[tuple[datetime, datetime | None]]) -> int:
    """The most intervals open at one moment; an end at the same instant as a start first."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans if end])
    peak = running = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    return peak


def queued_runs(database_url: str, name: str) -> int:
    rows = query(
        database_url,
        "SELECT count(*) AS n FROM durable_workflows WHERE limit_name = :n AND queued",
        n=name,
    )
    return int(rows[0].n)


def child_of(database_url: str, parent_id: str) -> str:
    (row,) = query(
        database_url, "SELECT id FROM durable_workflows WHERE parent_id = :p", p=parent_id
    )
    return str(row.id)


# -- in-process: one worker thread pool and a beat ------------------------------------------


@pytest.fixture
def limited(
    database_url: str, redis_url: str, prefix: str
) -> Iterator[tuple[Celery, Durable, redis.Redis]]:
    with in_process(build, database_url, redis_url, prefix) as running:
        yield running


def test_queued_runs_start_by_priority_and_operators_see_them(
    limited: tuple[Celery, Durable, redis.Redis], prefix: str, database_url: str
) -> None:
    _, durable, client = limited
    name = f"{prefix}-single"
    blocker = durable.start("runlimits.gated", "t", "blocker").id
    wait_until(lambda: entered(client, prefix) == ["blocker"], what="the blocker holds the slot")
    priorities = [0, 5, 1, 5, 3]
    ids = [
        durable.start("runlimits.gated", "t", f"p{i}", priority=p).id
        for i, p in enumerate(priorities)
    ]
    assert queued_runs(database_url, name) == 5  # written queued at once, by start itself
    assert all(durable.run(i).status() == "running" for i in ids)  # public status unchanged

    with durable.connect() as conn:
        shown = {i: admin_verbs.describe_run(conn, i)["limit"] for i in ids}
        listed = {r["id"]: r["waiting"] for r in admin_verbs.list_runs(conn, waiting="queued")}
        (use,) = admin_verbs.list_limits(conn, name)
    # Highest priority first; equal priorities in the order they were started.
    assert [shown[i]["position"] for i in ids] == [5, 1, 4, 2, 3]
    assert [shown[i]["priority"] for i in ids] == priorities
    assert {(s["limit"], s["key"], s["queued"]) for s in shown.values()} == {(name, "*", True)}
    assert set(listed) == set(ids)
    assert {w["on"] for w in listed.values()} == {"queued"}
    assert (use["concurrency"], use["running"], use["queued"]) == (1, 1, 5)
    assert use["keys"] == [{"key": "*", "running": 1, "queued": 5}]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(durable))
    assert registry.get_sample_value("durable_limit_running", {"limit": name}) == 1
    assert registry.get_sample_value("durable_limit_queued", {"limit": name}) == 5
    shown_cli = invoke("show", ids[1], "--database-url", database_url)
    assert shown_cli.exit_code == 0, shown_cli.output
    assert f"queued #1 for limit {name}[*], priority 5" in " ".join(shown_cli.output.split())
    listing = invoke("list", "--waiting", "queued", "--json", "--database-url", database_url)
    assert {r["id"] for r in json.loads(listing.output)} == set(ids)
    # A queued run runs no code: no step of it exists, and no activation took it.
    steps = query(
        database_url,
        "SELECT count(*) AS n FROM durable_steps WHERE workflow_id = ANY(:ids)",
        ids=ids,
    )
    assert steps[0].n == 0

    client.set(f"{prefix}:open", 1)
    wait_until(lambda: all_completed(durable, [blocker, *ids]), timeout=60, what="all done")
    assert entered(client, prefix) == ["blocker", "p1", "p3", "p4", "p2", "p0"]
    spans = run_spans(database_url, "runlimits.gated")
    assert most_at_once(list(spans.values())) == 1
    with durable.connect() as conn:
        (use,) = admin_verbs.list_limits(conn, name)
        after = admin_verbs.describe_run(conn, ids[0])["limit"]
    assert (use["running"], use["queued"]) == (0, 0)
    assert (after["queued"], after["position"]) == (False, None)


def test_a_run_cancelled_while_queued_ends_at_once_and_frees_no_one(
    limited: tuple[Celery, Durable, redis.Redis], prefix: str, database_url: str
) -> None:
    _, durable, client = limited
    name = f"{prefix}-single"
    blocker = durable.start("runlimits.gated", "t", "blocker").id
    wait_until(lambda: entered(client, prefix) == ["blocker"], what="the blocker holds the slot")
    doomed = durable.start("runlimits.gated", "t", "doomed").id
    after = durable.start("runlimits.gated", "t", "after").id
    assert queued_runs(database_url, name) == 2

    durable.cancel(doomed)
    assert durable.run(doomed).status() == "cancelled"  # at once: nothing of it ever ran
    events = [
        r.event
        for r in query(
            database_url,
            "SELECT event FROM durable_history WHERE workflow_id = :w ORDER BY id",
            w=doomed,
        )
    ]
    assert events == ["queued", "cancel requested", "cancelled"]
    assert queued_runs(database_url, name) == 1  # the slot is still the blocker's
    assert entered(client, prefix) == ["blocker"]

    client.set(f"{prefix}:open", 1)
    wait_until(lambda: all_completed(durable, [blocker, after]), timeout=60, what="the rest")
    assert entered(client, prefix) == ["blocker", "after"]
    with pytest.raises(WorkflowNotRunning):
        durable.cancel(doomed)  # ended: refused as for any run that has ended


def test_a_child_workflow_under_a_limit_waits_for_its_slot(
    limited: tuple[Celery, Durable, redis.Redis], prefix: str, database_url: str
) -> None:
    _, durable, client = limited
    name = f"{prefix}-single"
    blocker = durable.start("runlimits.gated", "t", "blocker").id
    wait_until(lambda: entered(client, prefix) == ["blocker"], what="the blocker holds the slot")
    parent = durable.start("runlimits.parent", "child")
    wait_until(lambda: queued_runs(database_url, name) == 1, what="the child queued")
    child = child_of(database_url, parent.id)
    with durable.connect() as conn:
        shown = admin_verbs.describe_run(conn, child)
    assert shown["parent_id"] == parent.id
    assert (shown["limit"]["queued"], shown["limit"]["position"]) == (True, 1)

    client.set(f"{prefix}:open", 1)
    assert parent.result(timeout=60) == "child"
    assert entered(client, prefix) == ["blocker", "child"]
    assert durable.run(blocker).status() == "completed"
    assert most_at_once(list(run_spans(database_url, "runlimits.gated").values())) == 1

    # A parent cancelled while its child is queued ends cancelled; the child, once admitted,
    # ends cancelled too without running its step.
    client.delete(f"{prefix}:open")
    holder = durable.start("runlimits.gated", "t", "holder").id
    wait_until(lambda: entered(client, prefix)[-1] == "holder", what="the slot taken again")
    second = durable.start("runlimits.parent", "never")
    wait_until(lambda: queued_runs(database_url, name) == 1, what="the second child queued")
    durable.cancel(second.id)
    wait_until(lambda: second.status() == "cancelled", what="the parent cancelled")
    client.set(f"{prefix}:open", 1)
    assert durable.run(holder).result(timeout=60) == "holder"
    queued_child = durable.run(child_of(database_url, second.id))
    wait_until(lambda: queued_child.status() == "cancelled", timeout=30, what="child cancelled")
    assert "never" not in entered(client, prefix)
    rows = query(
        database_url, "SELECT status FROM durable_steps WHERE workflow_id = :w", w=queued_child.id
    )
    assert {r.status for r in rows} <= {"cancelled"}  # no step of it ran


def test_a_retried_run_queues_again_and_a_raised_override_admits_it(
    limited: tuple[Celery, Durable, redis.Redis], prefix: str, database_url: str
) -> None:
    _, durable, client = limited
    name = f"{prefix}-single"
    flaky = durable.start("runlimits.flaky", "t", "f")
    wait_until(lambda: flaky.status() == "failed", what="the run failed")
    blocker = durable.start("runlimits.gated", "t", "blocker").id
    wait_until(lambda: entered(client, prefix) == ["blocker"], what="the blocker holds the slot")

    client.set(f"{prefix}:fixed", 1)
    admin_verbs.retry(durable, flaky.id)
    assert flaky.status() == "running"
    with durable.connect() as conn:
        shown = admin_verbs.describe_run(conn, flaky.id)["limit"]
    assert (shown["queued"], shown["position"]) == (True, 1)  # the blocker holds the slot

    assert admin_verbs.set_limit(durable, name, 2) == 1  # raised: the retried run fits now
    assert flaky.result(timeout=30) == "f"
    assert durable.run(blocker).status() == "running"  # still holding its own slot
    with durable.connect() as conn:
        (use,) = admin_verbs.list_limits(conn, name)
    assert (use["concurrency"], use["override"], use["running"], use["queued"]) == (1, 2, 1, 0)
    client.set(f"{prefix}:open", 1)
    assert durable.run(blocker).result(timeout=30) == "blocker"


def test_the_beat_sweep_admits_runs_an_override_made_room_for(
    limited: tuple[Celery, Durable, redis.Redis], prefix: str, database_url: str
) -> None:
    _, durable, client = limited
    name = f"{prefix}-single"
    blocker = durable.start("runlimits.gated", "t", "blocker").id
    wait_until(lambda: entered(client, prefix) == ["blocker"], what="the blocker holds the slot")
    waiting = durable.start("runlimits.gated", "t", "waiting").id
    assert queued_runs(database_url, name) == 1
    # Without the app the command only writes the override: the beat's sweep admits.
    result = invoke("limits", "set", name, "--concurrency", "2", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert "by the beat's next sweep" in result.output
    wait_until(lambda: entered(client, prefix) == ["blocker", "waiting"], what="swept in")
    assert queued_runs(database_url, name) == 0
    assert durable.run(blocker).status() == "running"  # both hold a slot now
    client.set(f"{prefix}:open", 1)
    assert [durable.run(i).result(timeout=30) for i in (blocker, waiting)] == [
        "blocker",
        "waiting",
    ]


def test_bad_input_to_a_limited_workflow_writes_nothing(
    limited: tuple[Celery, Durable, redis.Redis], prefix: str, database_url: str
) -> None:
    _, durable, _ = limited
    with pytest.raises(InvalidLimit, match=r"a workflow's limit takes concurrency= .* only"):
        durable.workflow("x.rated", limit=Limit("x", rate="5/s"))
    with pytest.raises(InvalidLimit, match="a workflow's limit takes concurrency="):
        durable.workflow("x.both", limit=Limit("x", 2, rate="5/s"))
    with pytest.raises(TypeError, match=r"limit must be a durable\.Limit"):
        durable.workflow("x.bad", limit=2)  # type: ignore[arg-type]
    with pytest.raises(InvalidLimit, match="priority must be an integer"):
        durable.start("runlimits.gated", "t", "x", priority="high")  # type: ignore[arg-type]
    with pytest.raises(InvalidLimit, match="priority must be within"):
        durable.start("runlimits.gated", "t", "x", priority=2**40)
    with pytest.raises(ValueError, match="runs under a limit and cannot be delayed"):
        durable.start("runlimits.gated", "t", "x", countdown=timedelta(seconds=5))
    with pytest.raises(ValueError, match="runs under a limit and cannot be delayed"):
        durable.start_many("runlimits.gated", [("t", "x")], countdown=5)
    with pytest.raises(LimitKeyError, match="key function raised TypeError") as caught:
        durable.start("runlimits.bad_key", "not-a-dict", workflow_id="bad-key")
    assert "\n" not in str(caught.value)
    assert query(database_url, "SELECT id FROM durable_workflows") == []
    assert query(database_url, "SELECT name FROM durable_limits") == []
    # Without a limit, priority= is the workflow's own keyword argument, as it always was.
    assert durable.start("runlimits.unlimited", priority=3).result(timeout=30) == 3


# -- real worker processes ------------------------------------------------------------------


@pytest.fixture
def fleet(
    database_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> Iterator[tuple[Durable, Workers, redis.Redis]]:
    clean_tables(database_url)
    env = {
        **os.environ,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        "LIMITS_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }
    _, durable = build(database_url, redis_url, prefix)
    workers = Workers(env, tmp_path, "tests.apps.run_limits_app")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    beat = Beat(durable, sweep_interval=0.5)
    thread = Background(beat.run)
    try:
        yield durable, workers, client
    finally:
        client.set(f"{prefix}:open", 1)
        beat.stopping.set()
        thread.join(5)
        workers.stop_all()
        clean_keys(redis_url, prefix)
        clean_tables(database_url)


def test_ten_runs_of_a_key_on_two_workers_never_overlap_more_than_two(
    fleet: tuple[Durable, Workers, redis.Redis], database_url: str
) -> None:
    durable, workers, _ = fleet
    workers.start("w0", concurrency=3)
    workers.start("w1", concurrency=3)
    acme = [durable.start("runlimits.job", "acme", f"a{i}", 0.1).id for i in range(10)]
    other = [durable.start("runlimits.job", "other", f"o{i}", 0.1).id for i in range(2)]
    wait_until(
        lambda: all_completed(durable, [*acme, *other]), timeout=240, interval=0.5, what="done"
    )
    spans = run_spans(database_url, "runlimits.job")
    assert all(began and ended for began, ended in spans.values())
    # Per key: the limit was used and never exceeded; the other key had its own two slots.
    assert most_at_once([spans[i] for i in acme]) == 2
    assert most_at_once([spans[i] for i in other]) == 2
    assert most_at_once(list(spans.values())) <= 4
    workers_used = query(
        database_url,
        "SELECT count(DISTINCT worker) AS n FROM durable_steps WHERE workflow_id = ANY(:ids)",
        ids=acme,
    )
    assert workers_used[0].n >= 2  # the runs were spread over both processes


def test_a_sigkilled_worker_does_not_leak_a_run_slot(
    fleet: tuple[Durable, Workers, redis.Redis], prefix: str, database_url: str
) -> None:
    durable, workers, client = fleet
    name = f"{prefix}-single"
    first = workers.start("w0")
    held = durable.start("runlimits.gated", "t", "held").id
    wait_until(lambda: entered(client, prefix) == ["held"], timeout=60, what="slot taken")
    queued = [durable.start("runlimits.gated", "t", f"q{i}").id for i in range(2)]
    assert queued_runs(database_url, name) == 2
    workers.kill(first)  # mid-run: its run holds the only slot
    workers.start("w1")
    client.set(f"{prefix}:open", 1)
    wait_until(lambda: all_completed(durable, [held, *queued]), timeout=120, what="all done")
    # The killed attempt's step was sent again and ran again; then the queue, in order.
    assert entered(client, prefix) == ["held", "held", "q0", "q1"]
    spans = run_spans(database_url, "runlimits.gated")
    assert most_at_once(list(spans.values())) == 1
    # The queued runs started only once the killed worker's run had ended.
    assert all(spans[q][0] >= spans[held][1] for q in queued)  # type: ignore[operator]
