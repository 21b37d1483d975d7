"""Flower shows each step as the user's task with a legible label, and activations as such:
a real ``celery flower`` and a real worker sending task events, read through ``/api/tasks``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apps.crash_app import build
from tests.conftest import clean_keys, clean_tables, wait_until

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


@pytest.fixture
def processes(
    database_url: str, redis_url: str, prefix: str, tmp_path: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    clean_tables(database_url)
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    clean_keys(redis_url, prefix)


def test_flower_shows_steps_as_the_users_tasks(
    processes: list[subprocess.Popen[bytes]],
    database_url: str,
    redis_url: str,
    prefix: str,
    tmp_path: Path,
) -> None:
    env = {
        **os.environ,
        "DURABLE_DATABASE_URL": database_url,
        "DURABLE_REDIS_URL": redis_url,
        "CRASH_PREFIX": prefix,
        "PYTHONPATH": str(ROOT),
        "FLOWER_UNAUTHENTICATED_API": "true",
    }
    port = free_port()
    celery = [sys.executable, "-m", "celery", "-A", "tests.apps.crash_app"]
    commands = {
        "flower": [*celery, "flower", f"--port={port}", "--address=127.0.0.1"],
        "worker": [*celery, "worker", "-E", "--pool=solo", "--without-gossip", "--without-mingle"],
    }
    for name, command in commands.items():
        log = open(tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        processes.append(
            subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )  # fmt: skip
    api = f"http://127.0.0.1:{port}/api"
    # Flower only sees the tasks whose events it receives: wait until it knows the worker.
    wait_until(lambda: get(f"{api}/workers?refresh=1"), timeout=60, what="Flower and the worker")

    # Started by activations (not eagerly), so that Flower has an activation to show.
    _, durable = build(database_url, redis_url, prefix, eager_start=False)
    run = durable.start("crash.step", 0.1, workflow_id="order-7")
    assert run.result(timeout=30) == ["done on run 1", "after"]

    wanted = {"crash.slow", "crash.after", "durable.activate"}

    def shown() -> dict[str, Any] | None:
        tasks = get(f"{api}/tasks") or {}
        by_name = {t["name"]: t for t in tasks.values() if t.get("state") == "SUCCESS"}
        return by_name if wanted <= set(by_name) else None

    # Steps are listed under their tasks' own names, with the workflow id and step number in
    # the kwargs column; activations under one name, with the workflow's name and id.
    by_name = wait_until(shown, timeout=20, what=f"Flower to show {wanted}")
    step = by_name["crash.slow"]
    assert step["kwargs"] == "{'durable_step': 'order-7#1'}"
    assert step["args"] == "()"
    assert step["uuid"].startswith("order-7:1:")  # a legible task id, unique per message
    assert step["worker"]
    assert by_name["crash.after"]["kwargs"] == "{'durable_step': 'order-7#2'}"
    activation = by_name["durable.activate"]
    assert activation["uuid"].startswith("order-7:activation:")
    assert activation["args"] == "['order-7']"
    assert activation["kwargs"] == "{'workflow': 'crash.step'}"
    # Flower's filter by task name finds the steps.
    filtered = get(f"{api}/tasks?taskname=crash.slow") or {}
    assert {t["name"] for t in filtered.values()} == {"crash.slow"}
    # More runs add no task names: a workflow's tasks, plus one for activations.
    more = [durable.start("crash.step", 0.0, workflow_id=f"order-{n}") for n in (8, 9)]
    assert [r.result(timeout=30)[1] for r in more] == ["after", "after"]
    wait_until(lambda: len(get(f"{api}/tasks") or {}) >= 9, timeout=20, what="Flower's rows")
    assert {t["name"] for t in (get(f"{api}/tasks") or {}).values()} == wanted
