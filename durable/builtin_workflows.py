"""Workflows every ``Durable`` registers.

``durable.task`` lets a schedule (or a migrated ``beat_schedule`` entry) start any Celery task
by name, as the run's one step: checkpointed, and retried by the task's own retry options
(``autoretry_for``, ``max_retries``, ``retry_backoff``, ``self.retry``) as durable timers,
like a step given no policy. Of the call's options, routing (``queue``, ``routing_key``,
``exchange``, ``priority``) goes with the step's message, and three are honoured the way a
schedule means them, from the fire time (the run's id ``<schedule>@<fire time>``; the run's
start for a run started by hand):

- ``countdown`` (seconds) or ``eta`` (a moment): a durable sleep before the step;
- ``expires`` (seconds, or a moment; else the task's own ``expires``): a step not started
  by then is not run, and the run fails with :class:`~durable.errors.TaskExpired`;
- ``durable_retry`` (a :class:`~durable.retry.RetryPolicy`'s ``to_dict()``): the step's
  policy, which then wins over the task's own retry options.

``durable.chain`` runs the links of a :class:`durable.canvas.DurableChain`.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from durable.cadence import parse_fire_id
from durable.canvas import CHAIN_WORKFLOW, run_chain
from durable.dispatch import expiry
from durable.errors import TaskExpired
from durable.retry import RetryPolicy

if TYPE_CHECKING:
    from durable.context import WorkflowContext
    from durable.core import Core

TASK_WORKFLOW = "durable.task"

RETRY_OPTION = "durable_retry"
"""The option of a ``durable.task`` call that holds a retry policy (``RetryPolicy.to_dict()``);
Celery's own ``retry`` and ``retry_policy`` are about publishing, not the task."""


def run_task(
    ctx: WorkflowContext,
    task: str,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """Run the Celery task named ``task`` as the workflow's single step; return its result."""
    options = dict(options or {})
    fire = parse_fire_id(ctx.workflow_id)
    fired = fire[1] if fire else ctx.now()
    start = _start_at(fired, options.pop("countdown", None), options.pop("eta", None))
    expires = options.pop("expires", None)
    if expires is None:
        expires = getattr(ctx.app.tasks.get(task), "expires", None)
    deadline = expiry(expires, fired)
    if start is not None and (start - ctx.now()).total_seconds() > 0:
        ctx.sleep(start - ctx.now())
    if deadline is not None:
        at = datetime.fromtimestamp(deadline, UTC)
        if ctx.now() >= at:
            raise TaskExpired(task, at)
        options["expires"] = at  # a message still queued then is revoked (stepmessage)
    policy = options.pop(RETRY_OPTION, None)
    retry = RetryPolicy.from_dict(policy) if policy else None
    signature = ctx.app.signature(task, args=args or [], kwargs=kwargs or {}, **options)
    return ctx.step(signature, retry=retry)


def _start_at(fired: datetime, countdown: Any, eta: Any) -> datetime | None:
    """When the step may start: ``eta``, or ``countdown`` seconds after the fire."""
    if eta is not None:
        when = datetime.fromisoformat(eta.replace("Z", "+00:00")) if isinstance(eta, str) else eta
        if not isinstance(when, datetime):
            raise ValueError(f"eta must be a datetime, not {eta!r}")
        return when if when.tzinfo else when.replace(tzinfo=UTC)
    if countdown is not None:
        return fired + timedelta(seconds=float(countdown))
    return None


def register(core: Core) -> None:
    """Register the built-in workflows on ``core``."""
    core.register_workflow(TASK_WORKFLOW, run_task, None)
    core.register_workflow(CHAIN_WORKFLOW, run_chain, None)
