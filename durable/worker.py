"""Running a step in a worker: claim it, run the user's task, commit its outcome.

The message a step travels in (task ``durable.step``) carries only the workflow id and the
step number. The claim, one statement, moves the step from ``scheduled`` to ``started``
under this process's lease and returns the task name and arguments; a message for a step
that is not ``scheduled`` (a duplicate delivery, a late redelivery after recovery) finds
nothing to claim and ends there, so a finished step's body never runs again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from durable.errors import CodecUnavailable
from durable.retry import NO_RETRY, is_retryable, retry_delay
from durable.serialization import describe_exception
from durable.store import steps as step_queries

if TYPE_CHECKING:
    from durable.runtime import Durable
    from durable.store.runs import Activation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInfo:
    """What a running step knows about itself; see :func:`current_step`."""

    workflow_id: str | None = None
    step: int | None = None
    name: str | None = None
    attempt: int = 0

    @property
    def idempotency_key(self) -> str | None:
        """``"<workflow id>:<step number>"``: the same on every attempt and redelivery.

        ``None`` outside a workflow. Pass it to a payment API or use it as a unique key in
        your own tables so that a step re-run after a crash does its side effect once.
        """
        if self.workflow_id is None or self.step is None:
            return None
        return f"{self.workflow_id}:{self.step}"


_NO_STEP = StepInfo()
_current: ContextVar[StepInfo] = ContextVar("durable_current_step")


class TaskNotRegistered(LookupError):
    """The step's task is not registered in the worker that received it."""


def current_step() -> StepInfo:
    """The step being run in this task, or an empty :class:`StepInfo` outside a workflow.

    Example::

        @app.task
        def charge_card(order):
            key = current_step().idempotency_key   # stable across retries; None outside
            return payments.charge(order, idempotency_key=key)
    """
    return _current.get(_NO_STEP)


@contextmanager
def step_context(info: StepInfo) -> Iterator[None]:
    """Make ``info`` the :func:`current_step` for the duration of the block."""
    token = _current.set(info)
    try:
        yield
    finally:
        _current.reset(token)


def execute_step(durable: Durable, workflow_id: str, seq: int) -> str:
    """Run one step message; returns what happened (for logs and tests)."""
    owner = durable.heartbeat.token()
    ttl = durable.settings.lease_ttl.total_seconds()
    # Not flushed: a claim lost in a PostgreSQL crash leaves the step scheduled, and the sweep
    # sends it again (the body may run twice, under the same idempotency key, as after any
    # crash). The result below is always flushed before anything moves on.
    # With inline activation the claim also reads the run (at rest) and its history, so that
    # the settle can schedule what comes next in the same statement (see ``_settle``).
    history = durable.settings.inline_activation
    cached = durable.histories.wake_of(workflow_id) if history else None
    claimed = durable.store(
        lambda c: step_queries.claim_step(c, workflow_id, seq, owner, ttl, history, cached),
        flush=False,
    )
    if claimed is None:
        log.info("durable: step %s#%s is not scheduled; message ignored", workflow_id, seq)
        return "ignored"
    durable.heartbeat.hold()
    try:
        outcome, leased = _run_claimed(durable, claimed, owner)
    finally:
        durable.heartbeat.release()
    if leased is not None:
        durable.continue_workflow(workflow_id, owner, leased)
    elif outcome in ("completed", "failed") and not durable.settings.inline_activation:
        durable.send_activation(workflow_id)
    return outcome


def _run_claimed(
    durable: Durable, claimed: step_queries.ClaimedStep, owner: str
) -> tuple[str, Activation | None]:
    wid, seq, name = claimed.workflow_id, claimed.seq, claimed.name
    task = durable.app.tasks.get(name)
    if task is None:
        missing = TaskNotRegistered(f"task {name!r} is not registered on this worker")
        return _settle_failure(durable, claimed, missing, owner)
    info = StepInfo(wid, seq, name, claimed.attempt)
    try:
        args, kwargs = durable.decode(claimed.args), durable.decode(claimed.kwargs)
    except CodecUnavailable as exc:
        # Not the step's fault (a worker deployed without the key): leave the step to its
        # lease, which expires, and to a worker that has the key.
        log.error("durable: step %s#%s left for a worker with the key: %s", wid, seq, exc)
        return "undecodable", None
    try:
        with step_context(info):
            value = task(*args, **kwargs)
        result = durable.encode(value, f"result of step {seq} ({name})")
    except Exception as exc:
        return _settle_failure(durable, claimed, exc, owner)
    return _settle(durable, claimed, owner, result=result)


def _settle(
    durable: Durable,
    claimed: step_queries.ClaimedStep,
    owner: str,
    result: str | None = None,
    error: str | None = None,
) -> tuple[str, Activation | None]:
    """Commit the outcome and, where it can, the run's next move, in one statement.

    When the claim read the run at rest, the run is first replayed in memory with this
    outcome; if it then only waits for remote steps, the settling statement also schedules
    them (unless something woke the run meanwhile) and they are sent at once: one statement
    for the step, no lease, no second replay. If the workflow returned, the same statement
    ends the run with its result. Otherwise, with inline activation, the same
    statement takes the run's lease and returns its history for the activation that follows.
    """
    ttl = durable.settings.lease_ttl.total_seconds()
    wid, seq = claimed.workflow_id, claimed.seq
    run = claimed.run
    if run is None and claimed.rest_wake is not None and claimed.rest_created_at is not None:
        run = durable.histories.get(wid, claimed.rest_wake, claimed.rest_created_at)
    replayed = None
    if run is not None:
        replayed = durable.replay_in_memory(run, seq, result, error, claimed.attempt)
    settled = durable.store(
        lambda c: step_queries.settle_step(
            c,
            wid,
            seq,
            result=result,
            error=error,
            owner=owner,
            ttl=ttl,
            acquire=durable.settings.inline_activation,
            attempt=claimed.attempt,
            expect_wake=None if replayed is None or run is None else run.wake_seq,
            new=replayed.effects.schedules if replayed is not None else (),
            finish=replayed.result if replayed is not None else None,
        )
    )
    if not settled.settled:
        return "superseded", None
    if settled.advanced and replayed is not None and run is not None and not settled.ended:
        durable.histories.keep_advanced(
            run, replayed.steps, replayed.effects.schedules, settled.settled_at
        )
        durable.apply_effects(replayed.effects)
    else:
        durable.histories.drop(wid)
    if settled.parent is not None:
        durable.send_activation(*settled.parent)
    return ("completed" if error is None else "failed"), settled.activation


def _settle_failure(
    durable: Durable, claimed: step_queries.ClaimedStep, exc: Exception, owner: str
) -> tuple[str, Activation | None]:
    wid, seq = claimed.workflow_id, claimed.seq
    error = describe_exception(exc)
    policy: dict[str, Any] = claimed.options.get("retry") or NO_RETRY
    retryable = is_retryable(policy, exc) and not isinstance(exc, TaskNotRegistered)
    delay = retry_delay(policy, claimed.attempt) if retryable else None
    log.warning("durable: step %s#%s (%s) raised %s", wid, seq, claimed.name, error)
    if delay is None:
        return _settle(durable, claimed, owner, error=error)
    timer = durable.store(lambda c: step_queries.schedule_retry(c, wid, seq, error, delay))
    if timer is None:
        return "superseded", None
    durable.index_timers([timer])
    return "retrying", None
