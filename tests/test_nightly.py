"""The nightly report of ``workflows/nightly.py``: scheduled by durable's beat, end to end.

The shop's own app runs in an in-process worker (``durable.testing.TestEnv``) against the test
database. The schedule is checked as added (03:00 in Paris), fired by ``Schedules.trigger``
and by a real beat on a short interval, and the wait until 07:00 is skipped.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import insert

from durable import Durable, WorkflowFailed
from durable.admin import list_runs
from durable.beat import Beat
from durable.testing import TestEnv
from tasks.reports import get_report
from tests.apps.shop_env import shop_app
from tests.conftest import Background, query, wait_until
from workflows.nightly import REPORT, SCHEDULE, install_schedule

PARIS = ZoneInfo("Europe/Paris")
FIRE_ID = re.compile(r"(?P<name>[\w-]+)@(?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)")


@pytest.fixture(scope="module")
def shop(database_url: str, redis_url: str) -> Iterator[Durable]:
    with shop_app(database_url, redis_url) as durable:
        yield durable


@pytest.fixture
def env(shop: Durable) -> Iterator[TestEnv]:
    with TestEnv(shop) as test_env:
        yield test_env


@pytest.fixture
def schedules(shop: Durable) -> Iterator[list[str]]:
    """Names of schedules a test adds, removed after it."""
    added: list[str] = []
    yield added
    for name in added:
        shop.schedules.remove(name)


def yesterday_in_paris() -> date:
    return datetime.now(PARIS).date() - timedelta(days=1)


def fired_at(workflow_id: str, schedule: str) -> datetime:
    match = FIRE_ID.fullmatch(workflow_id)
    assert match is not None and match["name"] == schedule, workflow_id
    return datetime.strptime(match["at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def place_orders(day: date) -> list[str]:
    """Two orders placed and charged at noon on ``day`` in Paris, and one placed now."""
    from tasks import store

    noon = datetime.combine(day, time(12), PARIS)
    tag = uuid.uuid4().hex[:8]
    ids = [f"n-{tag}-1", f"n-{tag}-2", f"n-{tag}-now"]
    items = [{"sku": "MUG-1", "qty": 2, "price_cents": 1200}]
    with store.engine().begin() as conn:
        for order_id, at in zip(ids, [noon, noon, datetime.now(UTC)], strict=True):
            row = {"id": order_id, "email": "a@example.com", "items": items, "card": "4242"}
            conn.execute(insert(store.orders).values(**row, created_at=at))
            effect = {"kind": "charge", "idempotency_key": f"{order_id}:1", "order_id": order_id}
            conn.execute(insert(store.effects).values(**effect, at=at))
    return ids


def test_the_schedule_fires_at_three_in_the_morning_in_paris(
    shop: Durable, schedules: list[str]
) -> None:
    info = install_schedule(shop)
    schedules.append(info.name)
    assert (info.name, info.workflow, info.cron, info.timezone) == (
        SCHEDULE,
        "reports.nightly",
        "0 3 * * *",
        "Europe/Paris",
    )
    assert (info.catchup, info.kwargs) == ("once", {"timezone": "Europe/Paris"})
    assert info.next_fire_at is not None
    local = info.next_fire_at.astimezone(PARIS)
    assert (local.hour, local.minute, local.second) == (3, 0, 0)
    assert timedelta(0) < info.next_fire_at - datetime.now(UTC) <= timedelta(hours=25)
    assert install_schedule(shop) == info  # adding it again changes nothing


def test_a_fire_reports_yesterday_and_delivers_it(
    shop: Durable, env: TestEnv, schedules: list[str], database_url: str
) -> None:
    day = yesterday_in_paris()
    place_orders(day)
    failed = shop.start("durable.task", "tasks.reports.collect_sales", ["not a time", ""])
    with pytest.raises(WorkflowFailed):
        env.result(failed, timeout=30)
    noon = datetime.combine(day, time(12), PARIS)
    query(
        database_url,
        "UPDATE durable_workflows SET created_at = :at WHERE id = :id RETURNING id",
        at=noon,
        id=failed.id,
    )
    schedules.append(install_schedule(shop).name)

    run = shop.schedules.trigger(SCHEDULE)
    at = fired_at(run.id, SCHEDULE)
    assert abs((datetime.now(UTC) - at).total_seconds()) < 60
    result = env.result(run, timeout=60)

    assert result["day"] == day.isoformat()
    sales = result["sales"]
    assert sales["orders_placed"] >= 2 and sales["effects"]["charge"] >= 2
    assert sales["charged_cents"] >= 2 * 2400
    assert result["workflows"]["by_workflow"]["durable.task"] == {"failed": 1}
    assert result["workflows"]["failed"] == [failed.id]
    stored = get_report(REPORT, day.isoformat())
    assert stored is not None
    assert (stored["workflow_id"], stored["body"]["sales"]) == (run.id, sales)
    assert stored["window_start"] == datetime.combine(day, time(0), PARIS)
    assert stored["delivered_at"] is not None
    assert stored["recipients"] == result["recipients"] == ["ops@shop.example"]
    assert shop.schedules.get(SCHEDULE).last_run_id == run.id


def test_a_fire_at_three_waits_until_seven_to_deliver(shop: Durable, env: TestEnv) -> None:
    tomorrow = datetime.now(PARIS).date() + timedelta(days=1)
    three = datetime.combine(tomorrow, time(3), PARIS).astimezone(UTC)
    fire_id = f"{SCHEDULE}@{three:%Y-%m-%dT%H:%M:%SZ}"  # what the beat starts at 03:00
    run = shop.start("reports.nightly", workflow_id=fire_id, timezone="Europe/Paris")
    wait_until(lambda: shop.get_event(run.id, "status") == "stored", timeout=30, what="storing")
    today = (tomorrow - timedelta(days=1)).isoformat()
    stored = get_report(REPORT, today)
    assert stored is not None and stored["delivered_at"] is None
    result = env.result(run, timeout=30)
    assert result["day"] == today
    seven = datetime.combine(tomorrow, time(7), PARIS)
    assert env.skipped == pytest.approx((seven - datetime.now(UTC)).total_seconds(), abs=60)
    assert get_report(REPORT, today)["delivered_at"] is not None  # type: ignore[index]


def test_a_real_beat_fires_a_short_interval_schedule(
    shop: Durable, env: TestEnv, schedules: list[str]
) -> None:
    info = shop.schedules.add(
        "nightly-every-2s", "reports.nightly", every=2, kwargs={"timezone": "Europe/Paris"}
    )
    schedules.append(info.name)
    beat = Beat(shop, sweep_interval=0.5)
    thread = Background(beat.run)
    try:
        wait_until(lambda: shop.schedules.get(info.name).last_run_id, timeout=30, what="a fire")
        shop.schedules.pause(info.name)  # no more fires, from this beat or the test's
    finally:
        beat.stopping.set()
        thread.join(10)
    with shop.connect() as conn:
        runs = list_runs(conn, name="reports.nightly", limit=1000)
    fires = [r["id"] for r in runs if r["id"].startswith(f"{info.name}@")]
    assert fires
    for fire in fires:
        at = fired_at(fire, info.name)
        assert at.timestamp() % 2 == 0  # fires on the multiples of the interval
        result: dict[str, Any] = env.result(shop.run(fire), timeout=60)
        assert result["day"] == (at.astimezone(PARIS).date() - timedelta(days=1)).isoformat()
    assert get_report(REPORT, result["day"])["workflow_id"] in fires  # type: ignore[index]
