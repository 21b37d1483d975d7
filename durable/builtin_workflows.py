"""Workflows every ``Durable`` registers.

``durable.task`` lets a schedule (or a migrated ``beat_schedule`` entry) start any Celery task
by name, checkpointed and retried like any other step; ``durable.chain`` runs the links of a
:class:`durable.canvas.DurableChain`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from durable.canvas import CHAIN_WORKFLOW, run_chain

if TYPE_CHECKING:
    from durable.context import WorkflowContext
    from durable.core import Core

TASK_WORKFLOW = "durable.task"


def run_task(
    ctx: WorkflowContext,
    task: str,
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """Run the Celery task named ``task`` as the workflow's single step; return its result."""
    signature = ctx.app.signature(task, args=args or [], kwargs=kwargs or {}, **(options or {}))
    return ctx.step(signature)


def register(core: Core) -> None:
    """Register the built-in workflows on ``core``."""
    core.register_workflow(TASK_WORKFLOW, run_task, None)
    core.register_workflow(CHAIN_WORKFLOW, run_chain, None)
