"""The example shop's app (``config.celery_app``) pointed at the test services.

Its ``durable`` reads its settings once, on first use, so every test module that runs the
shop gets the same database. The broker's key prefix is each module's own: the app's cached
broker pools are dropped on the way in and out, as Celery drops them after a fork, so that
messages are not sent through a connection made under another module's prefix.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from celery import Celery

from durable import Durable
from tests.conftest import clean_keys

ENVIRONMENT = (
    "DURABLE_DATABASE_URL",
    "DURABLE_REDIS_URL",
    "DURABLE_KEY_PREFIX",
    "CELERY_BROKER_URL",
    "CELERY_KEY_PREFIX",
    "SHOP_DATABASE_URL",
    "SHOP_EMBEDDER",
    "SHOP_LLM_CLIENT",
)


@contextmanager
def shop_app(database_url: str, redis_url: str) -> Iterator[Durable]:
    """The shop's ``durable`` on the test database and Redis, its environment restored after."""
    prefix = f"shop{uuid.uuid4().hex[:8]}"
    saved = {name: os.environ.pop(name, None) for name in ENVIRONMENT}
    os.environ.update(
        DURABLE_DATABASE_URL=database_url,
        DURABLE_REDIS_URL=redis_url,
        DURABLE_KEY_PREFIX=prefix,
        CELERY_BROKER_URL=redis_url,
        CELERY_KEY_PREFIX=f"{prefix}:",
    )
    from config.celery_app import app, durable

    app.conf.broker_url = redis_url
    app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:"}
    forget_connections(app)
    try:
        yield durable
    finally:
        forget_connections(app)
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
        clean_keys(redis_url, prefix)


def forget_connections(app: Celery) -> None:
    """Drop the broker connection and producer pools the app keeps once it has sent."""
    app._pool = None
    app.amqp._producer_pool = None
