"""(g) DBOS steps, to compare with durable's local steps (``pip install -e '.[bench]'``).

DBOS Transact runs a workflow in the caller's process and checkpoints each ``@DBOS.step`` in
its system database. It is a process-wide singleton, so it runs in a child process,
``python -m bench.dbos_steps URL STEPS RUNS``, which prints the seconds of each run as JSON.
Its system database is a throwaway database on the bench's PostgreSQL server, dropped
afterwards. The workflow is the same as ``bench.local``: ``x = step(x)`` ``STEPS`` times,
with a step that adds one.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

from bench.common import ROOT, psycopg_url
from durable.dev.services import Services, create_database, drop_database

STEPS, RUNS = 200, 5
TIMEOUT = 120.0


@dataclass
class Dbos:
    """Seconds of each DBOS run of ``steps`` steps, or why DBOS was not measured."""

    steps: int
    seconds: list[float] = field(default_factory=list)
    version: str = ""
    missing: str = ""


def measure(services: Services, steps: int = STEPS, runs: int = RUNS) -> Dbos:
    """Run DBOS in a child process on a throwaway database."""
    if importlib.util.find_spec("dbos") is None:
        return Dbos(steps, missing="not installed (pip install -e '.[bench]')")
    name = f"durable_bench_dbos_{uuid.uuid4().hex[:10]}"
    url = create_database(services.database_url, name)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.dbos_steps", psycopg_url(url), str(steps), str(runs)],
            cwd=ROOT,
            capture_output=True,
            timeout=TIMEOUT,
            check=False,
        )
    finally:
        drop_database(services.database_url, name)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
        return Dbos(steps, missing="failed: " + " / ".join(tail))
    report = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return Dbos(steps, report["seconds"], report["version"])


def main(argv: list[str]) -> int:
    """In the child: launch DBOS, warm up, time ``RUNS`` workflows, print JSON."""
    import logging
    from importlib.metadata import version

    from dbos import DBOS

    url, steps, runs = argv[0], int(argv[1]), int(argv[2])
    DBOS(config={"name": "durable-bench", "system_database_url": url, "log_level": "WARNING"})
    logging.getLogger("dbos").setLevel(logging.WARNING)

    @DBOS.step()
    def increment(x: int) -> int:
        return x + 1

    @DBOS.workflow()
    def local_steps(n: int) -> int:
        x = 0
        for _ in range(n):
            x = increment(x)
        return x

    DBOS.launch()
    try:
        local_steps(20)
        seconds = []
        for _ in range(runs):
            started = time.perf_counter()
            if local_steps(steps) != steps:
                raise RuntimeError(f"the DBOS workflow of {steps} steps did not return {steps}")
            seconds.append(time.perf_counter() - started)
    finally:
        DBOS.destroy()
    print(json.dumps({"seconds": seconds, "version": version("dbos")}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
