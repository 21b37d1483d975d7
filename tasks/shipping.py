"""Shipping: handing the order to a carrier."""

from __future__ import annotations

from typing import Any

from config.celery_app import app
from tasks import store


@app.task
def ship(order: dict[str, Any]) -> str:
    """Book the shipment; returns the tracking number."""
    store.record_call("ship", order["id"])
    shipment = store.record_effect("ship", order["id"])
    return f"TRK{shipment:08d}"
