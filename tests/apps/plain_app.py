"""A worker of an app without ``Durable(app)`` (``celery -A tests.apps.plain_app``).

It has a task of the same name as a durable test's step, and counts each run of its body in
Redis under the test's key prefix (``PLAIN_PREFIX``), so a test can show the body never ran.
"""

from __future__ import annotations

import os

import redis
from celery import Celery

prefix = os.environ.get("PLAIN_PREFIX", "plain")
app = Celery("plain", broker=os.environ["DURABLE_REDIS_URL"], set_as_current=False)
app.conf.broker_transport_options = {"global_keyprefix": f"{prefix}:"}
app.conf.task_default_queue = "plain"  # its worker consumes this queue only
app.conf.broker_connection_retry_on_startup = True
client = redis.Redis.from_url(os.environ["DURABLE_REDIS_URL"])


@app.task(name="m.plain", shared=False)
def plain(x: int) -> int:
    client.incr(f"{prefix}:count:plain-body")
    return x
