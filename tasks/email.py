"""Email: telling the customer."""

from __future__ import annotations

from typing import Any

from config.celery_app import app
from tasks import store


@app.task
def send_confirmation(order: dict[str, Any]) -> str:
    """Send the order confirmation; returns the message id."""
    store.record_call("email", order["id"])
    message = store.record_effect("email", order["id"])
    return f"<msg-{message}@shop.example>"
