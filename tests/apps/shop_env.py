"""The example shop's app (``config.celery_app``) pointed at the test services.

Its ``durable`` reads its settings once, on first use, so every test module that runs the
shop gets the same database; the broker's key prefix is this module's own, and the app's
producer pool is closed on the way in and out so that no connection made under another
prefix is reused.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

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
    app.close()
    try:
        yield durable
    finally:
        app.close()
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
        clean_keys(redis_url, prefix)
