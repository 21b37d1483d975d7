"""The app ``tests/test_hostile_input.py`` loads through ``--app tests.apps.hostile_app``.

Its URLs come from ``DURABLE_*`` (the test gives them, the database URL with a password in
its query string that no output may show) and its key prefix from ``HOSTILE_PREFIX``.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from durable import Durable

PREFIX = os.environ["HOSTILE_PREFIX"]

app = Celery("hostile_app", broker=os.environ["DURABLE_REDIS_URL"], set_as_current=False)
app.conf.broker_transport_options = {"global_keyprefix": f"{PREFIX}:"}
durable = Durable(app, key_prefix=PREFIX)


@durable.workflow("hostile.echo")
def echo(ctx: Any, *args: Any, **kwargs: Any) -> list[Any]:
    return [list(args), kwargs]


@durable.workflow("hostile.wait")
def wait(ctx: Any) -> Any:
    return ctx.wait_for_signal("go")
