"""Running a step in a worker: claim it, run the user's task, commit its outcome.

The message a step travels in (its own task's, see ``durable.stepmessage``) carries only the
workflow id and the step number. The claim, one statement, moves the step from
``scheduled`` to ``started`` under this process's lease and returns the task name and
arguments; a message for a step that is not ``scheduled`` (a duplicate delivery, a late
redelivery after recovery) finds nothing to claim and ends there, so a finished step's body
never runs again.

**Unclaimed first deliveries.** A step is only ever sent again by recovery (the sweep, after
``redispatch_after`` without a claim; a lease that expired; a retry timer; an admin command)
or redelivered by the broker (flagged ``redelivered``). So the first delivery of a step's
first message, while that message is younger than a fraction of ``redispatch_after``, cannot
be a copy of a step that already ran: no other copy exists yet. When that message reaches
the process that scheduled the step (which kept the run's history and the step as written,
see ``durable.histories``), the step runs without a claim: its settle, which must find it
never claimed (``scheduled``, or ``cancelled`` by a cancellation that came meanwhile),
records its start and its end together, one statement per step. Another process (the other
child of a prefork worker) reads the step and its run instead, one statement that writes
nothing, and runs it unclaimed if the read confirms it is the only copy. A body still running
half-way to ``redispatch_after`` is claimed then, from the heartbeat thread, so the sweep
never sends a running step again; a body that fails is claimed before its failure is
handled, which then goes the usual way.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from durable import activation, tracing
from durable.core import limit_key
from durable.errors import CodecUnavailable, StoreError, TaskExpired
from durable.histories import alone, first_open
from durable.retry import NO_RETRY, is_retryable, next_attempt
from durable.serialization import describe_exception, mask_error
from durable.step_info import StepInfo, step_context
from durable.store import runs as run_queries
from durable.store import steps as step_queries

if TYPE_CHECKING:
    from durable.core import Core
    from durable.liveness import Deferred
    from durable.store.runs import Activation

log = logging.getLogger(__name__)

UNCLAIMED_WINDOW = 0.3
"""A first delivery runs unclaimed while its message is younger than this fraction of
``redispatch_after`` (by the process's clock if it sent it, else by PostgreSQL's)."""

CLAIM_AT = 0.5
"""An unclaimed body still running at this fraction of ``redispatch_after`` after its message
was sent is claimed, well before the sweep would send it again; the rest of the delay is the
margin between this host's clock and PostgreSQL's, by which the sweep measures it."""


Body = Callable[[list[Any], dict[str, Any], int], Any]
"""How a step's body is called: (arguments, keyword arguments, attempt) -> its value. The
step message's wrapper (:mod:`durable.stepmessage`) passes the task's own ``run``."""


class TaskNotRegistered(LookupError):
    """The step's task is not registered in the worker that received it."""


def first_delivery(core: Core, sent_at: Any, redelivered: bool) -> float | None:
    """The send time of a step's first dispatch on its first delivery, if young; else None.

    Young: sent less than ``UNCLAIMED_WINDOW`` of ``redispatch_after`` ago, so that it may
    run unclaimed.
    """
    if sent_at is None or redelivered or not isinstance(sent_at, int | float):
        return None
    window = core.settings.redispatch_after.total_seconds() * UNCLAIMED_WINDOW
    age = time.time() - float(sent_at)
    return float(sent_at) if -window < age < window else None


def execute_step(
    core: Core,
    workflow_id: str,
    seq: int,
    fresh: float | None = None,
    call: Body | None = None,
) -> str:
    """Run one step message; returns what happened (for logs and tests).

    ``fresh``: the send time of a first delivery (:func:`first_delivery`); the step runs
    unclaimed if it is the only copy (this process scheduled it, or a read says so).
    ``call``: how to call the body (by default the registered task, called directly).
    """
    owner = core.heartbeat.token()
    if fresh is not None and core.settings.inline_activation:
        kept = core.histories.take_fresh(workflow_id, seq)
        if kept is not None:
            run, step = kept
            options = json.loads(step.options)
            if not options.get("timeout"):  # a deadline is set by the claim
                unclaimed = step_queries.ClaimedStep(
                    workflow_id=run.workflow_id,
                    seq=step.seq,
                    name=step.name,
                    args=json.loads(step.args),
                    kwargs=json.loads(step.kwargs),
                    options=options,
                    attempt=1,
                    rest_wake=run.wake_seq,
                    rest_created_at=run.created_at,
                    run=run,
                )
                return _execute_unclaimed(core, unclaimed, owner, time.time() - fresh, call)
        else:
            first = _read_first(core, workflow_id, seq)
            if first is not None:
                return _execute_unclaimed(core, first[0], owner, first[1], call)
    ttl = core.settings.lease_ttl.total_seconds()
    # Not flushed: a claim lost in a PostgreSQL crash leaves the step scheduled, and the sweep
    # sends it again (the body may run twice, under the same idempotency key, as after any
    # crash). The result below is always flushed before anything moves on.
    # With inline activation the claim also reads the run (at rest) and its history, so that
    # the settle can schedule what comes next in the same statement (see ``_settle``).
    history = core.settings.inline_activation
    cached = core.histories.wake_of(workflow_id) if history else None
    claimed = core.store(
        lambda c: step_queries.claim_step(c, workflow_id, seq, owner, ttl, history, cached),
        flush=False,
    )
    if claimed is None:
        log.info("durable: step %s#%s is not scheduled; message ignored", workflow_id, seq)
        return "ignored"
    core.heartbeat.hold(owner)
    try:
        outcome, leased = _run_claimed(core, claimed, owner, call=call)
    except BaseException:
        _give_up(core, workflow_id, seq, owner)
        raise
    finally:
        core.heartbeat.release(owner)
    return _after(core, workflow_id, owner, outcome, leased)


def _read_first(core: Core, wid: str, seq: int) -> tuple[step_queries.ClaimedStep, float] | None:
    """A first delivery scheduled elsewhere: (the step, its age) if it may run unclaimed.

    One read, no write: the step as written and its run's history (unless this process holds
    it at the run's version). The step must be never claimed, sent once and its run's one
    open position (see ``durable.histories``), as a step the process that scheduled it kept
    is. Its age comes from PostgreSQL's clock, so the sender's clock does not matter. None:
    the step is claimed as any other delivery.
    """
    kept = core.histories.held(wid)
    held = None
    if kept is not None:
        held = step_queries.Held(kept.wake_seq, kept.woken, kept.created_at, first_open(kept.steps))
    window = core.settings.redispatch_after.total_seconds() * UNCLAIMED_WINDOW
    found = core.store(lambda c: step_queries.read_first_step(c, wid, seq, window, held))
    if found is None:
        return None
    step = found.step
    run = step.run
    if run is None and step.rest_wake is not None and step.rest_created_at is not None:
        run = core.histories.get(wid, step.rest_wake, step.rest_created_at)
    elif run is not None and found.since is not None and kept is not None:
        # Only advances since the kept history: it stands below ``since``, the read has the rest.
        run = replace(run, steps=[r for r in kept.steps if r.seq < found.since] + run.steps)
    if run is None or not alone(run.steps, seq):
        return None
    return replace(step, run=run), found.age


def _give_up(core: Core, workflow_id: str, seq: int, owner: str) -> None:
    """An attempt ended without settling (an error escaped): let its lease go now.

    Its token is no longer renewed either way, so the lease expires within its TTL and the
    sweep sends the step again; this makes that at once, where PostgreSQL answers.
    """
    try:
        core.store(lambda c: run_queries.drop_step_lease(c, workflow_id, seq, owner), flush=False)
    except Exception as exc:  # the lease still expires; nothing more to do here
        log.warning("durable: could not drop the lease of step %s#%s: %s", workflow_id, seq, exc)


def _after(
    core: Core, workflow_id: str, owner: str, outcome: str, leased: Activation | None
) -> str:
    if leased is not None:
        activation.continue_workflow(core, workflow_id, owner, leased)
    elif outcome in ("completed", "failed") and not core.settings.inline_activation:
        core.send_activation(workflow_id)
    return outcome


class _Unclaimed:
    """A step running without a claim, and the claim deferred to the heartbeat thread."""

    def __init__(self, core: Core, workflow_id: str, seq: int, owner: str, age: float) -> None:
        self.started_at = datetime.now(UTC)
        ttl = core.settings.lease_ttl.total_seconds()

        def claim() -> int | None:
            claimed = core.store(
                lambda c: step_queries.claim_step(c, workflow_id, seq, owner, ttl, running=True),
                flush=False,
            )
            return None if claimed is None else claimed.attempt

        after = core.settings.redispatch_after.total_seconds() * CLAIM_AT
        at = time.monotonic() + (after - age)
        self.deferred: Deferred = core.heartbeat.defer(at, claim)

    def claim_now(self) -> int | None:
        """Claim the step now unless the heartbeat did; its attempt, None if not ours."""
        self.deferred.run()
        return self.deferred.value if self.deferred.state == "done" else None

    def finish(self) -> tuple[bool, int | None]:
        """Stop the deferred claim before settling: (never claimed, attempt claimed).

        (False, None): the claim found the step taken, another delivery runs it.
        """
        if self.deferred.settle() == "done":
            return False, self.deferred.value
        return True, None  # cancelled, or failed without an answer: the settle decides


def _execute_unclaimed(
    core: Core,
    claimed: step_queries.ClaimedStep,
    owner: str,
    age: float,
    call: Body | None,
) -> str:
    """Run a first delivery without a claim; ``age``: seconds since its message was sent.

    ``claimed`` carries its run at rest (``run``), for the settle's in-memory replay.
    """
    wid = claimed.workflow_id
    core.heartbeat.hold(owner)
    try:
        unclaimed = _Unclaimed(core, wid, claimed.seq, owner, age)
        try:
            outcome, leased = _run_claimed(core, claimed, owner, unclaimed, call)
        finally:
            unclaimed.deferred.settle()
    except BaseException:
        _give_up(core, wid, claimed.seq, owner)
        raise
    finally:
        core.heartbeat.release(owner)
    return _after(core, wid, owner, outcome, leased)


def _run_claimed(
    core: Core,
    claimed: step_queries.ClaimedStep,
    owner: str,
    unclaimed: _Unclaimed | None = None,
    call: Body | None = None,
) -> tuple[str, Activation | None]:
    """Run the attempt and settle it, inside the attempt's span (:mod:`durable.tracing`)."""
    run = claimed.run
    workflow = claimed.workflow_name or (run.name if run is not None else None)
    trace = claimed.trace_context or (run.trace_context if run is not None else None)
    with tracing.step_span(
        workflow, claimed.workflow_id, claimed.seq, claimed.name, claimed.attempt, trace
    ) as span:
        outcome, leased = _run_attempt(core, claimed, owner, span, unclaimed, call)
        span.outcome(outcome)
        return outcome, leased


def _run_attempt(
    core: Core,
    claimed: step_queries.ClaimedStep,
    owner: str,
    span: tracing.Span,
    unclaimed: _Unclaimed | None = None,
    call: Body | None = None,
) -> tuple[str, Activation | None]:
    wid, seq, name = claimed.workflow_id, claimed.seq, claimed.name
    task = core.app.tasks.get(name)
    if task is None:
        missing = TaskNotRegistered(f"task {name!r} is not registered on this worker")
        return _settle_failure(core, claimed, missing, owner, unclaimed)
    expires = claimed.options.get("expires")
    if expires is not None and time.time() >= float(expires):
        late = TaskExpired(name, datetime.fromtimestamp(float(expires), UTC))
        return _settle_failure(core, claimed, late, owner, unclaimed)
    info = StepInfo(wid, seq, name, claimed.attempt)
    try:
        args, kwargs = core.decode(claimed.args), core.decode(claimed.kwargs)
    except CodecUnavailable as exc:
        # Not the step's fault (a worker deployed without the key): leave the step to its
        # lease, which expires, and to a worker that has the key.
        log.error("durable: step %s#%s left for a worker with the key: %s", wid, seq, exc)
        return "undecodable", None
    try:
        with step_context(info, has_policy="retry" in claimed.options):
            value = task(*args, **kwargs) if call is None else call(args, kwargs, info.attempt)
        result = core.encode(value, f"result of step {seq} ({name})")
    except Exception as exc:
        span.exception(exc, sealed=core.seals_errors)
        return _settle_failure(core, claimed, exc, owner, unclaimed)
    try:
        return _settle(core, claimed, owner, result=result, unclaimed=unclaimed)
    except StoreError as exc:
        # PostgreSQL refused the settle itself (a lost connection is retried, not this): the
        # attempt fails with that error, instead of the step being sent again forever.
        log.error("durable: step %s#%s could not be settled: %s", wid, seq, exc)
        plain = replace(claimed, run=None, rest_wake=None, rest_created_at=None)
        if unclaimed is not None:  # never claimed: claim it to record the failure
            ttl = core.settings.lease_ttl.total_seconds()
            taken = core.store(
                lambda c: step_queries.claim_step(c, wid, seq, owner, ttl, running=True)
            )
            if taken is None:
                return "superseded", None
            plain = replace(plain, attempt=taken.attempt)
        return _settle_failure(core, plain, exc, owner)


def _settle(
    core: Core,
    claimed: step_queries.ClaimedStep,
    owner: str,
    result: str | None = None,
    error: str | None = None,
    unclaimed: _Unclaimed | None = None,
) -> tuple[str, Activation | None]:
    """Commit the outcome and, where it can, the run's next move, in one statement.

    When the claim read the run at rest, the run is first replayed in memory with this
    outcome; if it then only waits for remote steps, the settling statement also schedules
    them (unless something woke the run meanwhile) and they are sent at once: one statement
    for the step, no lease, no second replay. If the workflow returned, the same statement
    ends the run with its result. Otherwise, with inline activation, the same
    statement takes the run's lease and returns its history for the activation that follows.
    """
    ttl = core.settings.lease_ttl.total_seconds()
    wid, seq = claimed.workflow_id, claimed.seq
    never_claimed = False
    if unclaimed is not None:
        never_claimed, attempt = unclaimed.finish()
        if not never_claimed and attempt is None:
            return "superseded", None
        if attempt is not None:
            claimed = replace(claimed, attempt=attempt)
    run = claimed.run
    if run is None and claimed.rest_wake is not None and claimed.rest_created_at is not None:
        run = core.histories.get(wid, claimed.rest_wake, claimed.rest_created_at)
    replayed = None
    if run is not None:
        replayed = activation.replay_in_memory(core, run, seq, result, error, claimed.attempt)
    if replayed is not None and replayed.result is not None and run is not None:
        # A limited run ends through its activation, whose end admits the next queued run
        # of its key in the same transaction (``Core.finish_run``).
        replayed = None if run.name in core.workflow_limits else replayed
    settled = core.store(
        lambda c: step_queries.settle_step(
            c,
            wid,
            seq,
            result=result,
            error=error,
            owner=owner,
            ttl=ttl,
            acquire=core.settings.inline_activation,
            attempt=claimed.attempt,
            expect_wake=None if replayed is None or run is None else run.wake_seq,
            new=replayed.effects.schedules if replayed is not None else (),
            finish=replayed.result if replayed is not None else None,
            unclaimed=never_claimed,
            started_at=unclaimed.started_at if unclaimed is not None else None,
            run_created=claimed.rest_created_at,
        )
    )
    if not settled.settled:
        return "superseded", None
    if "limit" in claimed.options:  # its slot is free: the next queued step of its key
        core.admit([limit_key(claimed.options)])
    if settled.advanced and replayed is not None and run is not None and not settled.ended:
        # Only steps this statement wrote are first dispatches (one already there may have
        # been sent, and run, already).
        first = settled.inserted == len(replayed.effects.schedules)
        sole = core.histories.keep_advanced(
            run, replayed.steps, replayed.effects.schedules, settled.settled_at, first
        )
        core.apply_effects(replayed.effects, first=sole)
    else:
        core.histories.drop(wid)
    if settled.parent is not None:
        core.send_activation(*settled.parent)
    return ("completed" if error is None else "failed"), settled.activation


def _settle_failure(
    core: Core,
    claimed: step_queries.ClaimedStep,
    exc: Exception,
    owner: str,
    unclaimed: _Unclaimed | None = None,
) -> tuple[str, Activation | None]:
    wid, seq = claimed.workflow_id, claimed.seq
    if unclaimed is not None:
        # Failures take the claimed path (attempts, retry timers): claim first. Not ours:
        # another delivery runs the step and settles it.
        attempt = unclaimed.claim_now()
        if attempt is None:
            return "superseded", None
        claimed = replace(claimed, attempt=attempt)
    error = describe_exception(exc)
    policy: dict[str, Any] = claimed.options.get("retry") or NO_RETRY
    retryable = is_retryable(policy, exc) and not isinstance(exc, TaskNotRegistered | TaskExpired)
    delay, pause = next_attempt(policy, claimed.attempt, retryable)
    requested = getattr(exc, "durable_delay", None)  # the task's self.retry(): stepmessage
    if isinstance(requested, float):
        cause = getattr(exc, "exc", None)
        error = describe_exception(cause) if isinstance(cause, Exception) else error
        delay, pause = requested, False
    error = core.seal_error(error)
    # The message only where it is stored (encoded with a codec): never in durable's own log.
    log.warning("durable: step %s#%s (%s) raised %s", wid, seq, claimed.name, mask_error(error))
    if delay is None:
        return _settle(core, claimed, owner, error=error)
    timer = core.store(
        lambda c: step_queries.schedule_retry(c, wid, seq, error, delay, pause=pause)
    )
    if timer is None:
        return "superseded", None
    if pause:
        log.warning("durable: step %s#%s used its attempts: workflow %s paused", wid, seq, wid)
        return "paused", None
    core.index_timers([timer])
    return "retrying", None
