"""A WorkflowRun answers like Celery's AsyncResult: state, get, ready, info, revoke."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from durable import Durable, WorkflowCancelled, WorkflowFailed
from durable.activation import activate
from durable.errors import ResultTimeout
from durable.runner import execute_step


class Declined(Exception):
    """Raised by a task to fail its workflow."""


@pytest.fixture
def tasks(app: Celery) -> dict[str, Any]:
    @app.task(name="cl.double", shared=False)
    def double(x: int) -> int:
        return 2 * x

    @app.task(name="cl.decline", shared=False)
    def decline() -> None:
        raise Declined("card declined")

    return {"double": double, "decline": decline}


def test_state_goes_pending_started_success(durable: Durable, tasks: dict[str, Any]) -> None:
    @durable.workflow("cl.two_steps")
    def two_steps(ctx: Any, x: int) -> int:
        y = ctx.step(tasks["double"], x)
        ctx.wait_for_signal("go")
        return int(ctx.step(tasks["double"], y))

    run = durable.start("cl.two_steps", 3, workflow_id="states")  # no worker: run by hand
    assert (run.task_id, run.state, run.ready(), run.info) == ("states", "PENDING", False, None)
    assert activate(durable, "states") == "suspended"
    assert run.state == "PENDING"  # the first step is scheduled, not yet claimed
    assert execute_step(durable, "states", 1) == "completed"
    assert (run.state, run.ready()) == ("STARTED", False)  # waiting for the signal
    durable.signal("states", "go")
    activate(durable, "states")
    assert execute_step(durable, "states", 3) == "completed"
    assert (run.state, run.ready(), run.successful(), run.failed()) == (
        "SUCCESS",
        True,
        True,
        False,
    )
    assert (run.get(timeout=5), run.info, run.traceback) == (12, 12, None)
    assert run.result(timeout=5) == 12  # durable's own method is unchanged


def test_get_raises_what_result_raises_unless_propagate_is_false(
    durable: Durable, tasks: dict[str, Any], worker: Any
) -> None:
    @durable.workflow("cl.declined")
    def declined(ctx: Any) -> None:
        ctx.step(tasks["decline"])

    run = durable.start("cl.declined", workflow_id="declined")
    with pytest.raises(WorkflowFailed, match="Declined: card declined"):
        run.get(timeout=20)
    error = run.get(timeout=20, propagate=False, interval=0.1)
    assert isinstance(error, WorkflowFailed)
    assert error.workflow_id == "declined"
    assert (run.state, run.ready(), run.successful(), run.failed()) == (
        "FAILURE",
        True,
        False,
        True,
    )
    assert isinstance(run.info, WorkflowFailed)
    assert run.traceback is not None and "Declined: card declined" in run.traceback


def test_get_times_out_even_without_propagation(durable: Durable) -> None:
    @durable.workflow("cl.waits")
    def waits(ctx: Any) -> Any:
        return ctx.wait_for_signal("never")

    run = durable.start("cl.waits", workflow_id="waits")  # no worker: it stays running
    with pytest.raises(ResultTimeout):
        run.get(timeout=0.2, propagate=False)


def test_revoke_cancels_the_run_and_reads_revoked(durable: Durable, worker: Any) -> None:
    @durable.workflow("cl.parked")
    def parked(ctx: Any) -> Any:
        return ctx.wait_for_signal("never")

    run = durable.start("cl.parked", workflow_id="parked")
    with pytest.raises(ValueError, match=r"revoke\(terminate=True\) is refused"):
        run.revoke(terminate=True)
    assert run.status() == "running"
    run.revoke(wait=True, timeout=20)
    assert (run.state, run.status(), run.ready(), run.failed()) == (
        "REVOKED",
        "cancelled",
        True,
        False,
    )
    assert isinstance(run.get(timeout=5, propagate=False), WorkflowCancelled)
    assert isinstance(run.info, WorkflowCancelled)
    with pytest.raises(WorkflowCancelled):
        run.get(timeout=5)
    run.revoke()  # an ended run: nothing to do, as with a finished Celery task
