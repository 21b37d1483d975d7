"""Shipping: asking the warehouse to pick, pack and hand the order to a carrier.

The warehouse answers later, on its own: its app signals the order ``fulfilled`` when the
parcel is packed, the clerk's app signals ``shipped`` when a carrier took it, and the
driver's app signals ``delivered`` (see :mod:`workflows.orders`).
"""

from __future__ import annotations

from typing import Any

from config.celery_app import app
from tasks import store


@app.task
def request_fulfilment(order: dict[str, Any]) -> str:
    """Put the order on the warehouse's pick list; returns the request's id."""
    store.record_call("fulfilment", order["id"])
    request = store.record_effect("fulfilment", order["id"])
    return f"WH-{request:06d}"
