"""Smoke tests of the examples in ``workflows/``: they run as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from durable.devservices import Services, drop_database

ROOT = Path(__file__).resolve().parent.parent


def test_demo_commits_every_side_effect_exactly_once(services: Services) -> None:
    database = f"durable_demo_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **services.environ()}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "workflows.demo", "--database", database],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=170,
        )
    finally:
        drop_database(services.database_url, database)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "Killed worker" in done.stdout, output
    assert "OK: every side effect was committed exactly once" in done.stdout, output
