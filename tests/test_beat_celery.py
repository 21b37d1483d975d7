"""Celery's own beat with ``-S durable.beat:DurableScheduler``: ``beat_schedule`` entries run as
durable workflows, once per fire. The module doubles as the app of a real ``celery beat``
process when ``BEAT_CELERY_PREFIX`` is set."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.beat import Service
from celery.schedules import crontab

from durable import Durable
from durable.beat import DurableScheduler
from durable.store import engine as store_engine
from tests.conftest import Background, clean_keys, clean_tables, make_app, query, wait_until

ROOT = Path(__file__).resolve().parent.parent


def build(database_url: str, redis_url: str, prefix: str) -> tuple[Celery, Durable]:
    """An app whose beat_schedule runs ``shop.ping`` every second, counting its runs in Redis."""
    app, durable = make_app(database_url, redis_url, prefix, leader_ttl=2)
    client = redis.Redis.from_url(redis_url)

    @app.task(name="shop.ping", shared=False)
    def ping(word: str) -> str:
        client.incr(f"{prefix}:count:ping")
        return word

    app.conf.beat_schedule = {
        "ping": {"task": "shop.ping", "schedule": 1.0, "args": ("pong",)},
        "nightly": {"task": "shop.ping", "schedule": crontab(minute=0, hour=3), "args": ("zz",)},
    }
    return app, durable


@pytest.fixture
def shop(database_url: str, redis_url: str, prefix: str) -> Iterator[tuple[Celery, Durable]]:
    clean_tables(database_url)
    with store_engine.autocommit(database_url).connect() as conn:
        conn.exec_driver_sql("TRUNCATE durable_schedules")
    yield build(database_url, redis_url, prefix)
    with store_engine.autocommit(database_url).connect() as conn:
        conn.exec_driver_sql("TRUNCATE durable_schedules")
    clean_keys(redis_url, prefix)


def ping_runs(database_url: str) -> list[Any]:
    return query(
        database_url,
        "SELECT id, name, status, result FROM durable_workflows WHERE id LIKE 'ping@%' ORDER BY id",
    )


def test_celery_beat_with_the_durable_scheduler_runs_each_entry_once_per_fire(
    shop: tuple[Celery, Durable], database_url: str, redis_url: str, prefix: str
) -> None:
    from celery.contrib.testing.worker import start_worker

    app, _ = shop
    service = Service(app, scheduler_cls=DurableScheduler)
    client = redis.Redis.from_url(redis_url)
    with start_worker(app, pool="threads", perform_ping_check=False, loglevel="WARNING"):
        beat = Background(service.start)
        try:
            wait_until(
                lambda: sum(r.status == "completed" for r in ping_runs(database_url)) >= 3,
                timeout=20,
                what="three completed fires",
            )
        finally:
            service.stop()
            beat.join(5)
        wait_until(lambda: all(r.status != "running" for r in ping_runs(database_url)))
    runs = ping_runs(database_url)
    assert all((r.name, r.status, r.result) == ("durable.task", "completed", "pong") for r in runs)
    assert int(client.get(f"{prefix}:count:ping") or 0) == len(runs)  # each fire ran once
    (nightly,) = query(
        database_url, "SELECT cron, origin FROM durable_schedules WHERE name = 'nightly'"
    )
    assert (nightly.cron, nightly.origin) == ("0 3 * * *", "beat_schedule")
    assert client.get(f"{prefix}:beat:leader") is None  # released on shutdown
    client.close()


def test_celery_beat_command_accepts_the_durable_scheduler(
    shop: tuple[Celery, Durable], database_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
    env.update(
        BEAT_CELERY_DATABASE_URL=database_url,
        BEAT_CELERY_REDIS_URL=redis_url,
        BEAT_CELERY_PREFIX=prefix,
        PYTHONPATH=str(ROOT),
    )
    log = tmp_path / "beat.log"
    command = [sys.executable, "-m", "celery", "-A", "tests.test_beat_celery", "beat"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*command, "-S", "durable.beat:DurableScheduler", "--loglevel", "INFO"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(lambda: ping_runs(database_url), timeout=30)
        except AssertionError:
            raise AssertionError(log.read_text(errors="replace")[-3000:]) from None
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
    assert "durable: schedules in PostgreSQL" in log.read_text()


if os.environ.get("BEAT_CELERY_PREFIX"):
    app, durable = build(
        os.environ["BEAT_CELERY_DATABASE_URL"],
        os.environ["BEAT_CELERY_REDIS_URL"],
        os.environ["BEAT_CELERY_PREFIX"],
    )
