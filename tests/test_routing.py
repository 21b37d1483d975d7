"""Steps travel as the user's task would: its own name, same queue; no value in a message."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

import redis
from celery import Celery
from sqlalchemy import text

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
    assert payment["headers"]["task"] == "t.routed_by_attribute"
    assert payment["headers"]["shadow"] is None
    assert payment["headers"]["kwargsrepr"] == "{'durable_step': 'routed-1#1'}"
    args, kwargs, _ = json.loads(base64.b64decode(payment["body"]))
    assert (args, kwargs) == ([], {"durable_step": "routed-1#1"})  # the arguments are stored
    assert re.fullmatch(r"routed-1:1:[0-9a-f]{8}", payment["headers"]["id"])

    # Settle step 1 by hand (no worker runs here) and let the workflow move on.
    from durable.runner import execute_step

    assert execute_step(durable, "routed-1", 1) == "completed"
    (shipping,) = _messages(redis_url, f"{prefix}:shipping")
    assert shipping["headers"]["task"] == "t.routed_by_config"
    assert execute_step(durable, "routed-1", 2) == "completed"
    (priority,) = _messages(redis_url, f"{prefix}:priority")
    assert priority["headers"]["task"] == "t.routed_by_config"
    assert priority["headers"]["kwargsrepr"] == "{'durable_step': 'routed-1#3'}"


def test_task_ids_are_legible_and_safe_in_links() -> None:
    from durable.dispatch import task_id

    first, second = task_id("order-o-1", "3"), task_id("order-o-1", "3")
    assert first.startswith("order-o-1:3:") and first != second  # one id per message
    assert task_id("a b#c?d%e/7", "activation").startswith("a_b_c_d_e/7:activation:")


def test_activations_are_labelled_with_the_workflow_name(
    app: Celery, durable: Durable, redis_url: str, prefix: str, database_url: str
) -> None:
    """Whatever sends an activation (a signal, a timer, a cancel, the sweep) names the run."""
    from durable.store import recovery
    from durable.store import timers as timer_queries
    from tests.conftest import query

    @durable.workflow("wf.labelled")
    def wf(ctx: Any) -> None:
        ctx.sleep(0.01)
        ctx.wait_for_signal("go")

    def labels() -> list[tuple[str, str, str]]:
        messages = [m["headers"] for m in _messages(redis_url, f"{prefix}:celery")]
        return [(h["task"], h["argsrepr"], h["kwargsrepr"]) for h in messages]

    durable.start("wf.labelled", workflow_id="label-1")  # no worker: messages stay queued
    assert activate(durable, "label-1") == "suspended"  # at the sleep
    (timer_id,) = [r.id for r in query(database_url, "SELECT id FROM durable_timers")]
    with durable.connect() as conn:
        (fired,) = timer_queries.fire_timers(conn, [timer_id])
    assert fired.workflow_name == "wf.labelled"
    durable.after_timer(fired)
    assert activate(durable, "label-1") == "suspended"  # at the signal wait
    durable.signal("label-1", "noise", 1)
    durable.cancel("label-1")
    with durable.connect() as conn:
        conn.execute(text("UPDATE durable_workflows SET woken_at = now() - interval '1 hour'"))
        owed = recovery.owed_activations(conn, after=60)
    assert owed == [("label-1", "wf.labelled")]
    # One task name for every activation; the run's id and workflow name in its columns.
    activation = ("durable.activate", "['label-1']", "{'workflow': 'wf.labelled'}")
    assert labels() == [activation] * 4  # start, timer, signal, cancel
