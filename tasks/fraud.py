"""Fraud screening: the AI check an order passes before its card is charged.

The model here is a **stand-in**: a tiny logistic scorer with fixed, hand-set weights, local
and deterministic, so that the example runs without a model server or an API key. A real
shop calls its fraud model or vendor from the task body instead; the workflow sees only the
verdict, committed once as the step's result, so a replay never asks the model again and a
retried order is judged by the score it got the first time.
"""

from __future__ import annotations

import math
from typing import Any

from config.celery_app import app
from tasks import store

MODEL = "stand-in-logistic-v1"
"""Name of the scorer, recorded with every verdict."""

FRAUD_THRESHOLD = 0.8
"""Orders scoring this or more are refused."""

DISPOSABLE_DOMAINS = frozenset(
    {"mailinator.com", "guerrillamail.com", "10minutemail.com", "trashmail.com"}
)

_BIAS = -5.0
_WEIGHTS = {
    "disposable_email": 4.0,  # 1 when the address is a throwaway one
    "total": 1.2,  # the order's total in thousands of euros, counted up to 2
    "units": 0.8,  # the number of units, in tens
}


def features(order: dict[str, Any]) -> dict[str, float]:
    """The inputs of the scorer, from an order with its ``total_cents``."""
    domain = order["email"].rsplit("@", 1)[-1].lower()
    units = sum(int(item["qty"]) for item in order["items"])
    return {
        "disposable_email": 1.0 if domain in DISPOSABLE_DOMAINS else 0.0,
        "total": min(int(order["total_cents"]) / 100_000, 2.0),
        "units": units / 10,
    }


def score(order: dict[str, Any]) -> dict[str, Any]:
    """Score an order: its probability of fraud, the verdict, and what weighed most."""
    contributions = {name: _WEIGHTS[name] * value for name, value in features(order).items()}
    probability = 1 / (1 + math.exp(-(_BIAS + sum(contributions.values()))))
    reasons = sorted((name for name, c in contributions.items() if c >= 1.0), key=str)
    return {
        "score": round(probability, 3),
        "fraud": probability >= FRAUD_THRESHOLD,
        "reasons": reasons,
        "model": MODEL,
    }


@app.task
def check_fraud(order: dict[str, Any]) -> dict[str, Any]:
    """Screen the order (see :func:`score`); returns the verdict."""
    store.record_call("fraud_check", order["id"])
    verdict = score(order)
    store.record_effect("fraud_check", order["id"], detail=verdict)
    return verdict
