"""durable.chain, durable.group and durable.chord: Celery's canvas, each link checkpointed.

The canvases are run twice, by Celery itself and by durable, and must give the same results;
options, refusals and retries are checked; and a worker SIGKILLed mid-chain must not run a
committed link again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import celery
import pytest
import redis
from celery import Celery, group
from celery.contrib.testing.worker import start_worker

from durable import Durable, RetryPolicy, WorkflowFailed
from durable.activation import activate
from durable.beat import Beat
from durable.runner import execute_step
from durable.testing import TestEnv
from tests.apps.canvas_app import build
from tests.conftest import ROOT, Background, Workers, clean_keys, clean_tables, query, wait_until


class Fatal(Exception):
    """Raised by a task; listed as non-retryable."""


@pytest.fixture
def tasks(app: Celery, redis_url: str, prefix: str) -> SimpleNamespace:
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def count(name: str) -> int:
        return int(client.incr(f"{prefix}:count:{name}"))

    @app.task(name="cv.add", shared=False)
    def add(x: int, y: int) -> int:
        count("add")
        return x + y

    @app.task(name="cv.mul", shared=False)
    def mul(x: int, y: int) -> int:
        return x * y

    @app.task(name="cv.total", shared=False)
    def total(values: list[int]) -> int:
        return sum(values)

    @app.task(name="cv.pair", shared=False)
    def pair(x: int) -> tuple[int, int]:
        return x, 2 * x

    @app.task(name="cv.concat", shared=False)
    def concat(*parts: Any, sep: str = "+") -> str:
        return sep.join(str(p) for p in parts)

    @app.task(name="cv.flaky", shared=False)
    def flaky(fail_times: int) -> str:
        n = count("flaky")
        if n <= fail_times:
            raise ConnectionError(f"attempt {n} failed")
        return f"ok on attempt {n}"

    @app.task(name="cv.fatal", shared=False)
    def fatal() -> None:
        count("fatal")
        raise Fatal("no point retrying")

    return SimpleNamespace(
        add=add, mul=mul, total=total, pair=pair, concat=concat, flaky=flaky, fatal=fatal
    )


@pytest.fixture
def results_worker(app: Celery, tasks: SimpleNamespace, redis_url: str, prefix: str) -> Any:
    """An in-process worker, with a Redis result backend so that Celery's own canvas runs."""
    app.conf.result_backend = redis_url
    app.conf.result_backend_transport_options = {"global_keyprefix": f"{prefix}:"}
    with start_worker(
        app, pool="threads", concurrency=4, perform_ping_check=False, loglevel="WARNING"
    ) as worker:
        yield worker


# Each case builds a canvas from a vocabulary (Celery's chain/group/chord, or durable's) and
# is started with the arguments given; a group inside a chain stays Celery's own in both.
Case = tuple[Callable[[Any, SimpleNamespace], Any], tuple[Any, ...]]
CASES: dict[str, Case] = {
    "a chain, the last link immutable": (
        lambda c, t: c.chain(t.add.s(1, 2), t.mul.s(10), t.add.si(5, 5)),
        (),
    ),
    "a chain through a group into a body": (
        lambda c, t: c.chain(
            t.add.s(1, 2), group(t.mul.s(2), t.mul.s(3), t.add.si(0, 7)), t.total.s()
        ),
        (),
    ),
    "a chord": (lambda c, t: c.chord([t.add.s(i, i) for i in range(4)], t.total.s()), ()),
    "a group": (lambda c, t: c.group(t.add.s(1, 1), t.mul.s(2, 3)), ()),
    "a group given arguments": (lambda c, t: c.group([t.add.s(1), t.mul.s(3)]), (2,)),
    "a chain given arguments": (lambda c, t: c.chain(t.add.s(4), t.mul.s(8)), (2,)),
    "keyword arguments and a tuple result": (
        lambda c, t: c.chain(t.pair.s(4), t.concat.s("b", sep="-")),
        (),
    ),
    "a nested chain": (lambda c, t: c.chain(t.add.s(1, 1) | t.mul.s(5), t.add.s(1)), ()),
}


def test_canvases_give_the_results_celery_gives(
    app: Celery, durable: Durable, tasks: SimpleNamespace, results_worker: Any
) -> None:
    by_celery = SimpleNamespace(chain=celery.chain, group=celery.group, chord=celery.chord)
    by_durable = SimpleNamespace(chain=durable.chain, group=durable.group, chord=durable.chord)
    for number, (name, (build_canvas, args)) in enumerate(CASES.items()):
        expected = build_canvas(by_celery, tasks).apply_async(args).get(timeout=30)
        run = build_canvas(by_durable, tasks).apply_async(args, workflow_id=f"case-{number}")
        assert run.result(timeout=30) == expected, name


def test_code_that_waited_on_a_celery_chain_keeps_working(
    app: Celery, durable: Durable, tasks: SimpleNamespace, results_worker: Any
) -> None:
    def wait(result: Any) -> tuple[Any, ...]:
        value = result.get(timeout=30, propagate=True, interval=0.1)
        ready = (result.ready(), result.successful(), result.failed())
        return value, result.state, ready, result.task_id == result.id

    t = tasks
    by_celery = wait(celery.chain(t.add.s(1, 2), t.mul.s(10)).apply_async())
    by_durable = wait(durable.chain(t.add.s(1, 2), t.mul.s(10)).apply_async())
    assert by_durable == by_celery == (30, "SUCCESS", (True, True, False), True)


def test_a_group_of_one_is_unrolled_as_celery_unrolls_it(
    app: Celery, durable: Durable, tasks: SimpleNamespace, results_worker: Any
) -> None:
    t = tasks
    cases: dict[str, Callable[[Any], Any]] = {
        "between links": lambda c: c.chain(t.add.s(1, 2), group(t.mul.s(2)), t.add.s(1)),
        "the last link": lambda c: c.chain(t.add.s(1, 2), group(t.mul.s(2))),
        "the only link": lambda c: c.chain(group(t.add.s(1, 1))),
        "a group alone": lambda c: c.group(t.add.s(1, 1)),
        "a chord's header": lambda c: c.chord([t.add.s(1, 1)], t.total.s()),
    }
    by_celery = SimpleNamespace(chain=celery.chain, group=celery.group, chord=celery.chord)
    by_durable = SimpleNamespace(chain=durable.chain, group=durable.group, chord=durable.chord)
    for name, build_canvas in cases.items():
        expected = build_canvas(by_celery).apply_async().get(timeout=30)
        assert build_canvas(by_durable).apply_async().get(timeout=30) == expected, name
    assert durable.chain(t.add.s(1, 2), durable.group(t.mul.s(2))).delay().get(30) == 6


def test_the_pipe_operator_composes_as_celerys(
    app: Celery, durable: Durable, tasks: SimpleNamespace, results_worker: Any
) -> None:
    t = tasks
    composed = {
        "chain | signature": durable.chain(t.add.s(1, 2)) | t.mul.s(10),
        "signature | chain": t.add.s(1, 2) | durable.chain(t.mul.s(10)),
        "chain | chain": durable.chain(t.add.s(1, 2)) | durable.chain(t.mul.s(10)),
        "chain | celery chain": durable.chain(t.add.s(1, 2)) | (t.mul.s(10) | t.add.s(0)),
        "group | signature": durable.group(t.add.s(1, 2), t.add.si(3, 4)) | t.total.s(),
    }
    results = {name: run.apply_async().get(timeout=30) for name, run in composed.items()}
    assert results == {
        "chain | signature": 30,
        "signature | chain": 30,
        "chain | chain": 30,
        "chain | celery chain": 30,
        "group | signature": 10,
    }
    assert (t.add.s(1, 2) | t.mul.s(10) | t.add.s(0)).apply_async().get(timeout=30) == 30


def test_a_nested_durable_chain_is_spliced_in(
    durable: Durable, tasks: SimpleNamespace, results_worker: Any
) -> None:
    t = tasks
    inner = durable.chain(t.add.s(1, 2), t.mul.s(10))
    outer = durable.chain(inner, t.add.s(1), durable.chain(t.mul.s(2)))
    assert [link["task"] for link in outer.links] == ["cv.add", "cv.mul", "cv.add", "cv.mul"]
    assert outer.apply_async().get(timeout=30) == 62
    policy = RetryPolicy(max_attempts=3)
    assert durable.chain(inner.with_retry(policy), t.add.s(1)).retry == policy
    with pytest.raises(ValueError, match="different retry policies"):
        durable.chain(inner, t.add.s(1)).with_retry(RetryPolicy(max_attempts=2)) | inner


def test_countdown_is_a_durable_delayed_start(
    durable: Durable, tasks: SimpleNamespace, counter: Callable[[str], int], database_url: str
) -> None:
    t = tasks
    timers = "SELECT purpose, fire_at FROM durable_timers WHERE workflow_id = :w"
    steps = "SELECT name FROM durable_steps WHERE workflow_id = :w ORDER BY seq"
    with TestEnv(durable) as env:
        run = durable.chain(t.add.s(1, 2), t.mul.s(10)).apply_async(
            countdown=3600, workflow_id="delayed"
        )
        started = datetime.now(UTC)
        (timer,) = wait_until(lambda: query(database_url, timers, w="delayed"), what="the timer")
        assert timer.purpose == "sleep"
        assert abs((timer.fire_at - started).total_seconds() - 3600) < 60
        assert [r.name for r in query(database_url, steps, w="delayed")] == ["sleep"]
        assert (counter("add"), run.state, run.ready()) == (0, "PENDING", False)
        assert env.result(run, timeout=30) == 30
    assert 3600 - 120 <= env.skipped <= 3600 + 120
    assert counter("add") == 1
    names = [r.name for r in query(database_url, steps, w="delayed")]
    assert names == ["sleep", "cv.add", "cv.mul"]


def test_eta_start_replaces_the_first_links_own_countdown(
    durable: Durable, tasks: SimpleNamespace, database_url: str
) -> None:
    t = tasks
    at = datetime.now(UTC) + timedelta(days=1)
    canvas = durable.chain(t.add.s(1, 2).set(countdown=60), t.mul.s(10))
    with TestEnv(durable) as env:
        run = canvas.apply_async(eta=at, task_id="at-eta")
        assert run.id == "at-eta"
        assert env.result(run, timeout=30) == 30
    assert 86400 - 120 <= env.skipped <= 86400 + 120
    sql = "SELECT name FROM durable_steps WHERE workflow_id = 'at-eta' ORDER BY seq"
    assert [r.name for r in query(database_url, sql)] == ["sleep", "cv.add", "cv.mul"]


def test_apply_async_routes_the_first_link_as_celery_does(
    durable: Durable, tasks: SimpleNamespace, database_url: str
) -> None:
    t = tasks
    canvas = durable.chain(t.add.s(1, 2).set(queue="slow"), t.mul.s(10))
    canvas.apply_async(workflow_id="routed", queue="payments", priority=4, time_limit=30)
    assert activate(durable, "routed") == "suspended"  # no worker: each step run by hand
    assert execute_step(durable, "routed", 1) == "completed"
    assert execute_step(durable, "routed", 2) == "completed"
    assert durable.run("routed").get(timeout=10) == 30
    sql = "SELECT options FROM durable_steps WHERE workflow_id = 'routed' ORDER BY seq"
    first, second = (r.options for r in query(database_url, sql))
    assert (first["queue"], first["priority"], first["timeout"]) == ("payments", 4, 30.0)
    assert (second["queue"], second.get("priority")) == ("celery", None)


def test_apply_async_refuses_what_durable_cannot_honour(
    durable: Durable, tasks: SimpleNamespace
) -> None:
    canvas = durable.chain(tasks.add.s(1, 2))
    for option, reason in [
        ("link", "run the task as the next link"),
        ("link_error", "catches StepFailed"),
        ("expires", "set it on the links"),
    ]:
        with pytest.raises(ValueError, match=f"option '{option}' is refused: .*{reason}"):
            canvas.apply_async(**{option: 10})
    with pytest.raises(ValueError, match="not two different ids"):
        canvas.apply_async(workflow_id="a", task_id="b")


def test_a_chain_stored_before_groups_existed_still_runs(
    durable: Durable, tasks: SimpleNamespace, results_worker: Any
) -> None:
    links = [
        {"task": "cv.add", "args": [1, 2], "kwargs": {}, "options": {}, "immutable": False},
        {"task": "cv.mul", "args": [10], "kwargs": {}, "options": {}, "immutable": False},
    ]
    assert durable.start("durable.chain", links, workflow_id="old-format").result(20) == 30


def test_signature_options_route_and_limit_each_step(
    durable: Durable, tasks: SimpleNamespace, database_url: str
) -> None:
    t = tasks
    canvas = durable.chain(
        t.add.s(1, 2).set(queue="payments", priority=3),
        group(t.mul.s(2), t.mul.s(3).set(queue="fast")).set(queue="slow"),
        t.total.s().set(time_limit=30, soft_time_limit=20),
    )
    canvas.start(workflow_id="opts")  # no worker: each step is run by hand below
    assert activate(durable, "opts") == "suspended"
    for seq in (1, 2, 3, 4):
        assert execute_step(durable, "opts", seq) == "completed"
    assert durable.run("opts").result(timeout=10) == 15
    rows = query(
        database_url,
        "SELECT seq, name, options FROM durable_steps WHERE workflow_id = 'opts' ORDER BY seq",
    )
    routed = [(r.seq, r.name, r.options.get("queue"), r.options.get("timeout")) for r in rows]
    assert routed == [
        (1, "cv.add", "payments", None),
        (2, "cv.mul", "slow", None),
        (3, "cv.mul", "fast", None),
        (4, "cv.total", "celery", 20.0),  # the default queue, resolved when scheduled
    ]
    assert rows[0].options["priority"] == 3


def test_countdown_and_eta_are_durable_sleeps(
    durable: Durable, tasks: SimpleNamespace, database_url: str
) -> None:
    t = tasks
    at = datetime.now(UTC) + timedelta(days=2)
    canvas = durable.chain(
        t.add.s(1, 2), t.mul.s(10).set(countdown=3600), t.add.s(1).set(eta=at.isoformat())
    )
    with TestEnv(durable) as env:
        run = canvas.start(workflow_id="later")
        assert env.result(run, timeout=30) == 31
    assert 2 * 86400 - 120 <= env.skipped <= 2 * 86400 + 120
    rows = query(
        database_url, "SELECT name FROM durable_steps WHERE workflow_id = 'later' ORDER BY seq"
    )
    assert [r.name for r in rows] == ["cv.add", "sleep", "cv.mul", "sleep", "cv.add"]


def test_with_retry_retries_each_link_and_honours_non_retryable(
    durable: Durable, tasks: SimpleNamespace, counter: Callable[[str], int]
) -> None:
    t = tasks
    policy = RetryPolicy(max_attempts=3, initial_interval=60.0, non_retryable=(Fatal,))
    with TestEnv(durable) as env:
        run = durable.chain(t.flaky.s(2)).with_retry(policy).start(workflow_id="retried")
        assert env.result(run, timeout=30) == "ok on attempt 3"
        assert env.skipped > 55  # the 60 s back-offs were durable timers, skipped
        failing = durable.chain(t.fatal.si()).with_retry(policy).start(workflow_id="fatal")
        with pytest.raises(WorkflowFailed, match="Fatal: no point retrying"):
            env.result(failing, timeout=30)
    assert counter("fatal") == 1


def test_what_durable_cannot_honour_is_refused(durable: Durable, tasks: SimpleNamespace) -> None:
    t = tasks
    linked = t.add.s(1, 2)
    linked.link(t.mul.s(2))
    refused: list[tuple[Callable[[], Any], str]] = [
        (lambda: durable.chain(linked), "option 'link'"),
        (lambda: durable.chain(t.add.s(1, 2).on_error(t.mul.s(0))), "option 'link_error'"),
        (lambda: durable.group(t.add.s(1, 1) | t.mul.s(2)), "must be task signatures"),
        (lambda: durable.group(t.add.s(1, 1).set(countdown=5)), "on the group instead"),
        (
            lambda: durable.group(t.add.s(1, 1).set(time_limit=5), t.mul.s(1, 1)),
            "share one time limit",
        ),
        (lambda: durable.chain(t.add.map([1, 2])), "celery.map signatures are not supported"),
        (lambda: durable.chain(), "at least one signature"),
    ]
    for build_canvas, message in refused:
        with pytest.raises(ValueError, match=message):
            build_canvas()
    with pytest.raises(TypeError, match="Celery signatures"):
        durable.chain("cv.add")  # type: ignore[arg-type]


# -- a real crash -----------------------------------------------------------------------------


@pytest.fixture
def crash(
    database_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> Iterator[tuple[Durable, Workers]]:
    clean_tables(database_url)
    env = {
        **os.environ,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        "CANVAS_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
    }
    _, durable = build(database_url, redis_url, prefix)
    workers = Workers(env, tmp_path, "tests.apps.canvas_app")
    beat = Beat(durable, sweep_interval=0.5)
    thread = Background(beat.run)
    try:
        yield durable, workers
    finally:
        beat.stopping.set()
        thread.join(5)
        workers.stop_all()
        clean_keys(redis_url, prefix)


def test_sigkill_mid_chain_never_reruns_a_committed_link(
    crash: tuple[Durable, Workers], redis_url: str, prefix: str, database_url: str
) -> None:
    durable, workers = crash
    app = durable.app
    add, mul, slow, total = (app.tasks[f"canvas.{n}"] for n in ("add", "mul", "slow", "total"))
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    def count(name: str) -> int:
        return int(client.get(f"{prefix}:count:{name}") or 0)

    def committed(name: str) -> bool:
        sql = "SELECT 1 FROM durable_steps WHERE workflow_id = 'mid' AND name = :n AND status = :s"
        return bool(query(database_url, sql, n=name, s="completed"))

    first = workers.start("first", concurrency=2)
    run = durable.chain(add.s(1, 2), group(mul.s(10), slow.s(30)), total.s()).start(
        workflow_id="mid"
    )
    # Link 1 and one member of the group committed, the other member running: kill.
    wait_until(lambda: committed("canvas.mul") and count("slow") == 1, timeout=60, what="link 2")
    workers.kill(first)
    workers.start("second", concurrency=2)
    assert run.result(timeout=60) == 30 + 4
    assert (count("add"), count("mul"), count("slow"), count("total")) == (1, 1, 2, 1)
    rows = query(
        database_url,
        "SELECT seq, name, attempts FROM durable_steps WHERE workflow_id = 'mid' ORDER BY seq",
    )
    assert [(r.seq, r.name, r.attempts) for r in rows] == [
        (1, "canvas.add", 1),
        (2, "canvas.mul", 1),
        (3, "canvas.slow", 2),
        (4, "canvas.total", 1),
    ]


def test_a_links_expires_counts_from_when_its_step_is_scheduled(
    durable: Durable, tasks: SimpleNamespace, results_worker: Any, database_url: str
) -> None:
    run = durable.chain(tasks.add.s(1, 2), tasks.add.s(3).set(expires=3600)).apply_async()
    assert run.get(timeout=30) == 6
    rows = query(
        database_url,
        "SELECT seq, (options->>'expires')::float - extract(epoch FROM created_at) AS left"
        " FROM durable_steps WHERE workflow_id = :w AND kind = 'task' ORDER BY seq",
        w=run.id,
    )
    assert rows[0].left is None  # the first link has none
    assert 3590 < rows[1].left <= 3600  # seconds from when the second link was scheduled
