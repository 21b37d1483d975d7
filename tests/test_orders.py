"""The order flow of ``workflows/orders.py``, every path, with time skipping.

The shop's own app and tasks run in an in-process worker (``durable.testing.TestEnv``)
against the test database, where the tasks write their side effects (``tasks/store.py``):
each test counts them to show that nothing was done twice, or left undone.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from durable import Durable, WorkflowCancelled, WorkflowNotRunning
from durable.testing import TestEnv
from tests.apps.shop_env import shop_app
from tests.conftest import query, wait_until

DAY = 86400.0
HAPPY_EMAILS = ["order_confirmed", "shipped", "delivered"]


@pytest.fixture(scope="module")
def shop(database_url: str, redis_url: str) -> Iterator[Durable]:
    with shop_app(database_url, redis_url) as durable:
        import workflows.orders  # noqa: F401  (registers orders.fulfill)

        yield durable


@pytest.fixture
def env(shop: Durable) -> Iterator[TestEnv]:
    with TestEnv(shop) as test_env:
        yield test_env


def place_order(card: str = "4242424242424242", email: str = "ann@example.com") -> str:
    """A new order of three mugs and a teapot; returns its id."""
    from tasks import store

    order_id = f"o-{uuid.uuid4().hex[:8]}"
    items = [
        {"sku": "MUG-1", "qty": 3, "price_cents": 1200},
        {"sku": "POT-7", "qty": 1, "price_cents": 4500},
    ]
    store.add_order(order_id, email, items, card)
    return order_id


TOTAL = 3 * 1200 + 4500


def start(durable: Durable, order_id: str) -> Any:
    return durable.start("orders.fulfill", order_id, workflow_id=f"order-{order_id}")


def wait_for_status(durable: Durable, order_id: str, status: str) -> None:
    wait_until(
        lambda: durable.get_event(f"order-{order_id}", "status") == status,
        timeout=30,
        what=f"order {order_id} to be {status}",
    )


def statuses(database_url: str, order_id: str) -> list[str]:
    """Every value the order's ``status`` event took, in order."""
    rows = query(
        database_url,
        "SELECT result FROM durable_steps WHERE workflow_id = :wid AND kind = 'event' "
        "AND name = 'status' ORDER BY seq",
        wid=f"order-{order_id}",
    )
    return [row.result for row in rows]


def effects(order_id: str) -> dict[str, int]:
    """Side effects committed for the order, by kind."""
    from tasks import store

    return store.effect_counts().get(order_id, {})


def calls(order_id: str) -> dict[str, int]:
    """Task bodies run for the order, by kind (a retried or re-run body counts twice)."""
    from tasks import store

    return store.call_counts().get(order_id, {})


def emails(order_id: str) -> list[str]:
    from tasks import store

    return [detail["template"] for detail in store.effect_details(order_id, "email")]


def money(order_id: str) -> tuple[int, int]:
    """(charged, refunded) in cents."""
    from tasks import store

    return store.effect_total(order_id, "charge"), store.effect_total(order_id, "refund")


def deliver(durable: Durable, order_id: str) -> None:
    """Play the warehouse, the clerk and the driver, each answering when it is its turn."""
    workflow_id = f"order-{order_id}"
    wait_for_status(durable, order_id, "awaiting_fulfilment")
    durable.signal(workflow_id, "fulfilled", {"warehouse": "north"})
    wait_for_status(durable, order_id, "awaiting_shipment")
    durable.signal(workflow_id, "shipped", {"carrier": "ups", "tracking": "1Z999"})
    wait_for_status(durable, order_id, "shipped")
    durable.signal(workflow_id, "delivered", {"signed_by": "Ann"})
    wait_for_status(durable, order_id, "delivered")


def test_an_order_is_delivered_then_closes_after_30_days(
    shop: Durable, env: TestEnv, database_url: str
) -> None:
    order_id = place_order()
    run = start(shop, order_id)
    deliver(shop, order_id)

    result = env.result(run)

    assert result == {
        "order_id": order_id,
        "status": "closed",
        "txn": result["txn"],
        "charged_cents": TOTAL,
        "refunded_cents": 0,
    }
    assert 30 * DAY - 60 <= env.skipped < 31 * DAY  # less the seconds the test took
    assert statuses(database_url, order_id) == [
        "validating",
        "reserving",
        "charging",
        "awaiting_fulfilment",
        "awaiting_shipment",
        "shipped",
        "delivered",
        "closed",
    ]
    expected = {"validate": 1, "fraud_check": 1, "reserve": 1, "charge": 1, "fulfilment": 1}
    assert effects(order_id) == {**expected, "email": 3}
    assert calls(order_id) == {**expected, "email": 3}  # and each body ran once
    assert emails(order_id) == HAPPY_EMAILS
    assert money(order_id) == (TOTAL, 0)
    with pytest.raises(WorkflowNotRunning):  # the returns window has closed
        shop.signal(f"order-{order_id}", "return", {})


def test_a_return_within_30_days_refunds_the_returned_items(
    shop: Durable, env: TestEnv, database_url: str
) -> None:
    order_id = place_order()
    run = start(shop, order_id)
    deliver(shop, order_id)
    env.advance(timedelta(days=12))  # the customer thinks it over
    assert shop.get_event(f"order-{order_id}", "status") == "delivered"

    shop.signal(f"order-{order_id}", "return", {"skus": ["POT-7"], "reason": "chipped"})

    result = env.result(run)
    assert (result["status"], result["refunded_cents"]) == ("returned", 4500)
    assert env.skipped < 30 * DAY
    assert statuses(database_url, order_id)[-2:] == ["delivered", "returned"]
    assert effects(order_id)["refund"] == 1
    assert money(order_id) == (TOTAL, 4500)
    assert emails(order_id) == [*HAPPY_EMAILS, "refunded"]


@pytest.mark.parametrize(
    ("card", "email", "statuses_before"),
    [
        ("4242424242424242", "buyer@mailinator.com", ["validating", "reserving"]),
        ("4100000000000019", "ann@example.com", ["validating", "reserving", "charging"]),
    ],
    ids=["flagged-by-the-fraud-check", "declined-as-fraudulent-by-the-issuer"],
)
def test_fraud_cancels_at_once_and_releases_the_stock(
    shop: Durable,
    env: TestEnv,
    database_url: str,
    card: str,
    email: str,
    statuses_before: list[str],
) -> None:
    from tasks import store

    order_id = f"o-{uuid.uuid4().hex[:8]}"
    many = [{"sku": "TV-55", "qty": 8, "price_cents": 30000}]
    store.add_order(order_id, email, many, card)

    result = env.result(start(shop, order_id))

    assert result["status"] == "cancelled"
    assert "fraud" in result["reason"]
    assert env.skipped == 0  # no waiting for another card
    assert statuses(database_url, order_id) == [*statuses_before, "cancelled"]
    assert effects(order_id) == {
        "validate": 1,
        "fraud_check": 1,
        "reserve": 1,
        "release": 1,
        "email": 1,
    }
    assert emails(order_id) == ["cancelled"]
    assert money(order_id) == (0, 0)


def test_a_declined_card_waits_for_a_new_payment_method(
    shop: Durable, env: TestEnv, database_url: str
) -> None:
    order_id = place_order(card="4000000000009995")  # insufficient funds
    run = start(shop, order_id)
    wait_for_status(shop, order_id, "awaiting_payment_method")
    env.advance(timedelta(hours=23))
    assert shop.get_event(f"order-{order_id}", "status") == "awaiting_payment_method"

    shop.signal(f"order-{order_id}", "payment_method", {"card": "4242424242424242"})
    deliver(shop, order_id)

    assert env.result(run)["status"] == "closed"
    assert statuses(database_url, order_id)[:5] == [
        "validating",
        "reserving",
        "charging",
        "awaiting_payment_method",
        "charging",
    ]
    assert effects(order_id)["charge"] == 1
    assert calls(order_id)["charge"] == 2  # the declined card, then the new one
    assert money(order_id) == (TOTAL, 0)
    assert emails(order_id) == ["payment_declined", *HAPPY_EMAILS]


def test_a_declined_card_not_replaced_within_24_hours_cancels(
    shop: Durable, env: TestEnv, database_url: str
) -> None:
    order_id = place_order(card="4000000000009995")

    result = env.result(start(shop, order_id))

    assert (result["status"], result["reason"]) == (
        "cancelled",
        "no payment method within 24 hours",
    )
    assert DAY - 60 <= env.skipped < 2 * DAY
    assert statuses(database_url, order_id)[-2:] == ["awaiting_payment_method", "cancelled"]
    assert effects(order_id) == {
        "validate": 1,
        "fraud_check": 1,
        "reserve": 1,
        "release": 1,
        "email": 2,
    }
    assert emails(order_id) == ["payment_declined", "cancelled"]
    assert money(order_id) == (0, 0)


def test_a_provider_error_is_retried_and_charges_once(shop: Durable, env: TestEnv) -> None:
    order_id = place_order(card="4000000000000119")  # a processing error, then a charge
    run = start(shop, order_id)
    # Signals are kept until the order waits for them: the warehouse, the clerk and the
    # driver may answer early, while the charge waits for its retry.
    for name in ("fulfilled", "shipped", "delivered"):
        shop.signal(f"order-{order_id}", name, {})

    assert env.result(run)["status"] == "closed"
    assert calls(order_id)["charge"] == 2
    assert effects(order_id)["charge"] == 1
    assert money(order_id) == (TOTAL, 0)


def test_a_cancel_before_shipment_refunds_and_releases(
    shop: Durable, env: TestEnv, database_url: str
) -> None:
    order_id = place_order()
    run = start(shop, order_id)
    wait_for_status(shop, order_id, "awaiting_fulfilment")
    wait_until(lambda: effects(order_id).get("fulfilment") == 1, what="the warehouse request")

    shop.cancel(f"order-{order_id}")

    with pytest.raises(WorkflowCancelled):
        env.result(run)
    assert statuses(database_url, order_id)[-1] == "cancelled"
    assert effects(order_id)["refund"] == 1
    assert effects(order_id)["release"] == 1
    assert money(order_id) == (TOTAL, TOTAL)
    assert emails(order_id) == ["order_confirmed", "cancelled"]
