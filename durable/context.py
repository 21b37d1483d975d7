"""The workflow context: what ``ctx`` is inside a workflow, and how replay works.

Every durable operation a workflow performs (a step, a local step, a sleep) takes the next
position in its history. On each activation the runtime loads the recorded positions in one
query and runs the workflow function from the top:

- a position with a recorded outcome returns it (or raises ``StepFailed``) without running
  anything again;
- a position recorded but not finished (a step in flight, a sleep not over) suspends the
  activation: the workflow is resumed when that position settles;
- the first position with no record runs for real: a remote step is committed as
  ``scheduled`` and dispatched after the activation ends; a local step runs here and its
  outcome is committed before the workflow goes on; a sleep commits a durable timer. (The
  scheduled step is written in the same statement that releases the run's lease.)

A recorded position whose kind or name differs from what the code asks for now raises
:class:`~durable.errors.NonDeterminismError`, naming both.
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

from durable.errors import NonDeterminismError, StepFailed
from durable.retry import NO_RETRY, RetryPolicy, is_retryable, retry_delay
from durable.serialization import describe_exception, encode
from durable.store import steps as step_queries
from durable.worker import StepInfo, step_context

if TYPE_CHECKING:
    from durable.runtime import Durable
    from durable.store.runs import Activation


class Suspend(BaseException):
    """Ends an activation at a position that has not settled yet.

    A ``BaseException`` so that a workflow's ``except Exception`` cannot swallow it.
    """


@dataclass
class PendingDispatch:
    """A step committed as scheduled during replay, to be sent once the activation ends."""

    seq: int
    name: str
    options: dict[str, Any]


@dataclass
class PendingSchedule:
    """A new remote step, written together with the release of the run's lease."""

    seq: int
    name: str
    args: str
    kwargs: str
    options: str


@dataclass
class Effects:
    """What an activation must write when it ends, and do once that is committed."""

    workflow_id: str
    schedule: PendingSchedule | None = None
    dispatches: list[PendingDispatch] = field(default_factory=list)
    timers: list[tuple[int, float]] = field(default_factory=list)


def _parse_time(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _function_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


class WorkflowContext:
    """The ``ctx`` argument of a workflow function.

    Example::

        @durable.workflow("orders.fulfill")
        def fulfill(ctx, order_id):
            order = ctx.step(validate_order, order_id)
            ctx.sleep(timedelta(days=1))
            return ctx.step(charge_card, order, retry=RetryPolicy(max_attempts=5))
    """

    def __init__(self, durable: Durable, activation: Activation) -> None:
        self._durable = durable
        self._records: dict[int, dict[str, Any]] = {int(s["seq"]): s for s in activation.steps}
        self._last_recorded = max(self._records, default=0)
        self._seq = 0
        self._now = activation.created_at
        self._seed = hashlib.sha256(activation.workflow_id.encode()).digest()
        self._rng = _random.Random(self._seed)
        self._uuid_count = 0
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
        return self._now

    def uuid4(self) -> uuid.UUID:
        """A random-looking UUID that replay reproduces exactly."""
        self._uuid_count += 1
        digest = hashlib.sha256(self._seed + b"uuid" + str(self._uuid_count).encode()).digest()
        return uuid.UUID(bytes=digest[:16], version=4)

    def random(self) -> float:
        """A float in [0, 1) from a generator seeded by the workflow id, replayed exactly."""
        return self._rng.random()

    # -- positions ---------------------------------------------------------------------------

    def _take(self, kind: str, name: str) -> tuple[int, dict[str, Any] | None]:
        self._seq += 1
        seq = self._seq
        record = self._records.get(seq)
        if record is not None and (record["kind"] != kind or record["name"] != name):
            raise NonDeterminismError(
                self.workflow_id, seq, f"{kind} {name}", f"{record['kind']} {record['name']}"
            )
        if record is not None and record.get("completed_at"):
            self._now = _parse_time(record["completed_at"]) or self._now
        return seq, record

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
            return record["result"]
        if record["status"] == "failed":
            raise StepFailed(
                self.workflow_id,
                seq,
                record["name"],
                record.get("error") or "",
                int(record.get("attempts") or 0),
            )
        raise Suspend()

    def step(
        self,
        task: Task[Any, Any] | Signature[Any] | Callable[..., Any],
        *args: Any,
        retry: RetryPolicy | None = None,
        local: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run ``task`` as the workflow's next step and return its committed result.

        ``task`` is a Celery task or signature (its arguments come first, then ``args``;
        its options such as ``queue`` are honoured); the step runs as that task on whatever
        worker its routing names. With ``local=True`` any callable runs here, in the
        workflow's own process, without a broker hop, checkpointed the same way.
        ``retry`` sets the retry policy; without it a raising step fails at once. A step
        with no attempts left raises :class:`~durable.errors.StepFailed`.
        """
        name, call_args, call_kwargs, options = self._describe(task, args, kwargs)
        kind = "local" if local else "task"
        seq, record = self._take(kind, name)
        policy = retry.to_dict() if retry is not None else NO_RETRY
        if record is not None and not (local and record["status"] == "ready"):
            return self._settled(seq, record)
        if local:
            attempts = int(record["attempts"]) if record else 0
            return self._run_local(seq, name, task, call_args, call_kwargs, policy, attempts + 1)
        limit = self._durable.settings.max_payload_bytes
        options["retry"] = policy
        options["label"] = f"{name}[{self.workflow_id}#{seq}]"
        # Written by the activation in the statement that releases the lease, then sent.
        self.effects.schedule = PendingSchedule(
            seq,
            name,
            encode(call_args, f"arguments of step {seq} ({name})", limit),
            encode(call_kwargs, f"keyword arguments of step {seq} ({name})", limit),
            encode(options, f"options of step {seq} ({name})", limit),
        )
        self.effects.dispatches.append(PendingDispatch(seq, name, options))
        raise Suspend()

    def _describe(
        self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[str, list[Any], dict[str, Any], dict[str, Any]]:
        if isinstance(task, Signature):
            options = {
                k: v
                for k, v in task.options.items()
                if k in ("queue", "routing_key", "exchange", "priority")
            }
            return (
                str(task.task),
                [*task.args, *args],
                {**task.kwargs, **kwargs},
                options,
            )
        if isinstance(task, Task):
            options = {
                k: getattr(task, k)
                for k in ("queue", "routing_key", "exchange", "priority")
                if getattr(task, k, None) is not None
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
        limit = self._durable.settings.max_payload_bytes
        body = fn.run if isinstance(fn, Task) else fn
        if isinstance(fn, Signature):
            body = self._durable.app.tasks[str(fn.task)].run
        info = StepInfo(self.workflow_id, seq, name, attempt)
        try:
            with step_context(info):
                value = body(*args, **kwargs)
            result = encode(value, f"result of step {seq} ({name})", limit)
        except Exception as exc:
            return self._local_failed(seq, name, exc, policy, attempt)
        with self._durable.connect() as conn:
            done = step_queries.record_local(
                conn, self.workflow_id, seq, name, attempt, result, None, "completed"
            )
        self._now = done or self._now
        # Hand back what replay will hand back: the JSON round trip of the value.
        return json.loads(result)

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
        seconds = duration.total_seconds() if isinstance(duration, timedelta) else float(duration)
        seq, record = self._take("sleep", "sleep")
        if record is not None:
            self._settled(seq, record)
            return
        with self._durable.connect() as conn:
            timer = step_queries.record_sleep(conn, self.workflow_id, seq, max(seconds, 0.0))
        if timer:
            self.effects.timers.append(timer)
        raise Suspend()


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)
