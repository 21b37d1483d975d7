"""Inventory: holding stock for an order, and letting it go again."""

from __future__ import annotations

from typing import Any

from config.celery_app import app
from tasks import store


@app.task
def reserve(order: dict[str, Any]) -> str:
    """Reserve the order's items; returns the reservation id."""
    store.record_call("reserve", order["id"])
    reservation = store.record_effect("reserve", order["id"])
    return f"res_{reservation:06d}"


@app.task
def release(order: dict[str, Any]) -> str:
    """Release the order's reservation (compensation when the charge failed)."""
    store.record_call("release", order["id"])
    released = store.record_effect("release", order["id"])
    return f"rel_{released:06d}"
