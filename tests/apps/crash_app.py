"""The app that crash tests run in real worker processes (``celery -A tests.apps.crash_app``).

Every task records each run of its body in Redis under the test's key prefix, so a test can
count runs and read the idempotency keys they saw.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import task_postrun

from durable import Durable, StepFailed, current_step


def build(
    database_url: str, redis_url: str, prefix: str, **settings: Any
) -> tuple[Celery, Durable]:
    """The app, its tasks and workflows, all keyed under ``prefix``; ``settings`` to Durable."""
    app = Celery(f"crash-{prefix}", broker=redis_url, set_as_current=False)
    app.conf.broker_transport_options = {
        "global_keyprefix": f"{prefix}:",
        # Redis's default: a killed worker's message comes back after an hour, long after
        # durable ran its step again. Tests age it in the broker's index instead of waiting.
        "visibility_timeout": 3600,
        # Sweep for abandoned messages every second, so a test sees the late redelivery.
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
    app.conf.task_acks_late = True
    app.conf.worker_prefetch_multiplier = 1
    app.conf.broker_connection_retry_on_startup = True
    durable = Durable(
        app, database_url=database_url, redis_url=redis_url, key_prefix=prefix, **settings
    )
    # Reads block up to 120 s (gated_local): past redis-py's default socket timeout (5 s).
    client = redis.Redis.from_url(redis_url, decode_responses=True, socket_timeout=150)

    def note_redelivery(
        task: Any = None, args: Any = None, kwargs: Any = None, retval: Any = None, **_: Any
    ) -> None:
        """Log what a message the broker redelivered did (``ignored``: nothing): a step's
        message (the task's own, labelled ``durable_step``) or an activation's."""
        if task is None or task.app is not app:
            return
        label = (kwargs or {}).get("durable_step")
        if label is None and task.name != "durable.activate":
            return
        if (task.request.delivery_info or {}).get("redelivered"):
            what = label or ":".join(map(str, args))
            client.rpush(f"{prefix}:redelivered", f"{task.name} {what} {retval}")

    task_postrun.connect(note_redelivery, weak=False)

    def record(kind: str) -> int:
        key = current_step().idempotency_key
        client.rpush(f"{prefix}:keys:{kind}", str(key))
        return int(client.incr(f"{prefix}:count:{kind}"))

    @app.task(name="crash.slow", shared=False)
    def slow(seconds: float) -> str:
        """Runs long the first time, so that a test can kill its worker meanwhile."""
        n = record("slow")
        time.sleep(seconds if n == 1 else 0.1)
        client.incr(f"{prefix}:count:slow-done")
        return f"done on run {n}"

    @app.task(name="crash.after", shared=False)
    def after() -> str:
        record("after")
        return "after"

    def hold(ctx: Any, held: bool) -> None:
        """With ``held``, keep the run going until signal ``go``: a message redelivered
        meanwhile finds the run still running and only its own step's status to go by."""
        if held:
            ctx.wait_for_signal("go")

    @durable.workflow("crash.step")
    def step_workflow(ctx: Any, seconds: float, held: bool = False) -> list[str]:
        first = ctx.step(slow, seconds)
        hold(ctx, held)
        return [first, ctx.step(after)]

    @durable.workflow("crash.second")
    def second_workflow(ctx: Any, seconds: float, held: bool = False) -> list[str]:
        """The slow step second: scheduled by the first step's settle, in the worker."""
        done = [ctx.step(after), ctx.step(slow, seconds)]
        hold(ctx, held)
        return done

    def slow_local(seconds: float) -> str:
        n = record("local")
        time.sleep(seconds if n == 1 else 0.0)
        return f"local run {n}"

    @durable.workflow("crash.local")
    def local_workflow(ctx: Any, seconds: float, held: bool = False) -> list[str]:
        first = ctx.step(slow_local, seconds, local=True)
        hold(ctx, held)
        return [first, ctx.step(after)]

    @durable.workflow("crash.tagged")
    def tagged_workflow(ctx: Any, seconds: float) -> str:
        """Attributes set before a local step whose worker a test kills, and after it."""
        ctx.set_attributes(stage="started", token=str(ctx.uuid4()), draw=ctx.random())
        first = ctx.step(slow_local, seconds, local=True)
        ctx.set_attributes(stage="done")
        return str(first)

    def gated_local() -> str:
        """Run n waits until the test pushes ``gate:n``: two runs held at will."""
        n = record("gated")
        client.blpop([f"{prefix}:gate:{n}"], timeout=120)
        return f"local run {n}"

    @durable.workflow("crash.gated")
    def gated_workflow(ctx: Any) -> list[str]:
        first = ctx.step(gated_local, local=True)
        return [first, ctx.step(after)]

    @durable.workflow("crash.nap")
    def nap_workflow(ctx: Any, seconds: float) -> str:
        ctx.sleep(seconds)
        return str(ctx.step(after))

    @app.task(name="crash.part", shared=False)
    def part(i: int) -> int:
        """Part 0 runs long the first time; the others finish quickly."""
        n = record(f"part:{i}")
        time.sleep(30 if (i == 0 and n == 1) else 0.2)
        client.incr(f"{prefix}:count:part-done:{i}")
        return i * 10

    @durable.workflow("crash.fanout")
    def fanout_workflow(ctx: Any, n: int) -> list[int]:
        return [int(x) for x in ctx.map(part, range(n))]

    @durable.workflow("crash.wait")
    def wait_workflow(ctx: Any) -> list[Any]:
        return [ctx.wait_for_signal("go"), ctx.step(after)]

    @app.task(name="crash.limited", shared=False, soft_time_limit=1)
    def limited(seconds: float) -> str:
        """Runs past its soft time limit; Celery's prefork pool interrupts it."""
        record("limited")
        try:
            time.sleep(seconds)
        except SoftTimeLimitExceeded:
            client.incr(f"{prefix}:count:limited-interrupted")
            raise
        return "not interrupted"

    @durable.workflow("crash.limited")
    def limited_workflow(ctx: Any, seconds: float) -> str:
        try:
            return str(ctx.step(limited, seconds))
        except StepFailed as failed:
            return f"failed: {failed}"

    return app, durable


if os.environ.get("CRASH_PREFIX"):
    app, durable = build(
        os.environ["DURABLE_DATABASE_URL"],
        os.environ["DURABLE_REDIS_URL"],
        os.environ["CRASH_PREFIX"],
    )
