"""What the tests of step limits and of limited runs share: their gated app run in-process,
and reading what it did."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner

from durable import Durable
from durable.beat import Beat
from durable.cli import cli
from tests.conftest import Background, clean_keys, clean_tables


@contextmanager
def in_process(
    build: Callable[..., tuple[Celery, Durable]], database_url: str, redis_url: str, prefix: str
) -> Iterator[tuple[Celery, Durable, redis.Redis]]:
    """The app ``build`` makes, with a worker thread pool and a beat; every gate opened after."""
    clean_tables(database_url)
    app, durable = build(database_url, redis_url, prefix)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    beat = Beat(durable, sweep_interval=0.5)
    thread = Background(beat.run)
    try:
        with start_worker(
            app, pool="threads", concurrency=4, perform_ping_check=False, loglevel="WARNING"
        ):
            yield app, durable, client
    finally:
        client.set(f"{prefix}:open", 1)
        beat.stopping.set()
        thread.join()
        clean_keys(redis_url, prefix)
        clean_tables(database_url)


def entered(client: redis.Redis, prefix: str) -> list[str]:
    """The gated bodies that began, in the order they began."""
    return list(client.lrange(f"{prefix}:entered", 0, -1))


def all_completed(durable: Durable, ids: list[str]) -> bool:
    return all(durable.run(i).status() == "completed" for i in ids)


def invoke(*args: str) -> Any:
    """The ``durable`` command, with no ``DURABLE_*`` variable of this process."""
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("DURABLE_")}
    return CliRunner().invoke(cli, list(args), env=clean, catch_exceptions=False)
