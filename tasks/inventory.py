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
def release(order: dict[str, Any]) -> str | None:
    """Release the stock the order holds (a compensation); ``None`` if it holds none."""
    store.record_call("release", order["id"])
    done = store.find_effect("release")
    if done is None:
        held = store.effect_count(order["id"], "reserve") - store.effect_count(
            order["id"], "release"
        )
        if held <= 0:
            return None
        done = (store.record_effect("release", order["id"]), None)
    return f"rel_{done[0]:06d}"
