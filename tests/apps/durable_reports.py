"""Nightly regional reports: fetch each part of a region, render them, post to a webhook.

tests/apps/celery_reports.py is a plain Celery module; tests/apps/durable_reports.py is the
same module migrated to durable (docs/migrating.md, section h). Their flaky services are
simulated with counters in the broker's Redis. Both modules load into one test process, so
their tasks are ``shared=False``: each app keeps its own ``reports.*`` callables.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, group
from celery.schedules import crontab

from durable import Durable

app = Celery(
    "reports",
    broker=os.environ["REPORTS_BROKER_URL"],
    backend=os.environ["REPORTS_BROKER_URL"],
    set_as_current=False,
)
app.conf.task_acks_late = True
app.conf.beat_schedule = {
    "nightly-eu": {
        "task": "reports.build",
        "schedule": crontab(hour=3, minute=0),
        "args": ("eu",),
        "options": {"expires": 3600},
    },
}
durable = Durable(app)
services = redis.Redis.from_url(os.environ["REPORTS_BROKER_URL"], decode_responses=True)


class RendererBusy(Exception):
    pass


class WebhookBusy(Exception):
    pass


@app.task(name="reports.fetch", rate_limit="120/m", shared=False)
def fetch(part: str) -> dict[str, Any]:
    services.rpush("reports:fetched", f"{time.monotonic()}")
    return {"part": part, "sales": 100 * len(part)}


@app.task(
    name="reports.render",
    shared=False,
    bind=True,
    autoretry_for=(RendererBusy,),
    max_retries=3,
    default_retry_delay=0.2,
)
def render(self: Any, parts: list[dict[str, Any]]) -> str:
    services.rpush("reports:render-retries", self.request.retries)
    if services.incr("reports:render-calls") <= 2:
        raise RendererBusy("the renderer is busy")
    return ", ".join(f"{p['part']}={p['sales']}" for p in parts)


@app.task(name="reports.post", bind=True, max_retries=2, shared=False)
def post(self: Any, report: str, url: str) -> str:
    if services.incr("reports:post-calls") == 1:
        raise self.retry(exc=WebhookBusy("the webhook is busy"), countdown=0.5)
    return f"posted {report} to {url}"


def nightly(region: str) -> Any:
    parts = [f"{region}-{n}" for n in (1, 2, 3)]
    return durable.chain(
        group(fetch.s(part) for part in parts),
        render.s(),
        post.s("https://hooks.example/reports"),
    )


@app.task(name="reports.build", shared=False)
def build(region: str) -> str:
    return str(nightly(region).apply_async().id)
