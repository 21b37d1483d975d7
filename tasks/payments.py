"""Payments: charging the customer's card, once, whatever crashes in between.

The charge is deduplicated by the step's idempotency key, as a payment API given an
``Idempotency-Key`` header would: a step re-run after its worker died mid-charge gets the
original transaction back instead of charging the card a second time.

The payment provider is simulated with test card numbers, as card networks' sandboxes do:

========================  ====================================================================
``4242424242424242``      charged
``4000000000009995``      declined: insufficient funds (the customer may try another card)
``4100000000000019``      declined as fraudulent by the issuer
``4000000000000119``      the provider fails with a processing error on the first attempt,
                          then charges (a transient failure, for the retry policy)
any other number          declined: card not supported
========================  ====================================================================

A decline is the provider's answer, not an error: :func:`charge_card` returns it, and the
workflow decides what to do. Only a failure to get an answer raises (:class:`GatewayError`),
which the step's retry policy retries.
"""

from __future__ import annotations

import os
import time
from typing import Any

from config.celery_app import app
from durable import current_step
from tasks import store

GOOD_CARD = "4242424242424242"
INSUFFICIENT_FUNDS_CARD = "4000000000009995"
FRAUDULENT_CARD = "4100000000000019"
FLAKY_CARD = "4000000000000119"

_DECLINES = {INSUFFICIENT_FUNDS_CARD: "insufficient_funds", FRAUDULENT_CARD: "fraudulent"}


class GatewayError(Exception):
    """The payment provider did not answer; trying again may work."""


def charge_delay() -> float:
    """Seconds the payment provider takes to answer (``SHOP_CHARGE_DELAY``, default 0)."""
    return float(os.environ.get("SHOP_CHARGE_DELAY") or 0)


def _decline_code(card: str) -> str | None:
    if card in (GOOD_CARD, FLAKY_CARD):
        return None
    return _DECLINES.get(card, "card_not_supported")


@app.task
def charge_card(order: dict[str, Any]) -> dict[str, Any]:
    """Charge the order's total to its card.

    Returns ``{"paid": True, "txn": ..., "amount_cents": ...}``, or for a decline
    ``{"paid": False, "decline_code": ..., "fraud": ...}``.
    """
    store.record_call("charge", order["id"])
    if order["card"] == FLAKY_CARD and current_step().attempt <= 1:
        raise GatewayError("payment provider: processing error, try again")
    code = _decline_code(order["card"])
    if code is not None:
        return {"paid": False, "decline_code": code, "fraud": code == "fraudulent"}
    amount = int(order["total_cents"])
    txn = store.record_effect("charge", order["id"], amount, {"card": order["card"][-4:]})
    # The provider has taken the charge but not answered yet: a worker killed now leaves a
    # committed charge and an unfinished step, which runs again with the same key.
    time.sleep(charge_delay())
    return {"paid": True, "txn": f"txn_{txn:06d}", "amount_cents": amount}


@app.task
def refund(order: dict[str, Any], amount_cents: int | None = None) -> dict[str, Any] | None:
    """Refund ``amount_cents`` of what the order was charged (default: all of it).

    Never refunds more than was charged and not refunded yet; returns ``None`` when there is
    nothing to refund (the order was never charged, or was refunded already).
    """
    store.record_call("refund", order["id"])
    done = store.find_effect("refund")
    if done is not None:  # a re-run of a refund that went through: the same answer
        return {"refund": f"re_{done[0]:06d}", "amount_cents": done[1]}
    refundable = store.effect_total(order["id"], "charge") - store.effect_total(
        order["id"], "refund"
    )
    amount = refundable if amount_cents is None else min(int(amount_cents), refundable)
    if amount <= 0:
        return None
    refund_id = store.record_effect("refund", order["id"], amount)
    return {"refund": f"re_{refund_id:06d}", "amount_cents": amount}
