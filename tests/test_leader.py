"""The beat leader lock on a real Redis: one holder, renewal, loss, release, expiry."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from durable.dev.services import start_private_redis
from durable.leader import LeaderLock
from tests.conftest import clean_keys, wait_until


@pytest.fixture
def client(redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    clean_keys(redis_url, prefix)
    c.close()


def lock(client: redis.Redis, prefix: str, ttl: float = 1.0, name: str = "") -> LeaderLock:
    return LeaderLock(lambda: client, prefix, ttl, token=name or None)


def test_one_holder_at_a_time(client: redis.Redis, prefix: str) -> None:
    a, b = lock(client, prefix, name="a"), lock(client, prefix, name="b")
    assert a.tick() is True
    assert b.tick() is False
    assert a.holder() == "a" == b.holder()
    assert client.get(f"{prefix}:beat:leader") == b"a"


def test_renewal_keeps_the_lock_past_its_ttl(client: redis.Redis, prefix: str) -> None:
    a, b = lock(client, prefix, ttl=0.6, name="a"), lock(client, prefix, ttl=0.6, name="b")
    deadline = time.monotonic() + 2.0  # more than three TTLs
    while time.monotonic() < deadline:
        assert a.tick() is True
        assert b.tick() is False
        time.sleep(0.05)
    assert 0 < int(client.pttl(a.key)) <= 600


def test_stand_by_takes_over_after_the_holder_stops_renewing(
    client: redis.Redis, prefix: str
) -> None:
    a, b = lock(client, prefix, ttl=0.6, name="a"), lock(client, prefix, ttl=0.6, name="b")
    assert a.tick()
    assert b.tick() is False  # the key is a's until it expires
    wait_until(lambda: client.get(a.key) is None, timeout=10, what="a's key to expire")
    wait_until(b.tick, timeout=10, what="the stand-by to lead")
    # The old holder's local clock ended its leadership before the key expired.
    assert not a.held()
    assert a.tick() is False
    assert b.holder() == "b"


def test_a_holder_whose_key_vanished_stops_leading_at_its_next_renewal(
    client: redis.Redis, prefix: str
) -> None:
    a, b = lock(client, prefix, ttl=3.0, name="a"), lock(client, prefix, ttl=3.0, name="b")
    assert a.tick()
    client.delete(a.key)  # as FLUSHALL would
    assert b.tick()  # the stand-by takes the free key at once
    assert a.confirm() is False  # compare-and-renew finds b's token: a stops at once
    assert not a.held()
    assert a.holder() == "b"


def test_release_deletes_only_the_own_lock(client: redis.Redis, prefix: str) -> None:
    a, b = lock(client, prefix, name="a"), lock(client, prefix, name="b")
    assert a.tick()
    b.release()  # not b's: nothing happens
    assert a.holder() == "a"
    a.release()
    assert a.holder() is None and not a.held()
    assert b.tick()


def test_local_validity_ends_before_the_key_expires(client: redis.Redis, prefix: str) -> None:
    # A 10 s TTL: the holder stops at 9 s, a second before Redis drops the key, a margin no
    # stall of a busy machine between the two checks below comes near.
    a = lock(client, prefix, ttl=10.0, name="a")
    assert a.tick() and a.held()
    wait_until(lambda: not a.held(), timeout=20, what="the local validity to end")  # no renewal
    # Redis still shows it, for about a tenth of the TTL; the holder already stopped.
    assert client.get(a.key) == b"a"
    assert int(client.pttl(a.key)) > 0


def test_unreachable_redis_ends_leadership_within_the_ttl() -> None:
    url, stop = start_private_redis()
    client = redis.Redis.from_url(url, socket_timeout=0.2, socket_connect_timeout=0.2)
    try:
        a = lock(client, "lead", ttl=1.0, name="a")
        assert a.tick()
        stop()
        wait_until(lambda: not a.tick(), timeout=3, what="leadership to end")
    finally:
        stop()
        client.close()
