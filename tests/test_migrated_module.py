"""A Celery module migrated to durable behaves as it did, plus durability.

tests/apps/celery_reports.py is a plain Celery module: a chain whose first link is a group,
a task with a ``rate_limit``, one with ``autoretry_for``, one that calls
``self.retry(countdown=)``, and a ``beat_schedule`` entry with ``expires``.
tests/apps/durable_reports.py is the same module migrated; docs/migrating.md shows the diff
between them, which a test here keeps true. Each runs on a real prefork worker of its own,
on a Redis of its own.
"""

from __future__ import annotations

import difflib
import importlib
import itertools
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from durable.dev.services import start_private_redis
from tests.conftest import ROOT, Workers, clean_tables, query

# Both modules define the same task names, as the same module before and after would; loaded
# in one process, Celery's shared-task registry warns of the second. Expected here.
pytestmark = pytest.mark.filterwarnings("ignore::celery.exceptions.DuplicateTaskNameWarning")

APPS = ROOT / "tests" / "apps"
EXPECTED = "posted eu-1=400, eu-2=400, eu-3=400 to https://hooks.example/reports"


def module_diff() -> list[str]:
    before = (APPS / "celery_reports.py").read_text().splitlines()
    after = (APPS / "durable_reports.py").read_text().splitlines()
    return list(difflib.unified_diff(before, after, lineterm="", n=0))[2:]


@pytest.fixture(params=["celery_reports", "durable_reports"])
def reports(
    request: pytest.FixtureRequest,
    database_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[str, Any, redis.Redis]]:
    clean_tables(database_url)
    url, stop = start_private_redis()
    env = {"REPORTS_BROKER_URL": url, "DURABLE_DATABASE_URL": database_url}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DURABLE_REDIS_URL", raising=False)  # the broker's Redis, by default
    name = f"tests.apps.{request.param}"
    sys.modules.pop(name, None)
    module = importlib.import_module(name)
    workers = Workers({**os.environ, **env, "PYTHONPATH": str(ROOT)}, tmp_path, name)
    client = redis.Redis.from_url(url, decode_responses=True)
    beat: subprocess.Popen[bytes] | None = None
    try:
        workers.start("reports", concurrency=2)
        if request.param == "durable_reports":  # `celery beat` becomes `durable beat`
            command = [sys.executable, "-m", "durable.cli", "beat", "--app", f"{name}:app"]
            with open(tmp_path / "beat.log", "wb") as log:
                beat = subprocess.Popen(
                    command, cwd=ROOT, env=workers.env, stdout=log, stderr=subprocess.STDOUT
                )
        yield request.param, module, client
    finally:
        if beat is not None:
            beat.terminate()
            beat.wait(15)
        workers.stop_all()
        client.close()
        module.app.close()
        sys.modules.pop(name, None)
        stop()


def test_the_migrated_module_behaves_as_the_celery_one(
    reports: tuple[str, Any, redis.Redis], database_url: str
) -> None:
    which, module, services = reports
    result = module.nightly("eu").apply_async().get(timeout=90)
    assert result == EXPECTED
    # autoretry_for: two busy answers, then the render; each attempt told its retries.
    assert services.lrange("reports:render-retries", 0, -1) == ["0", "1", "2"]
    # self.retry(countdown=): one busy answer, then the post.
    assert services.get("reports:post-calls") == "2"
    # rate_limit="120/m": the worker holds each fetch for a token, one every 0.5 s.
    fetched = sorted(float(t) for t in services.lrange("reports:fetched", 0, -1))
    assert len(fetched) == 3
    # (0.3 s at least: the worker's timers are coarse; unlimited, they come milliseconds apart)
    assert all(b - a >= 0.3 for a, b in itertools.pairwise(fetched)), fetched
    if which == "durable_reports":
        # The waits Celery would have counted down are durable retry timers of the same
        # length: default_retry_delay (0.2 s) twice for render, countdown (0.5 s) for post.
        waits = query(
            database_url,
            "SELECT s.name, extract(epoch FROM t.fire_at - t.created_at) AS wait"
            " FROM durable_timers t JOIN durable_steps s USING (workflow_id, seq)"
            " WHERE t.purpose = 'retry' ORDER BY t.id",
        )
        assert [(w.name, round(float(w.wait), 3)) for w in waits] == [
            ("reports.render", 0.2),
            ("reports.render", 0.2),
            ("reports.post", 0.5),
        ]
        # ...plus durability: the run and each step's result are in PostgreSQL.
        run_id = module.nightly("eu").apply_async().id
        assert module.durable.run(run_id).get(timeout=90) == EXPECTED


def test_the_beat_schedule_entry_keeps_its_expires(
    reports: tuple[str, Any, redis.Redis],
) -> None:
    which, module, _ = reports
    if which != "durable_reports":
        assert module.app.conf.beat_schedule["nightly-eu"]["options"]["expires"] == 3600
        return
    report = module.durable.schedules.import_beat_schedule(module.app.conf.beat_schedule)
    # The running beat imported it at its start too: added by one, unchanged for the other.
    assert "nightly-eu" in report.added + report.unchanged and report.problems == []
    [schedule] = [s for s in module.durable.schedules.list() if s.name == "nightly-eu"]
    task, args, _, options = schedule.args  # durable.task runs the entry's task as a step
    assert (task, args, options["expires"]) == ("reports.build", ["eu"], 3600)


def test_the_documented_diff_is_the_modules_diff() -> None:
    """docs/migrating.md shows the whole diff of the migration, and it is a few lines."""
    changed = [line for line in module_diff() if line[:1] in "+-" and not line.startswith("@@")]
    assert len(changed) <= 8, changed
    doc = (ROOT / "docs" / "migrating.md").read_text()
    block = re.search(r"```diff\n(.*?)```", doc[doc.index("## (h)") :], re.S)
    assert block is not None, "docs/migrating.md: section (h) has no diff block"
    shown = [line for line in block.group(1).splitlines() if line[:1] in "+-"]
    assert shown == changed
