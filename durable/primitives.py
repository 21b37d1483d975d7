"""Workflow primitives beyond steps and sleeps: signals, events, parallel steps, children.

They are methods of the workflow context (this module's mixin), each taking positions in the
run's history exactly like ``ctx.step``, so replay and the determinism check cover them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.canvas import Signature

from durable._control import PENDING, Suspend
from durable.durations import optional_seconds
from durable.errors import SignalTimeout, StepFailed, WorkflowCancelled, WorkflowIdConflict
from durable.ids import check_id
from durable.retry import NO_RETRY, RetryPolicy
from durable.store import runs as run_queries
from durable.store import signals as signal_queries

if TYPE_CHECKING:
    from durable.context import Effects
    from durable.runtime import Durable


class PrimitivesMixin:
    """Signals, events, parallel steps and child workflows of ``ctx``."""

    if TYPE_CHECKING:
        _durable: Durable
        _owner: str
        workflow_id: str
        effects: Effects

        def _take(
            self, kind: str, name: str, check_cancel: bool = True
        ) -> tuple[int, dict[str, Any] | None]: ...
        def now(self) -> datetime:
            """See :meth:`durable.context.WorkflowContext.now`."""

        def advance_now(self, moment: datetime | None) -> None:
            """See :meth:`durable.context.WorkflowContext.advance_now`."""

        def require_activation(self) -> None:
            """See :meth:`durable.context.WorkflowContext.require_activation`."""

        def check_cancel(self, seq: int, record: dict[str, Any] | None) -> None:
            """See :meth:`durable.context.WorkflowContext.check_cancel`."""

        def _settled(self, seq: int, record: dict[str, Any]) -> Any: ...
        def _describe(
            self, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[str, list[Any], dict[str, Any], dict[str, Any]]: ...
        def _schedule(
            self,
            seq: int,
            name: str,
            args: list[Any],
            kwargs: dict[str, Any],
            options: dict[str, Any],
            policy: dict[str, Any],
            timeout: float | None,
        ) -> None: ...

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
            if record["status"] == "timeout":
                raise SignalTimeout(self.workflow_id, name)
            if record["status"] != "waiting":
                return self._settled(seq, record)
        self.require_activation()
        seconds = optional_seconds("timeout", timeout)
        wid, first, base = self.workflow_id, record is None, self.now()
        got = self._durable.store(
            lambda c: signal_queries.wait_for_signal(c, wid, seq, name, seconds, first, base)
        )
        if got.timer:
            self.effects.timers.append(got.timer)
        if not got.consumed:
            raise Suspend()
        self.advance_now(got.completed_at)
        return self._durable.decode(got.payload)

    def set_event(self, key: str, value: Any) -> None:
        """Publish ``value`` under ``key`` for the outside world (``durable.get_event``).

        The latest value wins; ``durable show`` lists them. Example::

            ctx.set_event("status", "charged")
        """
        seq, record = self._take("event", key)
        if record is not None:
            return
        self.require_activation()
        text = self._durable.encode(value, f"event {key!r}")
        wid = self.workflow_id
        done = self._durable.store(lambda c: signal_queries.set_event(c, wid, seq, key, text))
        self.advance_now(done)

    # -- parallel steps -----------------------------------------------------------------------

    def parallel(
        self,
        calls: Sequence[Signature[Any] | Task[Any, Any]],
        *,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,
    ) -> list[Any]:
        """Run several steps at once as Celery tasks; return their results in order.

        Each step is checkpointed on its own, so after a crash only the unfinished ones run
        again. When steps fail (after their retries), the others are still awaited; then
        :class:`~durable.errors.StepFailed` is raised for the first failed one, in order.
        Example::

            charge, stock = ctx.parallel([charge_card.s(order), reserve.s(order)])
        """
        policy = retry.to_dict() if retry is not None else NO_RETRY
        seconds = optional_seconds("timeout", timeout)
        records: list[tuple[int, dict[str, Any] | None]] = []
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
                self._schedule(seq, name, args, kwargs, options, policy, seconds)
        if any(r is None or r["status"] in PENDING for _, r in records):
            raise Suspend()
        return [self._settled(seq, record) for seq, record in records if record is not None]

    def map(
        self,
        task: Task[Any, Any] | Signature[Any],
        items: Iterable[Any],
        *,
        retry: RetryPolicy | None = None,
        timeout: timedelta | float | None = None,
    ) -> list[Any]:
        """Run ``task`` once per item (the item as its last argument), in parallel.

        Example::

            summaries = ctx.map(summarise, chunks)
        """
        base = task if isinstance(task, Signature) else task.s()
        calls = [base.replace(args=(*base.args, item)) for item in items]
        return self.parallel(calls, retry=retry, timeout=timeout)

    # -- child workflows ----------------------------------------------------------------------

    def child(
        self,
        name_or_fn: str | Callable[..., Any],
        *args: Any,
        workflow_id: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Start a child workflow and wait for its result.

        The child is a run of its own (``<parent id>/<position>`` unless ``workflow_id`` is
        given), visible in ``durable list``. Its failure raises
        :class:`~durable.errors.StepFailed` here; cancelling the parent cancels it. Example::

            receipt = ctx.child("payments.collect", order_id)
        """
        name = self._durable.workflow_name(name_or_fn)
        seq, record = self._take("child", name)
        if record is not None:
            return self._settled(seq, record)
        self.require_activation()
        child_id = f"{self.workflow_id}/{seq}" if workflow_id is None else check_id(workflow_id)
        args_json = self._durable.encode(list(args), f"arguments of child workflow {name}")
        kwargs_json = self._durable.encode(kwargs, f"keyword arguments of child workflow {name}")
        wid, owner = self.workflow_id, self._owner
        timeout = self._durable.execution_timeouts.get(name)
        started = self._durable.store(
            lambda c: run_queries.start_child(
                c, wid, owner, seq, child_id, name, args_json, kwargs_json, timeout
            )
        )
        if not started.ours:
            raise WorkflowIdConflict(child_id, started.taken_by or "?", name)
        if started.timer:
            self.effects.timers.append(started.timer)
        self.effects.activations.append(child_id)
        self.effects.names[child_id] = name
        raise Suspend()


__all__ = ["PrimitivesMixin", "SignalTimeout", "StepFailed", "WorkflowCancelled"]
