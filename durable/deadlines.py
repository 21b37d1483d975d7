"""What fired timers and passed deadlines do: steps retried or failed, runs woken or timed out.

Called by ``durable beat`` (and the testing helpers' time skipping) once the PostgreSQL side
of a timer has fired (see :mod:`durable.store.timers`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from durable.core import limit_key
from durable.retry import NO_RETRY, is_retryable, next_attempt
from durable.store import recovery
from durable.store import steps as step_queries
from durable.store import tree as tree_queries
from durable.store.timers import FiredTimer

if TYPE_CHECKING:
    from durable.core import Core

log = logging.getLogger(__name__)


def after_timer(core: Core, timer: FiredTimer) -> None:
    """Send what a fired timer made due."""
    if timer.kind == "task":
        core.send_step(timer.workflow_id, timer.seq, timer.name, timer.options)
    elif timer.kind == "deadline":
        expire_run(core, timer.workflow_id)
    elif timer.kind == "admit":
        if "limit" in timer.options:
            core.admit([limit_key(timer.options)])
    else:
        core.send_activation(timer.workflow_id, timer.workflow_name or None)


def expire_run(core: Core, workflow_id: str) -> None:
    """End a run whose execution timeout passed: failed, its children cancelled."""
    flagged = core.store(lambda c: tree_queries.request_cancel(c, workflow_id))
    ended = core.finish_run(workflow_id, "", "failed", None, "execution timeout exceeded")
    log.warning("durable: workflow %s exceeded its execution timeout", workflow_id)
    for wid, name in flagged:
        if wid != workflow_id:
            core.send_activation(wid, name)
    if ended.parent_id:
        core.send_activation(ended.parent_id, ended.parent_name)


def enforce_step_deadlines(core: Core) -> int:
    """Fail the attempts of started steps past their timeout; returns how many."""
    timers: list[tuple[int, float]] = []
    woken: list[str] = []
    with core.transaction() as conn:
        for step in recovery.timed_out_steps(conn):
            _time_out(conn, step, timers, woken)
            log.warning(
                "durable: step %s#%s (%s) timed out (attempt %d)",
                step.workflow_id,
                step.seq,
                step.name,
                step.attempts,
            )
    core.index_timers(timers)
    for wid in woken:
        core.send_activation(wid)
    return len(woken) + len(timers)


def _time_out(
    conn: Any, step: recovery.TimedOut, timers: list[tuple[int, float]], woken: list[str]
) -> None:
    error = f"TimeoutError: attempt {step.attempts} ran past its timeout"
    policy: dict[str, Any] = step.options.get("retry") or NO_RETRY
    retryable = is_retryable(policy, TimeoutError(error))
    delay, pause = next_attempt(policy, step.attempts, retryable)
    if delay is not None:
        wid = step.workflow_id
        timer = step_queries.schedule_retry(conn, wid, step.seq, error, delay, pause=pause)
        if timer and not pause:  # a paused run's timer is indexed by its unpause
            timers.append(timer)
    elif step_queries.settle_step(
        conn, step.workflow_id, step.seq, error=error, attempt=step.attempts
    ).settled:
        woken.append(step.workflow_id)
