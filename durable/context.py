"""The workflow context: what ``ctx`` is inside a workflow, and how replay works.

Every durable operation a workflow performs (a step, a local step, a sleep, a signal wait, an
event, a child workflow) takes the next position in its history. On each activation the
runtime loads the recorded positions in one query and runs the workflow function from the
top:

- a position with a recorded outcome returns it (or raises ``StepFailed``) without running
  anything again;
- a position recorded but not finished (a step in flight, a sleep not over) suspends the
  activation: the workflow is resumed when that position settles;
- the first position with no record runs for real: a remote step is scheduled (written in
  the statement that releases the run's lease) and dispatched after the activation ends; a
  local step runs here and its outcome is committed before the workflow goes on; a sleep
  commits a durable timer.

A recorded position whose kind or name differs from what the code asks for now raises
:class:`~durable.errors.NonDeterminismError`, naming both.

Cancellation is delivered at the first position that has not settled once a cancel was
requested; that position is remembered on the run (``cancelled_at_seq``), so every later
replay raises :class:`~durable.errors.WorkflowCancelled` at the same place, and the positions
after it (compensation) run normally.
"""

from __future__ import annotations

import hashlib
import json
import random as _random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.canvas import Signature
from celery.local import Proxy

from durable import durations
from durable._control import PENDING, SETTLING_NOW, NeedsActivation, Suspend
from durable.codec import seal
from durable.errors import LimitExceeded, NonDeterminismError, StepFailed, WorkflowCancelled
from durable.primitives import PrimitivesMixin
from durable.retry import NO_RETRY, RetryPolicy, is_retryable, retry_delay
from durable.serialization import describe_exception, dumps, encode
from durable.store import runs as run_queries
from durable.store import steps as step_queries
from durable.worker import StepInfo, step_context

if TYPE_CHECKING:
    from durable.runtime import Durable
    from durable.store.runs import Activation

__all__ = ["Effects", "PendingDispatch", "Suspend", "WorkflowContext"]

ROUTING_OPTIONS = ("queue", "routing_key", "exchange", "priority")


@dataclass
class PendingDispatch:
    """A step committed as scheduled during replay, to be sent once the activation ends."""

    seq: int
    name: str
    options: dict[str, Any]


@dataclass
class Effects:
    """What an activation must write when it ends, and do once that is committed."""

    workflow_id: str
    schedules: list[step_queries.NewStep] = field(default_factory=list)
    dispatches: list[PendingDispatch] = field(default_factory=list)
    timers: list[tuple[int, float]] = field(default_factory=list)
    activations: list[str] = field(default_factory=list)
    names: dict[str, str] = field(default_factory=dict)
    """Workflow names of runs in ``activations``, where known (to label the messages)."""


def _parse_time(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _function_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _step_name(task: Any) -> str:
    """The name a step is recorded under, without reading anything else of the task."""
    cls = type(task)  # not ``isinstance``: a task proxy would resolve itself at every check
    if issubclass(cls, Proxy):
        task = task._get_current_object()
        cls = type(task)
    if issubclass(cls, Signature):
        return str(task.task)
    if issubclass(cls, Task):
        return str(task.name)
    if callable(task):
        return _function_name(task)
    raise TypeError(f"ctx.step needs a Celery task, a signature or a callable, got {task!r}")


def _seconds(value: timedelta | float | None) -> float | None:
    return durations.optional_seconds("timeout", value)


class WorkflowContext(PrimitivesMixin):
    """The ``ctx`` argument of a workflow function.

    Example::

        @durable.workflow("orders.fulfill")
        def fulfill(ctx, order_id):
            order = ctx.step(validate_order, order_id)
            ctx.sleep(timedelta(days=1))
            return ctx.step(charge_card, order, retry=RetryPolicy(max_attempts=5))
    """

    def __init__(
        self,
        durable: Durable,
        activation: Activation,
        owner: str = "",
        in_memory: bool = False,
        now_known: bool = True,
    ) -> None:
        self._durable = durable
        self._in_memory = in_memory
        self.needs_activation = False
        """Set when an in-memory replay met something only an activation may do."""
        self._now_unknown = not now_known  # a run not started yet: its start time is ahead
        self._owner = owner
        self._records: dict[int, dict[str, Any]] = {int(s["seq"]): s for s in activation.steps}
        self._last_recorded = max(self._records, default=0)
        self._seq = 0
        self._now: datetime = activation.created_at
        self._seed = hashlib.sha256(activation.workflow_id.encode()).digest()
        self._rng = _random.Random(self._seed)
        self._uuid_count = 0
        self._cancel_requested = activation.cancel_requested
        self._cancelled_at = activation.cancelled_at_seq
        self.cancel_delivered = False
        self.nondeterminism: NonDeterminismError | None = None
        """Set when replay met a mismatch, even if the workflow's code caught the error."""
        self._patches = set(activation.patches)
        self._patch_memo: dict[str, bool] = {}
        self.workflow_id = activation.workflow_id
        """The id of the running workflow."""
        self.app = durable.app
        """The Celery app (for building signatures by name)."""
        self.effects = Effects(activation.workflow_id)

    # -- deterministic helpers -------------------------------------------------------------

    def now(self) -> datetime:
        """The workflow's current time, the same on every replay (UTC).

        It is the commit time of the last position reached (or the start of the run), so it
        does not move between two durable operations.
        """
        if self._now_unknown:
            self.require_activation()
        return self._now

    def require_activation(self) -> None:
        """In an in-memory replay, stop: what comes next needs a leased activation."""
        if self._in_memory:
            self.needs_activation = True
            raise NeedsActivation()

    def advance_now(self, moment: datetime | None) -> None:
        """Move :meth:`now` to ``moment`` if later: workflow time never runs backwards."""
        if moment is not None and moment > self._now:
            self._now = moment

    def uuid4(self) -> uuid.UUID:
        """A random-looking UUID that replay reproduces exactly."""
        self._uuid_count += 1
        digest = hashlib.sha256(self._seed + b"uuid" + str(self._uuid_count).encode()).digest()
        return uuid.UUID(bytes=digest[:16], version=4)

    def random(self) -> float:
        """A float in [0, 1) from a generator seeded by the workflow id, replayed exactly."""
        return self._rng.random()

    def patched(self, change_id: str) -> bool:
        """Whether this run takes the new code path of ``change_id`` (Temporal's patching).

        Runs that reached this point before the change was deployed replay the old path
        (False); runs that reach it under the new code take the new path (True) and remember
        it. Example::

            if ctx.patched("send-sms"):
                ctx.step(send_sms, order)      # new code
            else:
                ctx.step(send_email, order)    # what in-flight runs recorded
        """
        if change_id in self._patch_memo:
            return self._patch_memo[change_id]
        if change_id in self._patches:
            decision = True
        elif self._seq < self._last_recorded:
            decision = False  # history goes on past here: it was written by the old code
        else:
            self.require_activation()
            wid, owner = self.workflow_id, self._owner
            self._durable.store(lambda c: run_queries.record_patch(c, wid, owner, change_id))
            self._patches.add(change_id)
            decision = True
        self._patch_memo[change_id] = decision
        return decision

    # -- positions ---------------------------------------------------------------------------

    def _take(
        self, kind: str, name: str, check_cancel: bool = True
    ) -> tuple[int, dict[str, Any] | None]:
        self._seq += 1
        seq = self._seq
        record = self._records.get(seq)
        if record is None and seq > self._durable.settings.max_steps:
            raise LimitExceeded(self.workflow_id, "max_steps", self._durable.settings.max_steps)
        if record is not None and (record["kind"] != kind or record["name"] != name):
            self.nondeterminism = NonDeterminismError(
                self.workflow_id, seq, f"{kind} {name}", f"{record['kind']} {record['name']}"
            )
            raise self.nondeterminism
        if check_cancel:
            self._check_cancel(seq, record)
        if record is not None and record.get("completed_at"):
            if record["completed_at"] == SETTLING_NOW:
                self._now_unknown = True  # the step being settled: its commit time is ahead
            else:
                self.advance_now(_parse_time(record["completed_at"]))
        return seq, record

    def check_cancel(self, seq: int, record: dict[str, Any] | None) -> None:
        """Deliver a requested cancellation at ``seq`` if that is where it lands."""
        self._check_cancel(seq, record)

    def _check_cancel(self, seq: int, record: dict[str, Any] | None) -> None:
        """Raise WorkflowCancelled where the cancellation is (or now gets) delivered."""
        if self.cancel_delivered:
            return
        if self._cancelled_at == seq:
            self.cancel_delivered = True
            raise WorkflowCancelled(self.workflow_id)
        if self._cancel_requested and self._cancelled_at is None:
            if record is not None and record["status"] not in PENDING:
                return  # settled before the cancel: replays as it happened
            self.require_activation()
            wid, owner = self.workflow_id, self._owner
            self._durable.store(lambda c: run_queries.deliver_cancel(c, wid, owner, seq))
            self._cancelled_at = seq
            self.cancel_delivered = True
            raise WorkflowCancelled(self.workflow_id)

    def check_end(self) -> None:
        """At the function's return: every recorded position must have been reached."""
        if self._last_recorded > self._seq:
            record = self._records[self._seq + 1]
            raise NonDeterminismError(
                self.workflow_id,
                self._seq + 1,
                "the end of the workflow",
                f"{record['kind']} {record['name']}",
            )

    def _settled(self, seq: int, record: dict[str, Any]) -> Any:
        if record["status"] == "completed":
            return self._durable.decode(record["result"])
        if record["status"] == "failed":
            raise StepFailed(
                self.workflow_id,
                seq,
                record["name"],
                record.get("error") or "",
                int(record.get("attempts") or 0),
            )
        if record["status"] == "cancelled":
            raise WorkflowCancelled(self.workflow_id)
        raise Suspend()

    def step(
        self,
        task: Task[Any, Any] | Signature[Any] | Callable[..., Any],
        *args: Any,
        retry: RetryPolicy | None = None,
        local: bool = False,
        timeout: timedelta | float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``task`` as the workflow's next step and return its committed result.

        ``task`` is a Celery task or signature (its arguments come first, then ``args``;
        its options such as ``queue`` are honoured); the step runs as that task on whatever
        worker its routing names. With ``local=True`` any callable runs here, in the
        workflow's own process, without a broker hop, checkpointed the same way.
        ``retry`` sets the retry policy; without it a raising step fails at once. A step
        with no attempts left raises :class:`~durable.errors.StepFailed`. ``timeout`` limits
        each attempt from start to close (a Celery time limit, and the beat fails an attempt
        past it even where the pool cannot enforce one); a timed-out attempt counts as failed.
        ``retry``, ``local`` and ``timeout`` are durable's: a task cannot receive keyword
        arguments of those names through ``ctx.step``.
        """
        if local and timeout is not None:
            raise ValueError("ctx.step: timeout= applies to remote steps, not to local=True")
        kind = "local" if local else "task"
        seq, record = self._take(kind, _step_name(task))
        if record is not None and not (local and record["status"] == "ready"):
            return self._settled(seq, record)  # replay: nothing else to work out
        name, call_args, call_kwargs, options = self._describe(task, args, kwargs)
        policy = retry.to_dict() if retry is not None else NO_RETRY
        if local:
            attempts = int(record["attempts"]) if record else 0
            return self._run_local(seq, name, task, call_args, call_kwargs, policy, attempts + 1)
        self._schedule(seq, name, call_args, call_kwargs, options, policy, _seconds(timeout))
        raise Suspend()

    def _schedule(
        self,
        seq: int,
        name: str,
        args: list[Any],
        kwargs: dict[str, Any],
        options: dict[str, Any],
        policy: dict[str, Any],
        timeout: float | None,
    ) -> None:
        """Queue a new remote step: written when the activation ends, then sent."""
        limit = self._durable.settings.max_payload_bytes
        if "queue" not in options and "exchange" not in options:
            # Resolve the route now, with this app's task_routes, so that whoever sends the
            # step later (a beat re-sending it, another service) sends it to the same queue.
            routed = self.app.amqp.router.route({}, name, tuple(args), kwargs)
            queue = routed.get("queue")
            if queue is not None:
                options["queue"] = getattr(queue, "name", queue)
        options["retry"] = policy
        options["label"] = f"{name}[{self.workflow_id}#{seq}]"
        if timeout is not None:
            options["timeout"] = timeout
        self.effects.schedules.append(
            step_queries.NewStep(
                seq,
                name,
                self._durable.encode(args, f"arguments of step {seq} ({name})"),
                self._durable.encode(kwargs, f"keyword arguments of step {seq} ({name})"),
                encode(options, f"options of step {seq} ({name})", limit),
            )
        )
        self.effects.dispatches.append(PendingDispatch(seq, name, options))

    def _describe(
        self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[str, list[Any], dict[str, Any], dict[str, Any]]:
        if isinstance(task, Signature):
            options = {k: v for k, v in task.options.items() if k in ROUTING_OPTIONS}
            return str(task.task), [*task.args, *args], {**task.kwargs, **kwargs}, options
        if isinstance(task, Task):
            options = {
                k: getattr(task, k) for k in ROUTING_OPTIONS if getattr(task, k, None) is not None
            }
            return str(task.name), list(args), dict(kwargs), options
        if callable(task):
            return _function_name(task), list(args), dict(kwargs), {}
        raise TypeError(f"ctx.step needs a Celery task, a signature or a callable, got {task!r}")

    def _run_local(
        self,
        seq: int,
        name: str,
        fn: Any,
        args: list[Any],
        kwargs: dict[str, Any],
        policy: dict[str, Any],
        attempt: int,
    ) -> Any:
        self.require_activation()
        limit = self._durable.settings.max_payload_bytes
        body = fn.run if isinstance(fn, Task) else fn
        if isinstance(fn, Signature):
            body = self._durable.app.tasks[str(fn.task)].run
        info = StepInfo(self.workflow_id, seq, name, attempt)
        try:
            with step_context(info):
                value = body(*args, **kwargs)
            plain = dumps(value, f"result of step {seq} ({name})", limit)
        except Exception as exc:
            return self._local_failed(seq, name, exc, policy, attempt)
        wid, result = self.workflow_id, seal(plain, self._durable.codec)
        done = self._durable.store(
            lambda c: step_queries.record_local(
                c, wid, seq, name, attempt, result, None, "completed"
            )
        )
        self.advance_now(done)
        # Hand back what replay will hand back: the JSON round trip of the value.
        return json.loads(plain)

    def _local_failed(
        self, seq: int, name: str, exc: Exception, policy: dict[str, Any], attempt: int
    ) -> Any:
        error = describe_exception(exc)
        delay = retry_delay(policy, attempt) if is_retryable(policy, exc) else None
        with self._durable.transaction() as conn:
            status = "waiting" if delay is not None else "failed"
            step_queries.record_local(
                conn, self.workflow_id, seq, name, attempt, None, error, status
            )
            if delay is not None:
                timer = step_queries.schedule_retry(
                    conn, self.workflow_id, seq, error, delay, from_status="waiting"
                )
                if timer:
                    self.effects.timers.append(timer)
        if delay is not None:
            raise Suspend()
        raise StepFailed(self.workflow_id, seq, name, error, attempt) from exc

    def sleep(self, duration: timedelta | float) -> None:
        """Pause the workflow durably: the wait survives restarts, deploys and Redis loss.

        ``duration`` is a ``timedelta`` or seconds. The worker is free meanwhile; the timer
        lives in PostgreSQL and ``durable beat`` resumes the workflow when it is due.
        """
        seconds = durations.sleep_seconds(duration)
        seq, record = self._take("sleep", "sleep")
        if record is not None:
            self._settled(seq, record)
            return
        self.require_activation()
        wid = self.workflow_id
        base = self._now
        timer = self._durable.store(lambda c: step_queries.record_sleep(c, wid, seq, seconds, base))
        if timer:
            self.effects.timers.append(timer)
        raise Suspend()


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)
