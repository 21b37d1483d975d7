"""The edges of the primitives: empty batches, negative sleeps, repeated and late cancels,
cancelling only a child, a parent timing out, the total signal limit, a workflow no worker
has registered."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker

from durable import (
    Durable,
    LimitExceeded,
    StepFailed,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowNotRunning,
)
from durable.activation import activate
from tests.conftest import clean_tables, make_app, query, wait_until


def _steps(database_url: str, workflow_id: str) -> list[tuple[int, str, str]]:
    rows = query(
        database_url,
        "SELECT seq, kind, status FROM durable_steps WHERE workflow_id = :id ORDER BY seq",
        id=workflow_id,
    )
    return [(r.seq, r.kind, r.status) for r in rows]


def test_an_empty_parallel_batch_returns_at_once_and_takes_no_position(
    app: Celery, durable: Durable, worker: Any, database_url: str
) -> None:
    @app.task(name="t.echo_edge", shared=False)
    def echo(value: str) -> str:
        return value

    @durable.workflow("wf.empty_batch")
    def wf(ctx: Any) -> list[Any]:
        return [ctx.parallel([]), ctx.map(echo, []), ctx.step(echo, "after")]

    assert durable.start("wf.empty_batch", workflow_id="empty-1").result(timeout=20) == [
        [],
        [],
        "after",
    ]
    assert _steps(database_url, "empty-1") == [(1, "task", "completed")]


def test_a_negative_sleep_is_no_sleep(
    durable: Durable, worker: Any, beat: Any, database_url: str
) -> None:
    @durable.workflow("wf.negative_sleep")
    def wf(ctx: Any) -> str:
        before = ctx.now()
        ctx.sleep(-5)
        ctx.sleep(timedelta(days=-1))
        return "awake" if ctx.now() >= before else "time ran backwards"

    run = durable.start("wf.negative_sleep", workflow_id="negsleep-1")
    assert run.result(timeout=20) == "awake"
    assert _steps(database_url, "negsleep-1") == [
        (1, "sleep", "completed"),
        (2, "sleep", "completed"),
    ]
    late = query(
        database_url,
        "SELECT t.id FROM durable_timers t JOIN durable_steps s"
        " ON s.workflow_id = t.workflow_id AND s.seq = t.seq"
        " WHERE t.workflow_id = 'negsleep-1' AND t.fire_at > s.created_at + interval '1 second'",
    )
    assert late == []  # each timer was due when it was set, not in the past nor the future


def test_cancelling_twice_is_harmless_and_after_the_end_is_an_error(
    durable: Durable, worker: Any, database_url: str
) -> None:
    @durable.workflow("wf.cancel_twice")
    def wf(ctx: Any) -> str:
        try:
            ctx.wait_for_signal("never")
        except WorkflowCancelled:
            ctx.set_event("compensated", ctx.now().isoformat())
            raise
        return "signalled"

    run = durable.start("wf.cancel_twice", workflow_id="twice-1")
    wait_until(lambda: _steps(database_url, "twice-1"), what="the signal wait")
    durable.cancel("twice-1")
    durable.cancel("twice-1")  # already cancelling: nothing more happens
    with pytest.raises(WorkflowCancelled):
        run.result(timeout=20)
    assert _steps(database_url, "twice-1") == [
        (1, "signal", "cancelled"),
        (2, "event", "completed"),
    ]
    with pytest.raises(WorkflowNotRunning) as info:
        durable.cancel("twice-1")
    assert info.value.status == "cancelled"


def test_cancelling_only_a_child_fails_the_parents_position(
    durable: Durable, worker: Any, database_url: str
) -> None:
    @durable.workflow("wf.waiting_child")
    def child(ctx: Any) -> str:
        return str(ctx.wait_for_signal("never"))

    @durable.workflow("wf.caring_parent")
    def parent(ctx: Any) -> str:
        try:
            return str(ctx.child("wf.waiting_child"))
        except StepFailed as exc:
            return f"child ended: {exc.error}"

    run = durable.start("wf.caring_parent", workflow_id="carer-1")
    wait_until(lambda: _steps(database_url, "carer-1/1"), what="the child's signal wait")
    assert durable.cancel("carer-1/1") is None
    assert run.result(timeout=20) == "child ended: cancelled: cancelled"
    assert durable.run("carer-1/1").status() == "cancelled"
    assert run.status() == "completed"


def test_a_cancel_after_the_last_position_lets_the_run_complete(
    durable: Durable, worker: Any, database_url: str
) -> None:
    @durable.workflow("wf.cancel_at_the_end")
    def wf(ctx: Any) -> str:
        # The cancel arrives inside the last position: only the return is left after it.
        ctx.step(lambda: durable.cancel(ctx.workflow_id), local=True)
        return "done"

    run = durable.start("wf.cancel_at_the_end", workflow_id="late-cancel-1")
    assert run.result(timeout=20) == "done"
    (row,) = query(
        database_url, "SELECT cancel_requested FROM durable_workflows WHERE id = 'late-cancel-1'"
    )
    assert row.cancel_requested is True  # the cancel was taken, and found nothing left to stop


def test_the_total_signal_limit_refuses_and_stores_nothing(
    database_url: str, redis_url: str, prefix: str
) -> None:
    clean_tables(database_url)
    _, durable = make_app(database_url, redis_url, prefix, max_signals=2)

    @durable.workflow("wf.listener")
    def wf(ctx: Any) -> None:
        ctx.wait_for_signal("never")

    durable.start("wf.listener", workflow_id="limit-1")  # no worker: the signals stay unread
    durable.signal("limit-1", "ping", 1)
    durable.signal("limit-1", "ping", 2)
    with pytest.raises(LimitExceeded) as info:
        durable.signal("limit-1", "ping", 3)
    assert (info.value.limit, info.value.value) == ("max_signals", 2)
    rows = query(database_url, "SELECT payload FROM durable_signals WHERE workflow_id = 'limit-1'")
    assert sorted(r.payload for r in rows) == [1, 2]


def test_a_workflow_no_worker_has_registered_waits_for_one_that_has(
    database_url: str, redis_url: str, prefix: str
) -> None:
    clean_tables(database_url)
    _, client = make_app(database_url, redis_url, prefix)
    other_app, _ = make_app(database_url, redis_url, prefix, lease_ttl=timedelta(seconds=1))

    @client.workflow("wf.orphan")
    def wf(ctx: Any) -> str:
        return "adopted"

    run = client.start("wf.orphan", workflow_id="orphan-1")
    lease = "SELECT status, lease_owner FROM durable_workflows WHERE id = 'orphan-1'"
    with start_worker(other_app, pool="threads", perform_ping_check=False, loglevel="WARNING"):
        # The only worker lacks the workflow: it takes the activation and leaves the run.
        wait_until(lambda: query(database_url, lease)[0].lease_owner, what="the worker's lease")
        assert run.status() == "running"
    assert _steps(database_url, "orphan-1") == []
    # A process that has the workflow takes the run once that lease has expired.
    wait_until(lambda: activate(client, "orphan-1") == "completed", what="the lease to expire")
    assert run.result(timeout=5) == "adopted"


def test_a_parents_execution_timeout_cancels_its_children(
    durable: Durable, worker: Any, beat: Any, database_url: str
) -> None:
    @durable.workflow("wf.patient_child")
    def child(ctx: Any) -> str:
        try:
            return str(ctx.wait_for_signal("never"))
        except WorkflowCancelled:
            ctx.set_event("compensated", True)
            raise

    @durable.workflow("wf.hasty_parent", execution_timeout=timedelta(seconds=1))
    def parent(ctx: Any) -> str:
        return str(ctx.child("wf.patient_child"))

    run = durable.start("wf.hasty_parent", workflow_id="hasty-1")
    with pytest.raises(WorkflowFailed) as info:
        run.result(timeout=20)
    assert info.value.error == "execution timeout exceeded"
    kid = durable.run("hasty-1/1")
    with pytest.raises(WorkflowCancelled):
        kid.result(timeout=20)
    assert durable.get_event("hasty-1/1", "compensated") is True
