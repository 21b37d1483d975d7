"""The example shop's Celery app, configured from the environment.

Environment:

- ``CELERY_BROKER_URL``: the broker (default: ``DURABLE_REDIS_URL``, the Redis that durable
  also keeps its timer index in);
- ``DURABLE_DATABASE_URL``, ``DURABLE_REDIS_URL``, ``DURABLE_KEY_PREFIX``: read by durable;
- ``CELERY_KEY_PREFIX``: a prefix for every Redis key of the broker (queues, unacked
  messages), so that a demo or a test can share a Redis server without seeing other queues.

Run a worker with ``celery -A config.celery_app worker`` and the timer service with
``durable beat --app config.celery_app:app``.
"""

from __future__ import annotations

import os

from celery import Celery

from durable import Durable

TASK_MODULES = [
    "tasks.orders",
    "tasks.payments",
    "tasks.inventory",
    "tasks.shipping",
    "tasks.email",
    "workflows.orders",
]


def broker_transport_options() -> dict[str, str]:
    """Options of the broker transport: the key prefix, when one is set."""
    prefix = os.environ.get("CELERY_KEY_PREFIX")
    return {"global_keyprefix": prefix} if prefix else {}


app = Celery("shop", include=TASK_MODULES)
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL") or os.environ.get("DURABLE_REDIS_URL"),
    broker_transport_options=broker_transport_options(),
    broker_connection_retry_on_startup=True,
    # A step whose worker dies must be delivered again, and a worker must not hold on to
    # messages another one could run.
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    # Step results are committed by durable in PostgreSQL; Celery's result backend is unused.
    task_ignore_result=True,
)

durable = Durable(app)
