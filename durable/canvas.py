"""``durable.chain``: an existing Celery chain made durable by changing its constructor.

Example::

    # before: chain(validate_order.s("o-1"), reserve.s(), charge_card.s())()
    run = durable.chain(validate_order.s("o-1"), reserve.s(), charge_card.s()).start(
        workflow_id="c-1"
    )

Each link is a step of the built-in workflow ``durable.chain``: checkpointed, so a crash
mid-chain never re-runs a committed link. Results pass as Celery passes them: a link's
result is prepended to the next link's arguments, unless that signature is immutable
(``.si()``). Routing options on a signature (``queue``, ``routing_key``, ``exchange``,
``priority``) are honoured.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from celery.canvas import Signature

from durable.context import ROUTING_OPTIONS, WorkflowContext

if TYPE_CHECKING:
    from durable.runtime import Durable, WorkflowRun

CHAIN_WORKFLOW = "durable.chain"


def describe_link(signature: Signature[Any]) -> dict[str, Any]:
    """A signature as plain data, as stored in the chain run's arguments."""
    if not isinstance(signature, Signature):
        raise TypeError(f"durable.chain takes Celery signatures (task.s(...)), got {signature!r}")
    return {
        "task": str(signature.task),
        "args": list(signature.args),
        "kwargs": dict(signature.kwargs),
        "options": {k: v for k, v in signature.options.items() if k in ROUTING_OPTIONS},
        "immutable": bool(signature.immutable),
    }


class DurableChain:
    """A chain of signatures to start as one durable workflow run."""

    def __init__(self, durable: Durable, signatures: tuple[Signature[Any], ...]) -> None:
        if not signatures:
            raise ValueError("durable.chain needs at least one signature")
        self._durable = durable
        self.links = [describe_link(s) for s in signatures]

    def start(self, workflow_id: str | None = None) -> WorkflowRun:
        """Start the chain (idempotent by ``workflow_id``); returns its run."""
        return self._durable.start(CHAIN_WORKFLOW, self.links, workflow_id=workflow_id)

    def apply_async(self, workflow_id: str | None = None) -> WorkflowRun:
        """Celery's name for :meth:`start`."""
        return self.start(workflow_id=workflow_id)

    def delay(self) -> WorkflowRun:
        """Celery's name for :meth:`start` with a generated id."""
        return self.start()


def run_chain(ctx: WorkflowContext, links: list[dict[str, Any]]) -> Any:
    """The body of ``durable.chain``: each link one step, results passed along."""
    result: Any = None
    for index, link in enumerate(links):
        args = list(link["args"])
        if index > 0 and not link.get("immutable"):
            args = [result, *args]
        signature = ctx.app.signature(
            link["task"], args=args, kwargs=link.get("kwargs") or {}, **(link.get("options") or {})
        )
        result = ctx.step(signature)
    return result
