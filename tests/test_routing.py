"""Steps travel as the user's task would: same queue, a legible name for Flower."""

from __future__ import annotations

import json
import re
from typing import Any

import redis
from celery import Celery

from durable import Durable
from durable.activation import activate


def _messages(redis_url: str, key: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(redis_url)
    return [json.loads(raw) for raw in client.lrange(key, 0, -1)]


def test_steps_follow_the_tasks_routing(
    app: Celery, durable: Durable, redis_url: str, prefix: str
) -> None:
    app.conf.task_routes = {"t.routed_by_config": {"queue": "shipping"}}

    @app.task(name="t.routed_by_attribute", queue="payments", shared=False)
    def charge() -> str:
        return "charged"

    @app.task(name="t.routed_by_config", shared=False)
    def ship() -> str:
        return "shipped"

    @durable.workflow("wf.routed")
    def wf(ctx: Any) -> None:
        ctx.step(charge)
        ctx.step(ship)
        ctx.step(ship.s().set(queue="priority"))

    durable.start("wf.routed", workflow_id="routed-1")  # no worker: messages stay queued
    assert activate(durable, "routed-1") == "suspended"
    (payment,) = _messages(redis_url, f"{prefix}:payments")
    assert payment["headers"]["task"] == "durable.step"
    assert payment["headers"]["shadow"] == "t.routed_by_attribute[routed-1#1]"
    assert payment["headers"]["argsrepr"] == "('routed-1', 1)"
    assert re.fullmatch(r"routed-1:1:[0-9a-f]{8}", payment["headers"]["id"])

    # Settle step 1 by hand (no worker runs here) and let the workflow move on.
    from durable.worker import execute_step

    assert execute_step(durable, "routed-1", 1) == "completed"
    (shipping,) = _messages(redis_url, f"{prefix}:shipping")
    assert shipping["headers"]["shadow"] == "t.routed_by_config[routed-1#2]"
    assert execute_step(durable, "routed-1", 2) == "completed"
    (priority,) = _messages(redis_url, f"{prefix}:priority")
    assert priority["headers"]["shadow"] == "t.routed_by_config[routed-1#3]"


def test_task_ids_are_legible_and_safe_in_links() -> None:
    from durable.runtime import task_id

    first, second = task_id("order-o-1", "3"), task_id("order-o-1", "3")
    assert first.startswith("order-o-1:3:") and first != second  # one id per message
    assert task_id("a b#c?d%e/7", "activation").startswith("a_b_c_d_e/7:activation:")
