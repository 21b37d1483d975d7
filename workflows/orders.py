"""Order fulfilment, from the checkout to the end of the returns window.

One workflow run per order, ``orders.fulfill``, started with the order's id::

    durable.start("orders.fulfill", "o-1", workflow_id="order-o-1")

1. **Validate** the order and price it; screen it with the **fraud check** (an AI model;
   here a local stand-in, :mod:`tasks.fraud`); **reserve** its stock.
2. **Charge** the card. Fraud (the screening's verdict, or the issuer's decline as
   fraudulent) cancels the order at once and releases the stock. Any other decline e-mails
   the customer, who has 24 hours to send another card (signal ``payment_method``, payload
   ``{"card": "..."}``); the charge is then tried with it. No card in time cancels the order.
3. **Fulfil**: ask the warehouse to pick and pack it; its app answers with the signal
   ``fulfilled``. The clerk's app signals ``shipped`` (``{"carrier": ..., "tracking": ...}``)
   when a carrier takes the parcel, the driver's app ``delivered`` when it arrives.
4. **Returns**: the order stays open 30 days. A ``return`` signal (``{"skus": [...]}``, or
   ``{}`` for the whole order) refunds it and ends it as returned; otherwise it closes.

The order's status is published at every point as the event ``status``, read with
``durable.get_event("order-o-1", "status")`` or ``durable show order-o-1``: one of
:data:`STATUSES`. ``durable.cancel`` before the parcel has shipped refunds the charge and
releases the stock; after that, a cancel only ends the run (returns take the ``return``
signal).

Every step is committed before the next starts, and every task writes its side effect
under the step's idempotency key, so a worker dying anywhere resumes the order where it
stopped and no card is charged, or refunded, twice.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from config.celery_app import durable
from durable import RetryPolicy, SignalTimeout, StepFailed, WorkflowCancelled, WorkflowContext
from tasks.email import send_email
from tasks.fraud import check_fraud
from tasks.inventory import release, reserve
from tasks.orders import validate_order
from tasks.payments import charge_card, refund
from tasks.shipping import request_fulfilment

STATUSES = (
    "validating",
    "reserving",
    "charging",
    "awaiting_payment_method",
    "awaiting_fulfilment",
    "awaiting_shipment",
    "shipped",
    "delivered",
    "returned",
    "closed",
    "cancelled",
)
"""Every value of the ``status`` event, in the order an order can go through them."""

FINAL_STATUSES = ("returned", "closed", "cancelled")

PAYMENT_METHOD_WINDOW = timedelta(hours=24)
"""How long a customer whose card was declined has to send another one."""

RETURNS_WINDOW = timedelta(days=30)
"""How long after delivery an order can be returned."""

MAX_CARDS = 3
"""Cards tried for one order before it is cancelled."""

CHARGE_RETRY = RetryPolicy(max_attempts=5, initial_interval=1.0, backoff=2.0, max_interval=30.0)
"""Retries when the payment provider does not answer; a decline is an answer, not retried."""


def price(order: dict[str, Any]) -> dict[str, Any]:
    """The order with its total in cents (cheap: run as a local step)."""
    total = sum(int(item["qty"]) * int(item["price_cents"]) for item in order["items"])
    return {**order, "total_cents": total}


def refund_cents(order: dict[str, Any], returned: dict[str, Any]) -> int:
    """What a return is worth: the items whose SKUs it names, or the whole order."""
    skus = set(returned.get("skus") or ())
    items = [item for item in order["items"] if not skus or item["sku"] in skus]
    return sum(int(item["qty"]) * int(item["price_cents"]) for item in items)


@durable.workflow("orders.fulfill")
def fulfill(ctx: WorkflowContext, order_id: str) -> dict[str, Any]:
    """Take one order through its whole life; returns how it ended (``status``, money)."""
    ctx.set_event("status", "validating")
    order = ctx.step(validate_order, order_id)
    order = ctx.step(price, order, local=True)
    verdict = ctx.step(check_fraud, order)
    ctx.set_event("status", "reserving")
    ctx.step(reserve, order)
    if verdict["fraud"]:
        return cancel(ctx, order, f"fraud suspected (score {verdict['score']})")
    shipped = False
    try:
        order, payment = collect_payment(ctx, order)
        if not payment["paid"]:
            return cancel(ctx, order, payment["reason"])
        ctx.set_event("status", "awaiting_fulfilment")
        ctx.step(send_email, order, "order_confirmed", {"txn": payment["txn"]})
        ctx.step(request_fulfilment, order)
        ctx.wait_for_signal("fulfilled")
        ctx.set_event("status", "awaiting_shipment")
        parcel = ctx.wait_for_signal("shipped")
        shipped = True
        ctx.set_event("status", "shipped")
        ctx.step(send_email, order, "shipped", parcel)
        ctx.wait_for_signal("delivered")
    except WorkflowCancelled:
        if not shipped:
            cancel(ctx, order, "cancelled by request", charged=True)
        raise
    ctx.set_event("status", "delivered")
    ctx.step(send_email, order, "delivered", {"returns_days": RETURNS_WINDOW.days})
    outcome = {"order_id": order_id, "txn": payment["txn"], "charged_cents": order["total_cents"]}
    return {**outcome, **returns_window(ctx, order)}


def collect_payment(
    ctx: WorkflowContext, order: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Charge the order, asking for another card after a decline; returns (order, payment).

    The payment is the charge's answer, or ``{"paid": False, "reason": ...}`` when the order
    cannot be paid: fraud, no new card within the window, too many cards, no answer from the
    provider after every retry.
    """
    for _ in range(MAX_CARDS):
        ctx.set_event("status", "charging")
        try:
            charge = ctx.step(charge_card, order, retry=CHARGE_RETRY)
        except StepFailed as exc:
            return order, {"paid": False, "reason": f"payment provider failed: {exc.error}"}
        if charge["paid"] or charge["fraud"]:
            reason = "fraud: the card issuer declined the card as fraudulent"
            return order, charge if charge["paid"] else {"paid": False, "reason": reason}
        ctx.set_event("status", "awaiting_payment_method")
        ctx.step(send_email, order, "payment_declined", {"code": charge["decline_code"]})
        try:
            method = ctx.wait_for_signal("payment_method", timeout=PAYMENT_METHOD_WINDOW)
        except SignalTimeout:
            return order, {"paid": False, "reason": "no payment method within 24 hours"}
        order = {**order, "card": str(method["card"])}
    return order, {"paid": False, "reason": f"declined {MAX_CARDS} times"}


def returns_window(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    """Keep the delivered order open for returns; returns how it ended."""
    try:
        returned = ctx.wait_for_signal("return", timeout=RETURNS_WINDOW)
    except SignalTimeout:
        ctx.set_event("status", "closed")
        return {"status": "closed", "refunded_cents": 0}
    money = ctx.step(refund, order, refund_cents(order, returned))
    refunded = int(money["amount_cents"]) if money else 0
    ctx.step(send_email, order, "refunded", {"amount_cents": refunded})
    ctx.set_event("status", "returned")
    return {"status": "returned", "refunded_cents": refunded}


def cancel(
    ctx: WorkflowContext, order: dict[str, Any], reason: str, charged: bool = False
) -> dict[str, Any]:
    """Undo what was done for the order and tell the customer; returns the outcome.

    ``charged``: the card may have been charged, so refund whatever it was (the payment
    provider knows; nothing is refunded twice).
    """
    money = ctx.step(refund, order) if charged else None
    ctx.step(release, order)
    ctx.step(send_email, order, "cancelled", {"reason": reason})
    ctx.set_event("status", "cancelled")
    refunded = int(money["amount_cents"]) if money else 0
    return {
        "order_id": order["id"],
        "status": "cancelled",
        "reason": reason,
        "refunded_cents": refunded,
    }
