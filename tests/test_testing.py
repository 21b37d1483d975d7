"""The testing helpers users get: a 30-day workflow tested in well under a second of sleeps."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from durable import Durable, SignalTimeout
from durable.testing import TestEnv
from tests.conftest import make_app


def test_time_skipping_runs_a_month_long_workflow(
    database_url: str, redis_url: str, prefix: str
) -> None:
    app, durable = make_app(database_url, redis_url, prefix)

    @app.task(name="t.close_order", shared=False)
    def close_order(order_id: str) -> str:
        return f"closed {order_id}"

    @durable.workflow("wf.returns_window")
    def returns_window(ctx: Any, order_id: str) -> dict[str, Any]:
        opened = ctx.now()
        try:
            ctx.wait_for_signal("return", timeout=timedelta(days=30))
            outcome = "returned"
        except SignalTimeout:
            outcome = str(ctx.step(close_order, order_id))
        ctx.sleep(timedelta(days=1))
        return {"outcome": outcome, "days": (ctx.now() - opened).days}

    with TestEnv(durable) as env:
        run = durable.start("wf.returns_window", "o-1", workflow_id="month-1")
        assert env.result(run, timeout=30) == {"outcome": "closed o-1", "days": 31}
        assert env.skipped >= 31 * 86400 - 5


def test_advance_fires_due_timers_by_hand(database_url: str, redis_url: str, prefix: str) -> None:
    _, durable = make_app(database_url, redis_url, prefix)

    @durable.workflow("wf.nap_day")
    def nap(ctx: Any) -> str:
        ctx.sleep(timedelta(days=1))
        return "rested"

    with TestEnv(durable) as env:
        run = durable.start("wf.nap_day", workflow_id="nap-day")
        assert env.advance(timedelta(hours=1)) == 0  # the timer may not be set yet, or not due
        while run.status() == "running":
            env.advance(timedelta(hours=6))
        assert run.result(timeout=5) == "rested"
        assert env.skipped >= 86400


def test_durable_is_importable_by_users() -> None:
    assert isinstance(Durable, type)
