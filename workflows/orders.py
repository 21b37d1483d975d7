"""Order fulfilment: validate, reserve, charge, ship, confirm.

Each step is committed before the next one starts, so a worker dying anywhere resumes the
order where it stopped; a declined card releases the reserved stock and ends the order as
failed instead of leaving it half done.
"""

from __future__ import annotations

from typing import Any

from config.celery_app import durable
from durable import RetryPolicy, StepFailed, WorkflowContext
from tasks.email import send_confirmation
from tasks.inventory import release, reserve
from tasks.orders import validate_order
from tasks.payments import CardDeclined, charge_card
from tasks.shipping import ship

CHARGE_RETRY = RetryPolicy(
    max_attempts=3,
    initial_interval=1.0,
    backoff=2.0,
    max_interval=10.0,
    non_retryable=(CardDeclined,),
)


def price(order: dict[str, Any]) -> dict[str, Any]:
    """The order with its total in cents (cheap: run as a local step)."""
    total = sum(int(item["qty"]) * int(item["price_cents"]) for item in order["items"])
    return {**order, "total_cents": total}


@durable.workflow("orders.fulfill")
def fulfill(ctx: WorkflowContext, order_id: str) -> dict[str, Any]:
    """Fulfil one order; returns its outcome (``status`` is ``fulfilled`` or ``failed``)."""
    order = ctx.step(validate_order, order_id)
    order = ctx.step(price, order, local=True)
    reservation = ctx.step(reserve, order)
    try:
        txn = ctx.step(charge_card, order, retry=CHARGE_RETRY)
    except StepFailed as exc:
        ctx.step(release, order)
        return {"order_id": order_id, "status": "failed", "reason": exc.error}
    tracking = ctx.step(ship, order)
    ctx.step(send_confirmation, {**order, "txn": txn, "tracking": tracking})
    return {
        "order_id": order_id,
        "status": "fulfilled",
        "total_cents": order["total_cents"],
        "reservation": reservation,
        "txn": txn,
        "tracking": tracking,
    }
