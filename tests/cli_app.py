"""A small Celery app for the CLI tests; its URLs and key prefix come from the environment."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from durable import Durable

PREFIX = os.environ["CLI_APP_PREFIX"]

app = Celery("cli_app", broker=os.environ["CLI_APP_BROKER_URL"], set_as_current=False)
app.conf.broker_transport_options = {"global_keyprefix": f"{PREFIX}:"}
durable = Durable(
    app,
    database_url=os.environ["CLI_APP_DATABASE_URL"],
    redis_url=os.environ["CLI_APP_REDIS_URL"],
    key_prefix=PREFIX,
)


@durable.workflow("cli.greet")
def greet(ctx: Any, name: str, punctuation: str = "!") -> str:
    return f"hello {name}{punctuation}"
