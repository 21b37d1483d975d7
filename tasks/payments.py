"""Payments: charging the customer's card, once, whatever crashes in between.

The charge is deduplicated by the step's idempotency key, as a payment API given an
``Idempotency-Key`` header would: a step re-run after its worker died mid-charge gets the
original transaction back instead of charging the card a second time.
"""

from __future__ import annotations

import os
import time
from typing import Any

from config.celery_app import app
from tasks import store

DECLINED_CARD = "declined"


class CardDeclined(Exception):
    """The card issuer refused the charge; retrying will not help."""


def charge_delay() -> float:
    """Seconds the payment provider takes to answer (``SHOP_CHARGE_DELAY``, default 0)."""
    return float(os.environ.get("SHOP_CHARGE_DELAY") or 0)


@app.task
def charge_card(order: dict[str, Any]) -> str:
    """Charge the order's total to its card; returns the transaction id."""
    store.record_call("charge", order["id"])
    if order["card"] == DECLINED_CARD:
        raise CardDeclined(f"card declined for order {order['id']}")
    txn = store.record_effect("charge", order["id"])
    # The provider has taken the charge but not answered yet: a worker killed now leaves a
    # committed charge and an unfinished step, which runs again with the same key.
    time.sleep(charge_delay())
    return f"txn_{txn:06d}"
