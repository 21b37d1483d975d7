"""Smoke tests of the examples in ``workflows/``: they run as a user would run them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, make_url, text

from durable.config import normalise_database_url
from durable.dev.services import Services, drop_database
from durable.store.history import events_sql

ROOT = Path(__file__).resolve().parent.parent

# Every call of a step's body, with its step's attempts, status and commits. The shop's
# effects are unique on (kind, idempotency key), so a body that ran again commits nothing
# new: only ``shop_calls`` (one row per call, committed or not) shows a repeated run.
CALLS = (
    """
    WITH done AS (
        SELECT workflow_id || ':' || seq AS key, min(at) AS first_at, count(*) AS commits
          FROM ("""
    + events_sql("")
    + """) AS h WHERE event = 'step completed' GROUP BY workflow_id, seq
    )
    SELECT c.idempotency_key AS key, count(*) AS calls,
           count(*) FILTER (WHERE c.at > done.first_at) AS after_commit,
           min(done.commits) AS commits, min(s.attempts) AS attempts, min(s.status) AS status
      FROM shop_calls c
      LEFT JOIN durable_steps s ON c.idempotency_key = s.workflow_id || ':' || s.seq
      LEFT JOIN done ON done.key = c.idempotency_key
     GROUP BY c.idempotency_key
"""
)


def read_calls(server_url: str, database: str) -> list[Any]:
    url = make_url(normalise_database_url(server_url)).set(database=database)
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text(CALLS)))
    finally:
        engine.dispose()


def test_the_demo_tour_commits_every_side_effect_exactly_once(services: Services) -> None:
    database = f"durable_demo_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **services.environ()}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "workflows.demo", "--database", database],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=175,
        )
        calls = read_calls(services.database_url, database) if done.returncode == 0 else []
    finally:
        drop_database(services.database_url, database)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for line in (
        "Killed worker",
        "Recovered: ",
        "Restarted Redis",
        "durable beat rebuilt the timer index",
        "Skipped 30 days",
        "OK: every side effect was committed exactly once",
        "durable show order-o-",
    ):
        assert line in done.stdout, output
    assert "Traceback" not in output, output
    # The steps the killed worker was running, which ran again with the same key.
    recovered = set(re.findall(r"same idempotency key (\S+)\)", done.stdout))
    assert recovered, output
    by_key = {row.key: row for row in calls}
    # Each ran again after the kill: twice in all, or once when the kill came before the
    # body's first line (its step was claimed, the body had not started).
    assert all(by_key[key].calls in (1, 2) for key in recovered), [by_key.get(k) for k in recovered]
    assert all(by_key[key].attempts >= 2 for key in recovered), [by_key.get(k) for k in recovered]
    # No body ran once its step was committed, and each ran about once per attempt: a
    # retry, or the re-run of a step cut off by the kill. The kill can also land between a
    # claim and the body's first line (an attempt without a call), or on a first delivery
    # running unclaimed, which the demo does not list as cut off (a call that was not an
    # attempt): a difference of one either way, never more.
    assert len(calls) > 100, calls
    for row in calls:
        assert (row.status, row.commits) == ("completed", 1), row
        assert row.after_commit == 0, row
        assert abs(row.calls - row.attempts) <= 1, row
    cut_off = [row for row in calls if row.calls != row.attempts]
    assert len(cut_off) <= 4, cut_off  # one worker of concurrency 2, killed once
