"""Concurrency limits: admission per key, priority, run-time changes, bad input, and what
operators see; across real worker processes, with a SIGKILL, a Redis flush and a new beat."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from prometheus_client import CollectorRegistry

from durable import Durable, InvalidLimit, Limit, LimitKeyError
from durable import admin as admin_verbs
from durable.beat import Beat
from durable.errors import LimitNotFound
from durable.metrics import StoreCollector
from durable.store import limits as limit_queries
from tests.apps.limits_app import build
from tests.conftest import ROOT, Background, Workers, clean_keys, clean_tables, query, wait_until
from tests.limit_helpers import all_completed, entered, in_process, invoke

# -- helpers --------------------------------------------------------------------------------


def statuses(database_url: str, name: str) -> dict[str, int]:
    """How many steps of the limit are in each status."""
    rows = query(
        database_url,
        "SELECT status, count(*) AS n FROM durable_steps WHERE limit_name = :n GROUP BY status",
        n=name,
    )
    return {r.status: int(r.n) for r in rows}


def intervals(database_url: str, name: str) -> list[tuple[datetime, datetime]]:
    rows = query(
        database_url,
        "SELECT started_at, completed_at FROM durable_steps WHERE limit_name = :n",
        n=name,
    )
    return [(r.started_at, r.completed_at) for r in rows]


def most_at_once(spans: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one moment; an end at the same instant as a start first."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    peak = running = 0
    for _, change in edges:
        running += change
        peak = max(peak, running)
    return peak


# -- in-process: one worker thread pool and a beat ------------------------------------------


@pytest.fixture
def limited(
    database_url: str, redis_url: str, prefix: str
) -> Iterator[tuple[Celery, Durable, redis.Redis]]:
    with in_process(build, database_url, redis_url, prefix) as running:
        yield running


def test_priority_orders_the_queue_and_show_and_list_see_it(
    limited: tuple[Celery, Durable, redis.Redis], prefix: str, database_url: str
) -> None:
    _, durable, client = limited
    name = f"{prefix}-single"
    blocker = durable.start("limits.gated", "c", "blocker").id
    wait_until(lambda: entered(client, prefix) == ["blocker"], what="the blocker holds the slot")
    priorities = [0, 5, 1, 5, 3]
    ids = [durable.start("limits.gated", "c", f"p{i}", p).id for i, p in enumerate(priorities)]
    wait_until(lambda: statuses(database_url, name).get("queued") == 5, what="five queued")

    with durable.connect() as conn:
        shown = {i: admin_verbs.describe_run(conn, i)["steps"][0]["limit"] for i in ids}
        listed = {r["id"] for r in admin_verbs.list_runs(conn, waiting="queued")}
    # Highest priority first; equal priorities in the order they were scheduled.
    assert [shown[i]["position"] for i in ids] == [5, 1, 4, 2, 3]
    assert {s["key"] for s in shown.values()} == {"*"}
    assert {s["limit"] for s in shown.values()} == {name}
    assert listed == set(ids)
    result = invoke("show", ids[1], "--database-url", database_url)
    assert result.exit_code == 0, result.output
    assert f"queued #1 {name}[*]" in " ".join(result.output.split())
    listing = invoke("list", "--waiting", "queued", "--json", "--database-url", database_url)
    assert {r["id"] for r in json.loads(listing.output)} == set(ids)

    client.set(f"{prefix}:open", 1)
    wait_until(lambda: all_completed(durable, [blocker, *ids]), timeout=60, what="all done")
    assert entered(client, prefix) == ["blocker", "p1", "p3", "p4", "p2", "p0"]
    assert most_at_once(intervals(database_url, name)) == 1


def test_a_limit_changed_while_steps_queue(
    limited: tuple[Celery, Durable, redis.Redis], prefix: str, database_url: str
) -> None:
    _, durable, client = limited
    name = f"{prefix}-single"
    ids = [durable.start("limits.gated", "c", f"g{i}").id for i in range(5)]
    wait_until(lambda: len(entered(client, prefix)) == 1, what="one admitted")
    wait_until(lambda: statuses(database_url, name).get("queued") == 4, what="four queued")

    assert admin_verbs.set_limit(durable, name, 3) == 2  # raised: two more fit at once
    wait_until(lambda: len(entered(client, prefix)) == 3, what="three running")
    with durable.connect() as conn:
        (use,) = admin_verbs.list_limits(conn, name)
    assert (use["concurrency"], use["override"], use["effective"], use["rate"]) == (1, 3, 3, None)
    assert (use["running"], use["queued"]) == (3, 2)
    assert use["keys"] == [{"key": "*", "running": 3, "queued": 2}]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(durable))
    assert registry.get_sample_value("durable_limit_running", {"limit": name}) == 3
    assert registry.get_sample_value("durable_limit_queued", {"limit": name}) == 2

    # Lowered to 0 (a pause): the three keep their slots, nothing more is admitted.
    result = invoke("limits", "set", name, "--concurrency", "0", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    client.set(f"{prefix}:open", 1)
    wait_until(lambda: sum(durable.run(i).status() == "completed" for i in ids) == 3)
    with durable.connect() as conn:
        keys = limit_queries.queued_keys(conn, name)
    assert keys == []  # no key has room
    assert durable.admit([(name, "*", 1, None)]) == 0
    assert statuses(database_url, name).get("queued") == 2

    # Cleared: the code's declaration (1) applies again, and the queue drains one by one.
    result = invoke("limits", "set", name, "--clear", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    wait_until(lambda: all_completed(durable, ids), timeout=60, what="the rest done")
    listing = json.loads(invoke("limits", "--json", "--database-url", database_url).output)
    assert [(r["name"], r["override"], r["queued"]) for r in listing] == [(name, None, 0)]


def test_a_rate_changed_at_run_time(
    limited: tuple[Celery, Durable, redis.Redis], prefix: str, database_url: str
) -> None:
    _, durable, _ = limited
    name, single = f"{prefix}-rate", f"{prefix}-single"
    first = durable.start("limits.one", "any", "r", 0.0, "rate")
    other = durable.start("limits.one", "any", "s", 0.0, "single")
    assert [first.result(timeout=30), other.result(timeout=30)] == ["r", "s"]

    result = invoke("limits", "set", name, "--rate", "1/s", "--database-url", database_url)
    assert result.exit_code == 0, result.output
    with durable.connect() as conn:
        (use,) = admin_verbs.list_limits(conn, name)
    assert (use["rate"], use["rate_override"]) == ("5/s", "1/s")
    table = invoke("limits", "--database-url", database_url)
    assert "1/s (declared 5/s)" in table.output
    ids = [durable.start("limits.one", "any", f"o{i}", 0.0, "rate").id for i in range(4)]
    wait_until(lambda: all_completed(durable, ids), timeout=60, what="four done")
    admitted = [
        r.dispatched_at
        for r in query(
            database_url,
            "SELECT dispatched_at FROM durable_steps WHERE workflow_id = ANY(:ids) ORDER BY 1",
            ids=ids,
        )
    ]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(admitted)]
    assert len(gaps) == 3 and min(gaps) > 0.5  # admitted one a second, not five

    # Bad input: a malformed rate, a rate on a limit that declares none; nothing written.
    bad = invoke("limits", "set", name, "--rate", "fast", "--database-url", database_url)
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "rate must be like" in bad.stderr
    none = invoke("limits", "set", single, "--rate", "2/s", "--database-url", database_url)
    assert none.exit_code == 1
    assert none.stderr.strip().endswith("declares no rate: --rate overrides a declared rate only")
    with durable.connect() as conn:
        (kept,) = admin_verbs.list_limits(conn, single)
    assert (kept["override"], kept["rate_override"]) == (None, None)

    cleared = invoke("limits", "set", name, "--clear", "--database-url", database_url)
    assert cleared.exit_code == 0, cleared.output
    with durable.connect() as conn:
        (use,) = admin_verbs.list_limits(conn, name)
    assert (use["rate"], use["rate_override"], use["override"]) == ("5/s", None, None)


def test_a_task_declares_its_limit_and_other_tasks_keep_their_keywords(
    limited: tuple[Celery, Durable, redis.Redis], prefix: str, database_url: str
) -> None:
    _, durable, client = limited
    plain = durable.start("limits.plain")
    assert plain.result(timeout=30) == [3, 4]  # limit= and priority= reached the task
    first = durable.start("limits.declared", "ann", "a").id
    wait_until(lambda: entered(client, prefix) == ["a"], what="the first admitted")
    second = durable.start("limits.declared", "ann", "b").id
    other = durable.start("limits.declared", "bob", "c").id  # another key: its own slot
    wait_until(lambda: sorted(entered(client, prefix)) == ["a", "c"], what="bob's admitted")
    assert statuses(database_url, f"{prefix}-declared") == {"started": 2, "queued": 1}
    client.set(f"{prefix}:open", 1)
    assert durable.run(second).result(timeout=30) == "b:7"
    assert [durable.run(i).result(timeout=30) for i in (first, other)] == ["a:7", "c:7"]


def test_a_parallel_batch_under_a_limit(
    limited: tuple[Celery, Durable, redis.Redis], prefix: str, database_url: str
) -> None:
    _, durable, client = limited
    name = f"{prefix}-single"
    run = durable.start("limits.fan", ["a", "b", "c", "d"])
    wait_until(lambda: len(entered(client, prefix)) == 1, what="one of the batch admitted")
    wait_until(lambda: statuses(database_url, name).get("queued") == 3, what="three queued")
    client.set(f"{prefix}:open", 1)
    assert run.result(timeout=60) == ["a", "b", "c", "d"]
    assert entered(client, prefix) == ["a", "b", "c", "d"]  # equal priority: in order
    assert most_at_once(intervals(database_url, name)) == 1


def test_bad_limits_are_refused_in_one_line(
    limited: tuple[Celery, Durable, redis.Redis], prefix: str, database_url: str
) -> None:
    _, durable, _ = limited
    for args, kwargs, says in [
        (("", 1), {}, "name must be a non-empty string"),
        (("x", -1), {}, "concurrency must be between 1 and"),
        (("x", 0), {}, "concurrency must be between 1 and"),
        (("x", "2"), {}, "concurrency must be an integer"),
        (("x", 1), {"key": "customer"}, "key must be a function"),
    ]:
        with pytest.raises(InvalidLimit, match=says) as caught:
            Limit(*args, **kwargs)
        assert "\n" not in str(caught.value)
    for rate, says in [
        ("fast", "rate must be like '100/m'"),
        ("0/s", "must allow at least 1 start"),
        ("5/x", "rate must be like"),
        (5, "rate must be like"),
    ]:
        with pytest.raises(InvalidLimit, match=says):
            Limit("x", rate=rate)  # type: ignore[arg-type]
    with pytest.raises(InvalidLimit, match="give concurrency=, rate= or both"):
        Limit("x")
    with pytest.raises(InvalidLimit, match="priority must be an integer"):
        Limit("x", 1).for_step([], {}, "high")  # type: ignore[arg-type]

    # A key function that raises fails the run with a one-line error; nothing is queued.
    run = durable.start("limits.bad_key", "not-a-dict")
    wait_until(lambda: run.status() == "failed", what="the run failed")
    with durable.connect() as conn:
        error = admin_verbs.describe_run(conn, run.id)["error"]
    assert "LimitKeyError" in error and "key function raised TypeError" in error
    assert "\n" not in error
    assert query(database_url, "SELECT 1 FROM durable_steps WHERE workflow_id = :w", w=run.id) == []
    local = durable.start("limits.local")
    wait_until(lambda: local.status() == "failed", what="the local step refused")
    with durable.connect() as conn:
        error = admin_verbs.describe_run(conn, local.id)["error"]
    assert "limit= applies to remote steps, not to local=True" in error
    with pytest.raises(LimitKeyError, match="must return a non-empty string"):
        Limit("x", 1, key=lambda *_: 42).key_of([1], {})

    # Operators: an unknown limit, a negative override.
    with pytest.raises(LimitNotFound, match="no limit named 'nope'"):
        admin_verbs.set_limit(durable, "nope", 2)
    result = invoke("limits", "set", "nope", "--concurrency", "2", "--database-url", database_url)
    assert result.exit_code == 1
    assert result.stderr.strip() == "durable: no limit named 'nope'"
    bad = invoke("limits", "set", "nope", "--concurrency", "-1", "--database-url", database_url)
    assert bad.exit_code == 2 and len(bad.stderr.strip().splitlines()) == 1
    both = invoke("limits", "set", "x", "--concurrency", "1", "--clear")
    assert both.exit_code == 2 and "exactly one of" in both.stderr
    with durable.connect() as conn:
        with pytest.raises(InvalidLimit, match="between 0 and"):
            admin_verbs.override_limit(conn, "nope", -3)
        assert admin_verbs.list_limits(conn) == []  # nothing was registered by any of it


# -- real worker processes ------------------------------------------------------------------


@pytest.fixture
def fleet(
    database_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> Iterator[tuple[Durable, Workers, redis.Redis, list[Background], list[Beat]]]:
    clean_tables(database_url)
    env = {
        **os.environ,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        "LIMITS_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }
    _, durable = build(database_url, redis_url, prefix)
    workers = Workers(env, tmp_path, "tests.apps.limits_app")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    beats = [Beat(durable, sweep_interval=0.5)]
    threads = [Background(beats[0].run)]
    try:
        yield durable, workers, client, threads, beats
    finally:
        client.set(f"{prefix}:open", 1)
        for beat in beats:
            beat.stopping.set()
        for thread in threads:
            thread.join(5)
        workers.stop_all()
        clean_keys(redis_url, prefix)
        clean_tables(database_url)


def test_thirty_steps_on_three_workers_never_overlap_more_than_two(
    fleet: Any, prefix: str, database_url: str
) -> None:
    durable, workers, *_ = fleet
    for i in range(3):
        workers.start(f"w{i}", concurrency=2)
    ids = [durable.start("limits.one", "acme", f"t{i}", 0.2).id for i in range(30)]
    wait_until(lambda: all_completed(durable, ids), timeout=240, interval=0.5, what="30 done")
    spans = intervals(database_url, f"{prefix}-customer")
    assert len(spans) == 30 and all(start and end for start, end in spans)
    assert most_at_once(spans) == 2  # the limit was used, never exceeded
    workers_used = query(
        database_url,
        "SELECT count(DISTINCT worker) AS n FROM durable_steps WHERE limit_name = :n",
        n=f"{prefix}-customer",
    )
    assert workers_used[0].n >= 2  # the slots were shared across processes


def test_a_sigkilled_worker_frees_its_slot_within_the_lease(
    fleet: Any, prefix: str, database_url: str
) -> None:
    durable, workers, client, *_ = fleet
    name = f"{prefix}-single"
    first = workers.start("w0")
    held = durable.start("limits.gated", "c", "held").id
    wait_until(lambda: entered(client, prefix) == ["held"], timeout=60, what="slot taken")
    queued = [durable.start("limits.gated", "c", f"q{i}").id for i in range(3)]
    wait_until(lambda: statuses(database_url, name).get("queued") == 3, what="three queued")
    workers.start("w1")
    workers.start("w2")
    workers.kill(first)  # it held the only slot
    client.set(f"{prefix}:open", 1)
    wait_until(lambda: all_completed(durable, [held, *queued]), timeout=90, what="all done")
    (row,) = query(
        database_url, "SELECT attempts FROM durable_steps WHERE workflow_id = :w", w=held
    )
    assert row.attempts == 2  # the killed attempt's lease expired; it ran again
    lost = query(
        database_url,
        "SELECT 1 FROM durable_history WHERE workflow_id = :w AND event = 'step lease expired'",
        w=held,
    )
    assert len(lost) == 1
    assert most_at_once(intervals(database_url, name)) == 1


def test_queued_steps_survive_a_redis_flush_and_a_new_beat(
    fleet: Any, prefix: str, database_url: str, redis_url: str
) -> None:
    durable, workers, client, threads, beats = fleet
    name = f"{prefix}-single"
    for i in range(3):
        workers.start(f"w{i}")
    ids = [durable.start("limits.gated", "c", f"g{i}").id for i in range(4)]
    wait_until(lambda: len(entered(client, prefix)) == 1, timeout=60, what="one admitted")
    wait_until(lambda: statuses(database_url, name).get("queued") == 3, what="three queued")

    beats[0].stopping.set()
    threads[0].join(5)
    clean_keys(redis_url, prefix)  # every key of this test: queues, timer index, entries
    beats.append(Beat(durable, sweep_interval=0.5))
    threads.append(Background(beats[-1].run))
    assert statuses(database_url, name).get("queued") == 3  # PostgreSQL kept them

    client.set(f"{prefix}:open", 1)
    wait_until(lambda: all_completed(durable, ids), timeout=120, interval=0.5, what="all done")
    assert most_at_once(intervals(database_url, name)) == 1


def test_a_rate_spreads_thirty_starts_and_survives_a_redis_flush(
    fleet: Any, prefix: str, database_url: str, redis_url: str
) -> None:
    durable, workers, *_ = fleet
    name = f"{prefix}-rate"
    for i in range(3):
        workers.start(f"w{i}", concurrency=2)
    # The rate spaces the sends; a worker still booting would take a backlog all at once.
    ping = durable.app.control.ping
    wait_until(lambda: len(ping(timeout=0.5)) == 3, timeout=60, what="three workers up")
    ids = [durable.start("limits.one", "any", f"r{i}", 0.0, "rate").id for i in range(30)]
    done = lambda: sum(durable.run(i).status() == "completed" for i in ids)  # noqa: E731
    wait_until(lambda: done() >= 10, timeout=60, interval=0.2, what="ten started")
    clean_keys(redis_url, prefix)  # the buckets, the timer index and the queues are gone
    wait_until(lambda: done() == 30, timeout=180, interval=0.5, what="all 30 done")
    starts = sorted(start for start, _ in intervals(database_url, name))
    assert len(starts) == 30
    # 5 per second, spaced evenly: 30 starts span at least 29 intervals of 0.2 s, less the
    # one start a lost bucket may let through early.
    assert (starts[-1] - starts[0]).total_seconds() >= 5.5
    assert statuses(database_url, name) == {"completed": 30}
    with durable.connect() as conn:
        (use,) = admin_verbs.list_limits(conn, name)
    assert (use["concurrency"], use["rate"], use["running"], use["queued"]) == (None, "5/s", 0, 0)
