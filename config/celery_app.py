"""The example shop's Celery app, configured from the environment.

Environment:

- ``CELERY_BROKER_URL``: the broker, Redis (``redis://``) or RabbitMQ (``amqp://``); by
  default ``DURABLE_REDIS_URL``, the Redis that durable also keeps its timer index in. On
  RabbitMQ durable still needs a Redis for that index: set ``DURABLE_REDIS_URL`` too;
- ``DURABLE_DATABASE_URL``, ``DURABLE_REDIS_URL``, ``DURABLE_KEY_PREFIX``: read by durable;
- ``CELERY_KEY_PREFIX``: on Redis, a prefix for every key of the broker (queues, unacked
  messages), so that a demo or a test can share a Redis server without seeing other queues;
- ``CELERY_DEFAULT_QUEUE``: the queue everything is sent to (default ``celery``); on
  RabbitMQ, a queue of its own keeps a demo or a test apart from other consumers.

Run a worker with ``celery -A config.celery_app worker`` and the timer service with
``durable beat --app config.celery_app:app``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from durable import Durable

TASK_MODULES = [
    "tasks.orders",
    "tasks.fraud",
    "tasks.payments",
    "tasks.inventory",
    "tasks.shipping",
    "tasks.email",
    "tasks.ai",
    "tasks.reports",
    "workflows.orders",
    "workflows.ai_pipeline",
    "workflows.nightly",
]


def broker_url() -> str | None:
    """The broker's URL: ``CELERY_BROKER_URL``, else ``DURABLE_REDIS_URL``."""
    return os.environ.get("CELERY_BROKER_URL") or os.environ.get("DURABLE_REDIS_URL")


def broker_transport_options() -> dict[str, str]:
    """Options of the broker transport: on Redis, the key prefix, when one is set."""
    prefix = os.environ.get("CELERY_KEY_PREFIX")
    url = broker_url() or ""
    return {"global_keyprefix": prefix} if prefix and url.startswith("redis") else {}


def broker_settings() -> dict[str, Any]:
    """The settings read from the environment (applied again by whoever changes it)."""
    return {
        "broker_url": broker_url(),
        "broker_transport_options": broker_transport_options(),
        "task_default_queue": os.environ.get("CELERY_DEFAULT_QUEUE") or "celery",
    }


app = Celery("shop", include=TASK_MODULES)
app.conf.update(
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
    **broker_settings(),
)

durable = Durable(app)
