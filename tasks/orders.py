"""Order intake: checking that an order can be fulfilled."""

from __future__ import annotations

from typing import Any

from config.celery_app import app
from tasks import store


class InvalidOrder(ValueError):
    """The order does not exist or cannot be fulfilled as placed."""


@app.task
def validate_order(order_id: str) -> dict[str, Any]:
    """Load the order and check it; returns it as a dict (id, email, items, card)."""
    store.record_call("validate", order_id)
    order = store.get_order(order_id)
    if order is None:
        raise InvalidOrder(f"no order {order_id!r}")
    if not order["items"]:
        raise InvalidOrder(f"order {order_id!r} has no items")
    for item in order["items"]:
        if int(item["qty"]) < 1 or int(item["price_cents"]) < 0:
            raise InvalidOrder(f"order {order_id!r} has a malformed item {item!r}")
    store.record_effect("validate", order_id)
    return order
