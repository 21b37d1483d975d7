"""One activation: take the run's lease, replay its code, commit what it did, dispatch.

An activation ends in one of three ways: the workflow function returned or raised (the run
is finished under the lease), or it reached a position that has not settled (``Suspend``).
In the last case the lease is released together with ``run_seq := wake_seq`` (and any new
steps are written in that same statement); if anything woke the run meanwhile (a step
finished while we replayed) the release fails and the activation replays again, so no
wake-up is lost. Messages are sent only after the writes that make them necessary are
committed; if sending fails, the recovery sweep of ``durable beat`` sends them again.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from durable import tracing
from durable._control import LeaseLost, NeedsActivation, Suspend
from durable.context import WorkflowContext
from durable.effects import Effects
from durable.errors import (
    CodecUnavailable,
    ConfigurationError,
    NonDeterminismError,
    PayloadError,
    StoreUnavailable,
    UnknownWorkflow,
    WorkflowCancelled,
)
from durable.serialization import describe_exception, mask_error
from durable.store import runs
from durable.store import steps as step_queries
from durable.store.records import StepRecord

if TYPE_CHECKING:
    from durable.core import Core

log = logging.getLogger(__name__)

MAX_REPLAYS = 50


def activate(
    core: Core,
    workflow_id: str,
    owner: str | None = None,
    leased: runs.Activation | None = None,
) -> str:
    """Run the workflow until it suspends or ends; returns the outcome for logs and tests.

    ``leased`` is a run already leased to ``owner`` with its history loaded (a worker that
    just settled a step took both in the settling statement).
    """
    owner = owner or core.heartbeat.token()
    ttl = core.settings.lease_ttl.total_seconds()
    held = False
    for _ in range(MAX_REPLAYS):
        activation, leased = leased, None
        if activation is None:
            activation = core.store(lambda c: runs.acquire(c, workflow_id, owner, ttl), flush=False)
        if activation is None:
            if held:  # still ours after a failed release, and not acquired: paused meanwhile
                core.store(lambda c: runs.let_go(c, workflow_id, owner), flush=False)
            return "busy-or-finished"
        held = True
        wid, name, trace = activation.workflow_id, activation.name, activation.trace_context
        # The span covers the replay, its commit and the messages it sends (so that a tracing
        # Celery instrumentation puts those messages in the run's trace).
        with tracing.activation_span(name, wid, trace, False) as span:
            outcome = _activate_leased(core, activation, owner)
            span.outcome(outcome or "woken")
        if outcome is not None:
            return outcome
    # Woken again and again while replaying: leave it to the next message or the sweep.
    return "yielded"


def _activate_leased(core: Core, activation: runs.Activation, owner: str) -> str | None:
    """Replay a leased run, commit and send what it did; None: woken meanwhile, replay again."""
    core.heartbeat.hold(owner)
    try:
        outcome, effects = _replay(core, activation, owner)
    finally:
        core.heartbeat.release(owner)
    if outcome == "lease-lost":
        # What it committed before stands; the steps it meant to schedule were not written.
        # Take the lease again: if it is still ours, replay from the history as it is now.
        core.apply_effects(replace(effects, schedules=[], dispatches=[]))
        return None
    if outcome in ("unknown-workflow", "undecodable"):
        # Keep the lease: it expires, and the recovery sweep sends the activation again,
        # maybe to a worker that has the workflow's module.
        return outcome
    if outcome != "suspended":
        core.apply_effects(effects)
        return outcome
    released, wrote_all = _release(core, effects, owner, activation.wake_seq)
    first = released and wrote_all and core.histories.keep_at_rest(activation, effects)
    core.apply_effects(effects, first=first)
    return "suspended" if released else None


def continue_workflow(
    core: Core, workflow_id: str, owner: str | None = None, leased: runs.Activation | None = None
) -> None:
    """Replay the run in this process now, as the step that woke it just finished.

    A failure is logged and the activation sent to a worker instead.
    """
    try:
        activate(core, workflow_id, owner, leased)
    except Exception:
        log.exception("durable: inline activation of %s failed; sending it", workflow_id)
        core.send_activation(workflow_id, getattr(leased, "name", None))


def _release(core: Core, effects: Effects, owner: str, wake_seq: int) -> tuple[bool, bool]:
    """Give the lease back, writing the new steps (if any) in the same statement.

    Returns (released, every new step written by this statement).
    """
    # Not flushed: if a PostgreSQL crash loses this commit, the run is left owed an activation
    # (wake_seq > run_seq, lease expiring) and the sweep replays it, scheduling the step again;
    # a message already sent for a lost step row finds nothing to claim.
    wid, new = effects.workflow_id, effects.schedules
    if not new:
        return core.store(lambda c: runs.release(c, wid, owner, wake_seq), flush=False), True
    scheduled, released = core.store(
        lambda c: step_queries.schedule_steps(c, wid, new, release_owner=owner, wake_seq=wake_seq),
        flush=False,
    )
    return released, scheduled == len(new)


@dataclass(frozen=True)
class Replayed:
    """What an in-memory replay found the run does once the step settles."""

    effects: Effects
    """The remote steps it schedules (``effects.schedules``) and their messages."""
    steps: list[StepRecord]
    """The history it replayed, the settled step's outcome included."""
    result: str | None = None
    """The workflow's result (JSON text) when it returned: the run ends, completed."""


def replay_in_memory(
    core: Core,
    run: runs.Activation,
    seq: int,
    result: str | None,
    error: str | None,
    attempts: int,
) -> Replayed | None:
    """Work out, without writing anything, what the run does once step ``seq`` settles.

    ``run`` is the run at rest as the step's claim saw it; the step's outcome (``result``
    as stored JSON text, or the final ``error``) is added to its history and the workflow
    replayed in memory. Returns what it found when the run then only waits for remote steps
    (the new ones in ``effects.schedules``) or returns a value (``Replayed.result``): the
    settling statement can write either itself. None when anything else happens (a local
    step, a sleep, an event, a signal or a child, a cancellation delivered, an error, a
    result that cannot be stored): the real activation does that. ``run`` is not changed.
    """
    try:
        return _replay_settled(core, run, seq, result, error, attempts)
    except Exception:
        log.exception("durable: in-memory replay of %s failed; activating it", run.workflow_id)
        return None


def _replay_settled(
    core: Core,
    run: runs.Activation,
    seq: int,
    result: str | None,
    error: str | None,
    attempts: int,
) -> Replayed | None:
    fn = core.registry.get(run.name)
    if fn is None:
        return None
    if not any(record.seq == seq for record in run.steps):
        return None  # the history does not hold this step: only a fresh read can be trusted
    status = "completed" if error is None else "failed"
    value = None if result is None else json.loads(result)
    steps = [
        replace(record, status=status, result=value, error=error, attempts=attempts, settling=True)
        if record.seq == seq
        else record
        for record in run.steps
    ]
    return _run_in_memory(core, fn, replace(run, steps=steps), now_known=True)


def replay_new_run(
    core: Core,
    workflow_id: str,
    name: str,
    args: str,
    kwargs: str,
    trace: dict[str, str] | None = None,
) -> Replayed | None:
    """Run a workflow not started yet in memory, up to its first remote steps (eager start).

    ``args`` and ``kwargs`` are as they will be stored; ``trace`` is the trace context the
    run will record (:mod:`durable.tracing`). Returns what it found when the
    workflow's first durable operations are remote steps (``effects.schedules``); None for
    anything else, ``ctx.now()`` included (the run's start time is not known yet): the run's
    first activation does that, as without an eager start. A failure is logged: the run
    then starts as usual.
    """
    try:
        return _replay_new(core, workflow_id, name, args, kwargs, trace)
    except Exception:
        log.exception("durable: eager start of %s failed; activating it", workflow_id)
        return None


def _replay_new(
    core: Core, workflow_id: str, name: str, args: str, kwargs: str, trace: dict[str, str] | None
) -> Replayed | None:
    fn = core.registry.get(name)
    if fn is None:
        return None
    run = runs.Activation(
        workflow_id,
        name,
        json.loads(args),
        json.loads(kwargs),
        1,
        datetime.now(UTC),
        [],
        trace_context=trace,
    )
    found = _run_in_memory(core, fn, run, now_known=False)
    if found is None or found.result is not None or not found.effects.schedules:
        return None
    return found


def _run_in_memory(
    core: Core, fn: Callable[..., Any], run: runs.Activation, now_known: bool
) -> Replayed | None:
    with tracing.activation_span(run.name, run.workflow_id, run.trace_context, True) as span:
        found = _run_in_memory_traced(core, fn, run, now_known)
        # None: the run's next move is left to a real activation (its own span).
        outcome = "handed-over" if found is None else "suspended"
        span.outcome("completed" if found is not None and found.result is not None else outcome)
        return found


def _run_in_memory_traced(
    core: Core, fn: Callable[..., Any], run: runs.Activation, now_known: bool
) -> Replayed | None:
    steps = run.steps
    ctx = WorkflowContext(core, run, in_memory=True, now_known=now_known)
    try:
        args, kwargs = core.decode(run.args), core.decode(run.kwargs)
        value = fn(ctx, *args, **kwargs)
        ctx.check_end()
        ended = core.encode(value, f"result of workflow {run.workflow_id}")
    except Suspend:
        clean = ctx.nondeterminism is None and not ctx.needs_activation
        return Replayed(ctx.effects, steps) if clean and not ctx.effects.timers else None
    except (NeedsActivation, Exception):
        return None
    effects = ctx.effects
    if ctx.nondeterminism is not None or ctx.needs_activation or ctx.cancel_delivered:
        return None  # failed or cancelled after all: the activation records why
    if effects.schedules or effects.timers or effects.activations:
        return None
    return Replayed(effects, steps, result=ended)


def _replay(core: Core, activation: runs.Activation, owner: str) -> tuple[str, Effects]:
    ctx = WorkflowContext(core, activation, owner)
    fn = core.registry.get(activation.name)
    result: str | None = None
    error: str | None = None
    status = "completed"
    if fn is None:
        # Not registered in this process (a worker without the workflow's module): let a
        # worker that has it take the run, instead of failing it here.
        exc = UnknownWorkflow(activation.name, list(core.registry))
        log.error("durable: %s; activation of %s left for another worker", exc, ctx.workflow_id)
        return "unknown-workflow", ctx.effects
    try:
        args, kwargs = core.decode(activation.args), core.decode(activation.kwargs)
    except CodecUnavailable as exc:
        log.error(
            "durable: %s; activation of %s left for a worker with the key", exc, ctx.workflow_id
        )
        return "undecodable", ctx.effects
    try:
        value = fn(ctx, *args, **kwargs)
        ctx.check_end()
        result = core.encode(value, f"result of workflow {activation.workflow_id}")
    except CodecUnavailable as exc:
        # A recorded result this worker cannot open (a deploy missing the key): not the
        # run's fault; leave it for a worker that has the key.
        log.error(
            "durable: %s; activation of %s left for a worker with the key", exc, ctx.workflow_id
        )
        return "undecodable", ctx.effects
    except LeaseLost:
        return "lease-lost", ctx.effects
    except Suspend:
        if ctx.nondeterminism is None:
            return "suspended", ctx.effects
        status, error = "failed", str(ctx.nondeterminism)
    except WorkflowCancelled:
        status, error = "cancelled", "cancelled"
    except (StoreUnavailable, ConfigurationError):
        raise  # a passing outage is not the run's fault: its lease expires and it runs again
    except (NonDeterminismError, PayloadError) as exc:
        status, error = "failed", str(exc)
    except Exception as exc:
        status, error = "failed", core.seal_error(describe_exception(exc))
    if ctx.nondeterminism is not None:
        # Raised at a position even if the code caught it (``except Exception``): the run's
        # history no longer matches its code, so it must not go on as if it did.
        status, error, result = "failed", str(ctx.nondeterminism), None
    elif status == "completed" and ctx.cancel_delivered:
        status, error = "cancelled", "cancelled"  # compensated, then returned
    wid = activation.workflow_id
    limited = activation.name in core.workflow_limits
    ended = core.finish_run(wid, owner, status, result, error, limited)
    if ended.parent_id:
        ctx.effects.activations.append(ended.parent_id)
        if ended.parent_name:
            ctx.effects.names[ended.parent_id] = ended.parent_name
    if status == "failed":
        log.warning("durable: workflow %s failed: %s", wid, mask_error(error or ""))
    return status, ctx.effects
