"""A step travels as its task's own Celery message, and runs inside the task's own execution.

The message is sent under the task's name, so the worker applies what the task declares,
the way Celery does: ``rate_limit`` (and ``task_annotations``), ``soft_time_limit`` /
``time_limit``, ``acks_late`` / ``reject_on_worker_lost``, ``ignore_result``, routing,
Celery's signals with the task as sender, ``celery inspect`` and Flower's per-task views.

Messages carry no values. The message's only argument is the keyword ``durable_step``, a
label ``"<workflow id>#<step number>"``; the real arguments are read from PostgreSQL by the
step's claim. In the worker, every task of the app is wrapped at ``worker_init`` (Celery's
documented place to patch before tracers are built): the wrapper sees the label, runs
:func:`durable.runner.execute_step` (claim, heartbeat, the task's body with the stored
arguments, settle) and hands Celery the outcome:

- a settled step returns a label (``"completed"``, ``"ignored"``, ...), never its value;
- a step whose attempt failed raises the task's exception after the failure is committed, so
  ``task_failure`` and Flower's failed state are the task's own;
- a retry (the task's ``self.retry``, its ``autoretry_for``, or a ``RetryPolicy``) raises
  Celery's :class:`~celery.exceptions.Retry` once the retry's durable timer is committed.

A worker whose app has no ``Durable(app)`` does not know the ``durable_step`` keyword: the
task's call fails with ``TypeError`` (unexpected keyword argument) before its body runs.
Only a task taking ``**kwargs`` would run there with wrong arguments; docs/migrating.md says
so.

Inside a step, ``self.retry(exc=, countdown=, eta=, max_retries=)`` schedules a durable retry
timer instead of a broker countdown; ``self.request.retries`` counts earlier attempts;
``MaxRetriesExceededError`` (or ``exc``) is raised where Celery raises it. A ``retry=
RetryPolicy(...)`` given to ``ctx.step`` wins: the task's own retry options are then not used,
and ``self.retry(exc=e)`` counts as a failure with ``e`` for the policy to judge.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from celery import Task, signals
from celery.app.trace import build_tracer
from celery.exceptions import Retry

from durable import runner
from durable.dispatch import SENT_AT_HEADER, STEP_KWARG, parse_step_label
from durable.errors import TaskExpired
from durable.step_info import current_step, step_has_policy

if TYPE_CHECKING:
    from durable.core import Core

log = logging.getLogger(__name__)

_WRAPPED = "__durable_wrapped__"


class StepRetry(Retry):
    """``self.retry()`` inside a step: a durable retry after ``when`` seconds.

    Built as Celery's ``Retry`` is, so that it pickles the same way (a prefork child sends
    the exception to its parent).
    """

    def __init__(
        self,
        message: str | None = None,
        exc: Exception | None = None,
        when: Any = None,
        **options: Any,
    ) -> None:
        super().__init__(message, exc, when, **options)
        self.durable_delay = max(float(when or 0), 0.0)


def install(core: Core) -> None:
    """Wrap the app's tasks when a worker of ``core.app`` starts (see the module doc)."""

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is core.app:
            wrap_tasks(core)

    def on_task_unknown(sender: Any = None, message: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is core.app and message is not None:
            fail_unknown(core, sender, message)

    def on_task_revoked(
        sender: Any = None, request: Any = None, expired: bool = False, **_: Any
    ) -> None:
        if expired and getattr(sender, "app", None) is core.app:
            fail_expired(core, getattr(request, "kwargs", None))

    # Weak receivers, kept alive by ``core``: a Core dropped (a test's) leaves no handler.
    signals.worker_init.connect(on_worker_init)
    signals.task_unknown.connect(on_task_unknown)
    signals.task_revoked.connect(on_task_revoked)
    core._signal_handlers = (  # type: ignore[attr-defined]
        on_worker_init,
        on_task_unknown,
        on_task_revoked,
    )


def wrap_tasks(core: Core) -> int:
    """Wrap every task registered on the app; returns how many were wrapped now."""
    wrapped = 0
    for name, task in list(core.app.tasks.items()):
        if not name.startswith(("celery.", "durable.")) and wrap(core, task):
            wrapped += 1
    return wrapped


def wrap(core: Core, task: Task[Any, Any]) -> bool:
    """Make ``task`` run durable step messages; False if it already does."""
    if task.__dict__.get(_WRAPPED):
        return False
    body = task.run  # bound, and Celery's autoretry wrapper where the task has one
    own_retry = task.retry

    def run(*args: Any, **kwargs: Any) -> Any:
        if STEP_KWARG not in kwargs:
            return body(*args, **kwargs)
        return _run_step(core, task, body, args, kwargs)

    def retry(*args: Any, **kwargs: Any) -> Any:
        if current_step().workflow_id is None:
            return own_retry(*args, **kwargs)
        return _durable_retry(task, *args, **kwargs)

    task.run = run  # type: ignore[method-assign]
    task.retry = retry  # type: ignore[method-assign]
    task.__dict__[_WRAPPED] = True
    return True


def _run_step(
    core: Core, task: Task[Any, Any], body: Any, args: tuple[Any, ...], kwargs: Any
) -> Any:
    where = parse_step_label(kwargs.get(STEP_KWARG))
    if args or len(kwargs) != 1 or where is None:
        raise TypeError(
            f"{task.name}: malformed step message: it must carry only "
            f"{STEP_KWARG}='<workflow id>#<step number>'"
        )
    workflow_id, seq = where
    request = task.request
    fresh = runner.first_delivery(
        core,
        getattr(request, SENT_AT_HEADER, None),
        bool((request.delivery_info or {}).get("redelivered")),
    )
    raised: list[BaseException] = []

    def call(step_args: list[Any], step_kwargs: dict[str, Any], attempt: int) -> Any:
        request.retries = max(attempt - 1, 0)
        try:
            return body(*step_args, **step_kwargs)
        except BaseException as exc:
            raised.append(exc)
            raise

    outcome = runner.execute_step(core, workflow_id, seq, fresh=fresh, call=call)
    if outcome == "retrying" and raised and isinstance(raised[-1], Exception):
        exc = raised[-1]
        raise exc if isinstance(exc, Retry) else Retry(exc=exc)
    if outcome == "failed" and raised and isinstance(raised[-1], Exception):
        raise raised[-1]
    return outcome


def _durable_retry(
    task: Task[Any, Any],
    args: Any = None,
    kwargs: Any = None,
    exc: Exception | None = None,
    throw: bool = True,
    eta: datetime | None = None,
    countdown: float | None = None,
    max_retries: int | None = None,
    **options: Any,
) -> Any:
    """``self.retry`` inside a step: Celery's checks, then a durable retry (module doc)."""
    if args is not None or kwargs is not None:
        raise ValueError(
            f"{task.name}: self.retry(args=, kwargs=) cannot change a durable step's "
            "arguments; they are committed with the step"
        )
    if step_has_policy():
        # A RetryPolicy given to ctx.step decides; the attempt fails with ``exc``.
        raise exc if exc is not None else Retry("Task can be retried", None)
    limit = task.max_retries if max_retries is None else max_retries
    if limit is not None and task.request.retries >= limit:
        if exc is not None:
            raise exc
        raise task.MaxRetriesExceededError(
            f"Can't retry {task.name}[{task.request.id}] args:() kwargs:{{}}"
        )
    if eta is not None:
        when = eta if eta.tzinfo else eta.replace(tzinfo=UTC)
        delay = (when - datetime.now(UTC)).total_seconds()
    elif countdown is not None:
        delay = float(countdown)
    else:
        delay = float(task.default_retry_delay or 0)
    raise StepRetry(exc=exc, when=delay)


def fail_expired(core: Core, kwargs: Any) -> None:
    """A step message the worker revoked as past its ``expires``: fail the step for good.

    Celery acknowledges an expired message without running it; left alone, the step would
    stay unclaimed and the sweep would send it again, to be revoked again. The step is
    claimed and fails with :class:`~durable.errors.TaskExpired` (never retried); its body
    does not run.
    """
    where = parse_step_label(kwargs.get(STEP_KWARG)) if isinstance(kwargs, dict) else None
    if where is None:
        return

    def expired(_args: list[Any], _kwargs: dict[str, Any], _attempt: int) -> Any:
        raise TaskExpired(current_step().name or "?", datetime.now(UTC))

    try:
        runner.execute_step(core, where[0], where[1], call=expired)
    except Exception:  # the consumer's thread must go on; the sweep sends the step again
        log.exception("durable: could not fail expired step %s#%s", *where)


def fail_unknown(core: Core, consumer: Any, message: Any) -> None:
    """A step message the worker's consumer did not know the task of (Celery rejected it).

    A task registered after the worker started (imported late, or defined by a test while
    its worker runs) is wrapped, taught to the consumer, and its message is published
    again, as it was. A task this worker does not have at all fails the step's attempt with
    ``TaskNotRegistered``, in the store, where the workflow sees it.
    """
    try:
        headers, body = message.headers or {}, message.decode()
    except Exception:
        return
    kwargs = body[1] if isinstance(body, list | tuple) and len(body) > 1 else None
    where = parse_step_label(kwargs.get(STEP_KWARG)) if isinstance(kwargs, dict) else None
    name = headers.get("task")
    if where is None or not isinstance(name, str):
        return
    task = core.app.tasks.get(name)
    if task is None:
        runner.execute_step(core, where[0], where[1])
        return
    wrap(core, task)
    consumer.strategies[name] = task.start_strategy(core.app, consumer)
    task.__trace__ = build_tracer(name, task, core.app.loader, consumer.hostname, app=core.app)
    delivery = message.delivery_info or {}
    hard, soft = headers.get("timelimit") or (None, None)
    core.app.send_task(
        name,
        args=[],
        kwargs=kwargs,
        task_id=headers.get("id"),
        headers={k: v for k, v in headers.items() if k in (SENT_AT_HEADER, STEP_KWARG)},
        exchange=delivery.get("exchange") or None,
        routing_key=delivery.get("routing_key"),
        serializer="json",
        soft_time_limit=soft,
        time_limit=hard,
    )
