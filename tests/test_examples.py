"""Smoke tests of the examples in ``workflows/``: they run as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

from durable.dev.services import Services, drop_database

ROOT = Path(__file__).resolve().parent.parent


def test_the_demo_tour_commits_every_side_effect_exactly_once(services: Services) -> None:
    database = f"durable_demo_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **services.environ()}
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "workflows.demo", "--database", database],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=175,
        )
    finally:
        drop_database(services.database_url, database)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert time.monotonic() - started < 180, output  # the tour's promise: under 3 minutes
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
