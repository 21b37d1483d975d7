"""Email: telling the customer."""

from __future__ import annotations

from typing import Any

from config.celery_app import app
from tasks import store

TEMPLATES = (
    "order_confirmed",
    "payment_declined",
    "shipped",
    "delivered",
    "refunded",
    "cancelled",
)


@app.task
def send_email(order: dict[str, Any], template: str, data: dict[str, Any] | None = None) -> str:
    """Send the customer the e-mail ``template`` about the order; returns the message id."""
    if template not in TEMPLATES:
        raise ValueError(f"no e-mail template {template!r}")
    store.record_call("email", order["id"])
    detail = {"template": template, "to": order["email"], **(data or {})}
    message = store.record_effect("email", order["id"], detail=detail)
    return f"<msg-{message}@shop.example>"
