"""The workflow context: what ``ctx`` is inside a workflow.

Every durable operation a workflow performs takes the next position in its history (see
:mod:`durable.replay` for how positions replay). The first position with no record runs for
real: a remote step is scheduled (written in the statement that releases the run's lease)
and dispatched after the activation ends; a local step runs here and its outcome is
committed before the workflow goes on; a sleep commits a durable timer. Beyond steps and
sleeps: signal waits, events and attributes, parallel steps and child workflows, each taking
positions exactly like ``ctx.step``, so replay and the determinism check cover them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from celery import Task
from celery.canvas import Signature
from celery.local import Proxy
from sqlalchemy import Connection

from durable import attributes as attribute_rules
from durable import durations, tracing
from durable._control import PENDING, LeaseLost, Suspend
from durable.codec import seal
from durable.dispatch import expiry, routing_options
from durable.effects import PendingDispatch
from durable.errors import InvalidAttributes, SignalTimeout, StepFailed, WorkflowIdConflict
from durable.ids import check_id
from durable.limits import Limit
from durable.replay import Replay
from durable.retry import NO_RETRY, RetryPolicy, is_retryable, next_attempt
from durable.serialization import describe_exception, dumps, encode
from durable.step_info import StepInfo, step_context
from durable.store import local as local_queries
from durable.store import run_limits
from durable.store import runs as run_queries
from durable.store import signals as signal_queries
from durable.store import steps as step_queries
from durable.store import tree as tree_queries
from durable.store.records import StepRecord


def _function_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _is_absolute(expires: Any) -> bool:
    """A datetime (or its ISO string) needs no start time; seconds count from ``ctx.now()``."""
    return isinstance(expires, str | datetime)


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


def _timeout(value: timedelta | float | None) -> float | None:
    """A timeout given to ``ctx``: checked (finite, not negative, bounded), in seconds."""
    return durations.optional_checked("timeout", value)


class WorkflowContext(Replay):
    """The ``ctx`` argument of a workflow function.

    Example::

        @durable.workflow("orders.fulfill")
        def fulfill(ctx, order_id):
            order = ctx.step(validate_order, order_id)
            ctx.sleep(timedelta(days=1))
            return ctx.step(charge_card, order, retry=RetryPolicy(max_attempts=5))
    """

    # -- steps and sleeps ---------------------------------------------------------------------

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

        ``limit=`` (a :class:`~durable.limits.Limit`, or the task's ``durable_limit``
        option) caps how many steps of the limit's key run at once across every worker; a
        step over it waits ``queued``. ``priority=`` (an integer, default 0) orders the
        key's queue: higher first, then oldest first. Both are durable's only when a limit
        applies; otherwise they reach the task as keyword arguments, as before.

        ``task`` is a Celery task or signature (its arguments come first, then ``args``;
        its options such as ``queue`` are honoured); the step runs as that task on whatever
        worker its routing names. With ``local=True`` any callable runs here, in the
        workflow's own process, without a broker hop, checkpointed the same way.
        ``retry`` sets the retry policy; without it a raising step fails at once. A step
        with no attempts left raises :class:`~durable.errors.StepFailed`. ``timeout`` limits
        each attempt from start to close (a Celery time limit, and the beat fails an attempt
        past it even where the pool cannot enforce one); a timed-out attempt counts as failed.
        A signature's ``expires`` (seconds from ``ctx.now()``, or a datetime) is Celery's:
        a step not started by then is not run and fails with
        :class:`~durable.errors.TaskExpired`, not retried.
        ``retry``, ``local`` and ``timeout`` are durable's: a task cannot receive keyword
        arguments of those names through ``ctx.step``.
        """
        if local and timeout is not None:
            raise ValueError("ctx.step: timeout= applies to remote steps, not to local=True")
        if local and isinstance(kwargs.get("limit"), Limit):
            raise ValueError("ctx.step: limit= applies to remote steps, not to local=True")
        kind = "local" if local else "task"
        seq, record = self._take(kind, _step_name(task))
        if record is not None and not (local and record.status == "ready"):
            return self._settled(seq, record)  # replay: nothing else to work out
        name, call_args, call_kwargs, options = self._describe(task, args, kwargs)
        policy = retry.to_dict() if retry is not None else NO_RETRY
        if not local:
            self._limit(task, call_args, call_kwargs, options)
        if local:
            attempts = record.attempts if record else 0
            return self._run_local(seq, name, task, call_args, call_kwargs, policy, attempts + 1)
        self._schedule(seq, name, call_args, call_kwargs, options, policy, _timeout(timeout))
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
        limit = self._core.settings.max_payload_bytes
        if "queue" not in options and "exchange" not in options:
            # Resolve the route now, with this app's task_routes, so that whoever sends the
            # step later (a beat re-sending it, another service) sends it to the same queue.
            routed = self.app.amqp.router.route({}, name, tuple(args), kwargs)
            queue = routed.get("queue")
            if queue is not None:
                options["queue"] = getattr(queue, "name", queue)
        if policy is not NO_RETRY:  # given: it decides, not the task's retry options
            options["retry"] = policy
        if timeout is not None:
            options["timeout"] = timeout
        self.effects.schedules.append(
            step_queries.NewStep(
                seq,
                name,
                self._core.encode(args, f"arguments of step {seq} ({name})"),
                self._core.encode(kwargs, f"keyword arguments of step {seq} ({name})"),
                encode(options, f"options of step {seq} ({name})", limit),
            )
        )
        self.effects.dispatches.append(PendingDispatch(seq, name, options))

    def _limit(
        self,
        task: Any,
        args: list[Any],
        kwargs: dict[str, Any],
        options: dict[str, Any],
        given: Limit | None = None,
        priority: int | None = None,
    ) -> None:
        """Store the step's limit in ``options``: ``given``, ``limit=``, else the task's.

        The task's is its ``durable_limit`` option. Without ``given``, ``limit`` and
        ``priority`` are taken out of the task's keyword arguments only when a limit applies
        (a ``Limit`` passed, or declared by the task): a task with keyword arguments of those
        names keeps receiving them otherwise. The key is computed here, once, from the
        arguments the task will receive.
        """
        if given is not None:
            options["limit"] = given.for_step(args, kwargs, priority or 0)
            return
        limit = kwargs.get("limit")
        if isinstance(limit, Limit):
            del kwargs["limit"]
        else:
            limit = getattr(self._task_object(task), "durable_limit", None)
            if limit is None:
                return
            if not isinstance(limit, Limit):
                raise TypeError(f"durable_limit must be a durable.Limit, not {limit!r}")
        if priority is None:
            priority = kwargs.pop("priority", 0)
        options["limit"] = limit.for_step(args, kwargs, priority)

    def _task_object(self, task: Any) -> Any:
        if isinstance(task, Proxy):
            task = task._get_current_object()
        if isinstance(task, Signature):
            return self.app.tasks.get(str(task.task))
        return task

    def _describe(
        self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[str, list[Any], dict[str, Any], dict[str, Any]]:
        if isinstance(task, Signature):
            options = routing_options(task.options)
            own = self.app.tasks.get(str(task.task))
            self._expires(options, task.options.get("expires", getattr(own, "expires", None)))
            return str(task.task), [*task.args, *args], {**task.kwargs, **kwargs}, options
        if isinstance(task, Task):
            options = routing_options(lambda key: getattr(task, key, None))
            self._expires(options, getattr(task, "expires", None))
            return str(task.name), list(args), dict(kwargs), options
        if callable(task):
            return _function_name(task), list(args), dict(kwargs), {}
        raise TypeError(f"ctx.step needs a Celery task, a signature or a callable, got {task!r}")

    def _expires(self, options: dict[str, Any], expires: Any) -> None:
        """Store Celery's ``expires``, the signature's else the task's, as epoch seconds.

        Seconds count from when the step is scheduled; past the moment it is not run.
        """
        if expires is not None:
            start = self._now if _is_absolute(expires) else self.now()
            options["expires"] = expiry(expires, start)

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
        limit = self._core.settings.max_payload_bytes
        body = fn.run if isinstance(fn, Task) else fn
        if isinstance(fn, Signature):
            body = self._core.app.tasks[str(fn.task)].run
        info = StepInfo(self.workflow_id, seq, name, attempt)
        wid, owner = self.workflow_id, self._owner
        with tracing.step_span(
            self._workflow_name, wid, seq, name, attempt, self._trace, kind="local"
        ) as span:
            try:
                with step_context(info):
                    value = body(*args, **kwargs)
                plain = dumps(value, f"result of step {seq} ({name})", limit)
            except Exception as exc:
                span.exception(exc, sealed=self._core.seals_errors)
                try:
                    return self._local_failed(seq, name, exc, policy, attempt)
                except Suspend:
                    span.outcome("retrying")
                    raise
                except StepFailed:
                    span.outcome("failed")
                    raise
            result = seal(plain, self._core.codec)
            done = self._core.store(
                lambda c: local_queries.record_local(
                    c, wid, owner, seq, name, attempt, result, None, "completed"
                )
            )
            if done is None:
                span.outcome("lease lost")
                raise LeaseLost()  # another activation has the run: its outcome stands, not ours
            span.outcome("completed")
        self.advance_now(done)
        # Hand back what replay will hand back: the JSON round trip of the value.
        return json.loads(plain)

    def _local_failed(
        self, seq: int, name: str, exc: Exception, policy: dict[str, Any], attempt: int
    ) -> Any:
        plain = describe_exception(exc)
        error = self._core.seal_error(plain)
        delay, pause = next_attempt(policy, attempt, is_retryable(policy, exc))
        with self._core.transaction() as conn:
            status = "waiting" if delay is not None else "failed"
            recorded = local_queries.record_local(
                conn, self.workflow_id, self._owner, seq, name, attempt, None, error, status
            )
            if recorded is None:
                raise LeaseLost() from exc
            if delay is not None:
                timer = step_queries.schedule_retry(
                    conn, self.workflow_id, seq, error, delay, from_status="waiting", pause=pause
                )
                if timer and not pause:  # a paused run's timer is indexed by its unpause
                    self.effects.timers.append(timer)
        if delay is not None:
            raise Suspend()
        raise StepFailed(self.workflow_id, seq, name, plain, attempt) from exc

    def sleep(self, duration: timedelta | float) -> None:
        """Pause the workflow durably: the wait survives restarts, deploys and Redis loss.

        ``duration`` is a ``timedelta`` or seconds. The worker is free meanwhile; the timer
        lives in PostgreSQL and ``durable beat`` resumes the workflow when it is due.
        """
        wait = durations.sleep_seconds(duration)
        seq, record = self._take("sleep", "sleep")
        if record is not None:
            self._settled(seq, record)
            return
        self.require_activation()
        wid = self.workflow_id
        base = self._now
        timer = self._core.store(lambda c: local_queries.record_sleep(c, wid, seq, wait, base))
        if timer:
            self.effects.timers.append(timer)
        raise Suspend()

    # -- signals and events -------------------------------------------------------------------

    def wait_for_signal(self, name: str, timeout: timedelta | float | None = None) -> Any:
        """Wait for the signal ``name`` and return its payload.

        Signals sent before the wait are kept: the oldest one not yet taken is returned at
        once. Each signal is delivered to one wait, in the order sent. With ``timeout`` (a
        durable timer) :class:`~durable.errors.SignalTimeout` is raised when none arrives in
        time. Example::

            shipped = ctx.wait_for_signal("shipped", timeout=timedelta(days=3))
        """
        seq, record = self._take("signal", name)
        if record is not None:
            if record.status == "timeout":
                raise SignalTimeout(self.workflow_id, name)
            if record.status != "waiting":
                return self._settled(seq, record)
        self.require_activation()
        wait, wid, first, base = _timeout(timeout), self.workflow_id, record is None, self.now()
        got = self._core.store(
            lambda c: signal_queries.wait_for_signal(c, wid, seq, name, wait, first, base)
        )
        if got.timer:
            self.effects.timers.append(got.timer)
        if not got.consumed:
            raise Suspend()
        self.advance_now(got.completed_at)
        return self._core.decode(got.payload)

    def set_event(self, key: str, value: Any) -> None:
        """Publish ``value`` under ``key`` for the outside world (``durable.get_event``).

        The latest value wins; ``durable show`` lists them. Example::

            ctx.set_event("status", "charged")
        """
        seq, record = self._take("event", key)
        if record is not None:
            return
        self.require_activation()
        text = self._core.encode(value, f"event {key!r}")
        wid = self.workflow_id
        done = self._core.store(lambda c: signal_queries.set_event(c, wid, seq, key, text))
        self.advance_now(done)

    def set_attributes(self, attributes: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        """Merge searchable attributes into the run's (``durable list --attr``).

        Takes a mapping, keywords, or both (keywords win); a key set again gets the new
        value. Values are JSON scalars (:mod:`durable.attributes`). The call takes a position
        in the history like ``set_event``: replay finds it recorded and writes nothing again.
        Bad attributes raise :class:`~durable.errors.InvalidAttributes`; attributes that would
        take the run past :data:`~durable.attributes.MAX_KEYS` keys or
        :data:`~durable.attributes.MAX_BYTES` bytes raise it too, and nothing is written.
        Example::

            ctx.set_attributes(stage="charged", amount=120.5)
        """
        checked = attribute_rules.check({**(attributes or {}), **more})
        seq, record = self._take("attributes", "attributes")
        if record is not None:
            return
        self.require_activation()
        wid, owner, text = self.workflow_id, self._owner, attribute_rules.to_json(checked)
        limits = attribute_rules.MAX_KEYS, attribute_rules.MAX_BYTES
        done = self._core.store(
            lambda c: run_queries.set_attributes(c, wid, owner, seq, text, *limits)
        )
        if not done.within_limits:
            raise InvalidAttributes(
                f"run {wid} would hold more than {limits[0]} keys or {limits[1]} bytes"
            )
        self.advance_now(done.completed_at)

    # -- parallel steps -----------------------------------------------------------------------

    def parallel(
        self,
        calls: Sequence[Signature[Any] | Task[Any, Any]],
        *,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,
        limit: Limit | None = None,
        priority: int = 0,
    ) -> list[Any]:
        """Run several steps at once as Celery tasks; return their results in order.

        Each step is checkpointed on its own, so after a crash only the unfinished ones run
        again. When steps fail (after their retries), the others are still awaited; then
        :class:`~durable.errors.StepFailed` is raised for the first failed one, in order.
        ``limit`` and ``priority`` apply to each call as in :meth:`step` (without
        ``limit``, a task's own ``durable_limit`` applies). Example::

            charge, stock = ctx.parallel([charge_card.s(order), reserve.s(order)])
        """
        policy = retry.to_dict() if retry is not None else NO_RETRY
        deadline = _timeout(timeout)
        records: list[tuple[int, StepRecord | None]] = []
        described = []
        # Every position of the batch is taken before a cancellation can be delivered, so
        # that compensation after it never lands on a position of the batch.
        for call in calls:
            name, args, kwargs, options = self._describe(call, (), {})
            seq, record = self._take("task", name, check_cancel=False)
            records.append((seq, record))
            described.append((name, args, kwargs, options))
        for seq, record in records:
            self.check_cancel(seq, record)
        for (seq, record), (name, args, kwargs, options) in zip(records, described, strict=True):
            if record is None:
                self._limit(call, args, kwargs, options, limit, priority)
                self._schedule(seq, name, args, kwargs, options, policy, deadline)
        if any(r is None or r.status in PENDING for _, r in records):
            raise Suspend()
        return [self._settled(seq, record) for seq, record in records if record is not None]

    def map(
        self,
        task: Task[Any, Any] | Signature[Any],
        items: Iterable[Any],
        *,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,
        limit: Limit | None = None,
        priority: int = 0,
    ) -> list[Any]:
        """Run ``task`` once per item (the item as its last argument), in parallel.

        Example::

            summaries = ctx.map(summarise, chunks)
        """
        base = task if isinstance(task, Signature) else task.s()
        calls = [base.replace(args=(*base.args, item)) for item in items]
        return self.parallel(calls, retry=retry, timeout=timeout, limit=limit, priority=priority)

    # -- child workflows ----------------------------------------------------------------------

    def child(
        self,
        name_or_fn: str | Callable[..., Any],
        *args: Any,
        workflow_id: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Start a child workflow and wait for its result.

        The child is a run of its own (``<parent id>/<position>`` unless ``workflow_id`` is
        given), visible in ``durable list``, with ``attributes`` as its searchable attributes
        if given. Its failure raises :class:`~durable.errors.StepFailed` here; cancelling the
        parent cancels it. Example::

            receipt = ctx.child("payments.collect", order_id, attributes={"customer": 42})
        """
        attributes_json = attribute_rules.to_json(attribute_rules.check(attributes or {}))
        name = self._core.workflow_name(name_or_fn)
        seq, record = self._take("child", name)
        if record is not None:
            return self._settled(seq, record)
        self.require_activation()
        child_id = f"{self.workflow_id}/{seq}" if workflow_id is None else check_id(workflow_id)
        args_json = self._core.encode(list(args), f"arguments of child workflow {name}")
        kwargs_json = self._core.encode(kwargs, f"keyword arguments of child workflow {name}")
        wid, owner = self.workflow_id, self._owner
        timeout = self._core.execution_timeouts.get(name)
        declared = self._core.workflow_limits.get(name)
        limit = None if declared is None else declared.for_run(list(args), kwargs, 0)
        cap = 0 if declared is None else declared.concurrency or 0

        def start(conn: Connection) -> tuple[tree_queries.ChildStarted, list[tuple[str, str]]]:
            if limit is not None:  # queued, then admitted if it fits: store.run_limits
                run_limits.declare(conn, limit[0], limit[1], cap)
            started = tree_queries.start_child(
                conn,
                wid,
                owner,
                seq,
                child_id,
                name,
                args_json,
                kwargs_json,
                timeout,
                attributes_json,
                limit,
            )
            if limit is None or not started.created:
                return started, [(child_id, name)] if started.created else []
            return started, run_limits.admit(conn, limit[0], limit[1])

        if limit is None:
            started, admitted = self._core.store(start)
        else:
            started, admitted = self._core.atomically(start)
        if not started.ours:
            raise WorkflowIdConflict(child_id, started.taken_by or "?", name)
        if started.timer:
            self.effects.timers.append(started.timer)
        if not started.created:
            admitted = [(child_id, name)]  # recorded by an earlier activation: send it again
        for run_id, run_name in admitted:
            self.effects.activations.append(run_id)
            self.effects.names[run_id] = run_name
        raise Suspend()
