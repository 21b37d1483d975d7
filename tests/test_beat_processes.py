"""Two real ``durable beat`` processes: the leader SIGKILLed, Redis flushed; every fire of a
schedule still happens exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis

from durable import Durable
from durable.dev.services import start_private_redis
from durable.scheduler import Schedules
from durable.store import engine as store_engine
from tests.conftest import clean_keys, clean_tables, make_app, query, wait_until

ROOT = Path(__file__).resolve().parent.parent
LEADER_TTL = 2


class Beats:
    """``durable beat --app tests.cli_app`` processes, each in its own process group."""

    def __init__(self, env: dict[str, str], logdir: Path) -> None:
        self.env = env
        self.logdir = logdir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        command = [sys.executable, "-m", "durable.cli", "beat", "--app", "tests.cli_app"]
        proc = subprocess.Popen(
            [*command, "--sweep-interval", "0.5"],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[proc.pid] = proc
        return proc

    def kill(self, pid: int) -> None:
        os.killpg(pid, signal.SIGKILL)
        self.procs[pid].wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self.logdir.glob("*.log"))


@pytest.fixture
def cluster(
    database_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> Iterator[Callable[..., tuple[Durable, Beats]]]:
    """Beats and a Durable on the shared Redis, or on a private one the test may flush."""
    made: list[tuple[str, Beats]] = []
    stops: list[Callable[[], None]] = []

    def make(private: bool = False) -> tuple[Durable, Beats]:
        url = redis_url
        if private:
            url, stop = start_private_redis()
            stops.append(stop)
        clean_tables(database_url)
        with store_engine.autocommit(database_url).connect() as conn:
            conn.exec_driver_sql("TRUNCATE durable_schedules")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DURABLE_")}
        env.update(
            CLI_APP_DATABASE_URL=database_url,
            CLI_APP_REDIS_URL=url,
            CLI_APP_BROKER_URL=url,
            CLI_APP_PREFIX=prefix,
            DURABLE_LEADER_TTL=str(LEADER_TTL),
            DURABLE_SCHEDULE_GRACE="30",
            PYTHONPATH=str(ROOT),
        )
        _, durable = make_app(database_url, url, prefix)
        durable.workflow("cli.greet")(lambda ctx, name: name)
        beats = Beats(env, tmp_path)
        made.append((url, beats))
        return durable, beats

    yield make
    for url, beats in made:
        beats.stop_all()
        clean_keys(url, prefix)
    for stop in stops:
        stop()
    with store_engine.autocommit(database_url).connect() as conn:
        conn.exec_driver_sql("TRUNCATE durable_schedules")


def fire_times(database_url: str) -> list[datetime]:
    rows = query(database_url, "SELECT id FROM durable_workflows WHERE id LIKE 'tick@%'")
    return sorted(datetime.fromisoformat(r.id.partition("@")[2]) for r in rows)


def assert_every_fire_once(database_url: str) -> list[datetime]:
    """Each second from the first fire to the last has exactly one run, started once."""
    times = fire_times(database_url)
    seconds = [int(t.timestamp()) for t in times]
    assert seconds == list(range(seconds[0], seconds[0] + len(seconds))), seconds
    starts = query(
        database_url,
        "SELECT count(*) AS n FROM durable_history WHERE event = 'started' "
        "AND workflow_id LIKE 'tick@%' GROUP BY workflow_id HAVING count(*) > 1",
    )
    assert starts == []
    return times


def leader_pid(client: redis.Redis, prefix: str) -> int | None:
    token = client.get(f"{prefix}:beat:leader")
    return int(token.decode().split(":")[1]) if token else None


def test_a_stand_by_takes_over_after_the_leaders_sigkill(
    cluster: Any, database_url: str, redis_url: str, prefix: str
) -> None:
    durable, beats = cluster()
    Schedules(durable).add("tick", "cli.greet", every=1, args=["world"], overlap="allow")
    pids = {beats.start("first").pid, beats.start("second").pid}
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(lambda: len(fire_times(database_url)) >= 3, timeout=30, what=beats.logs())
        leader = leader_pid(client, prefix)
        assert leader in pids
        beats.kill(leader)  # type: ignore[arg-type]
        (standby,) = pids - {leader}
        # The dead leader's key holds until its TTL runs out; then the stand-by takes it.
        wait_until(lambda: leader_pid(client, prefix) == standby, timeout=30, what=beats.logs())
        count = len(fire_times(database_url))
        wait_until(lambda: len(fire_times(database_url)) >= count + 3, timeout=15)
    finally:
        client.close()
    times = assert_every_fire_once(database_url)
    # The fires due while nobody led were started late by the stand-by, none lost.
    assert times[-1].timestamp() - times[0].timestamp() >= 5


def test_after_flushall_the_index_is_rebuilt_and_no_fire_is_lost_or_doubled(
    cluster: Any, database_url: str, prefix: str
) -> None:
    durable, beats = cluster(private=True)
    url = durable.settings.redis_url
    Schedules(durable).add("tick", "cli.greet", every=1, args=["world"], overlap="allow")
    beats.start("first")
    beats.start("second")
    client = redis.Redis.from_url(url)
    try:
        wait_until(lambda: len(fire_times(database_url)) >= 3, timeout=30, what=beats.logs())
        client.flushall()
        flushed_at = time.time()
        wait_until(lambda: client.exists(f"{prefix}:schedules:built"), timeout=10, what="a rebuild")
        wait_until(
            lambda: fire_times(database_url)[-1].timestamp() >= flushed_at + 3,
            timeout=15,
            what=beats.logs(),
        )
        assert client.zscore(f"{prefix}:schedules", "tick") is not None
    finally:
        client.close()
    assert_every_fire_once(database_url)
