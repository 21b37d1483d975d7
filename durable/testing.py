"""Testing workflows: a real store, an in-process worker, and time skipping.

Use it from pytest by adding ``pytest_plugins = ["durable.testing"]`` to your
``conftest.py``; the fixture ``durable_database_url`` gives a fresh, migrated PostgreSQL
database for the session (the server of ``DURABLE_DATABASE_URL``, one on the default port,
or a throwaway one started from pip-installed binaries). Then run your workflows against
your own ``Durable(app, database_url=..., redis_url=...)`` inside a :class:`TestEnv`::

    def test_returns_window_closes(durable_database_url, durable_redis_url):
        app = Celery("shop", broker=durable_redis_url)
        durable = Durable(app, database_url=durable_database_url, redis_url=durable_redis_url)
        register_my_workflows(durable)
        with TestEnv(durable) as env:
            run = durable.start("orders.returns_window", "o-1")
            assert env.result(run, timeout=10) == "closed"     # a 30-day sleep, skipped

``env.result`` runs the worker until the run ends, skipping time whenever the run is only
waiting for a timer; ``env.advance(timedelta(days=1))`` moves the clock by hand (timers due
within the skipped time fire at once, and ``ctx.now()`` moves with them).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

from celery.contrib.testing.worker import start_worker

from durable import durations
from durable.beat import Beat
from durable.errors import ResultTimeout, WorkflowNotFound
from durable.store import runs as run_queries
from durable.store import timers as timer_queries
from durable.store import tree as tree_queries

if TYPE_CHECKING:
    import pytest

    from durable.client import WorkflowRun
    from durable.dev.services import Services
    from durable.runtime import Durable


class TestEnv:
    """An in-process worker and beat for ``durable``, with a clock tests can move forward."""

    __test__ = False  # not a pytest test class

    def __init__(self, durable: Durable, concurrency: int = 4) -> None:
        self.durable = durable
        self.concurrency = concurrency
        self.skipped = 0.0
        """Seconds the clock has been moved forward so far."""
        self._worker: Any = None
        self._beat = Beat(durable, sweep_interval=0.2)

    def __enter__(self) -> TestEnv:
        self._worker = start_worker(
            self.durable.app,
            pool="threads",
            concurrency=self.concurrency,
            perform_ping_check=False,
            loglevel="WARNING",
        )
        self._worker.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._worker.__exit__(exc_type, exc, tb)

    def advance(self, delta: timedelta | float) -> int:
        """Move the clock forward: fire every timer due within the skipped time."""
        seconds = durations.seconds(delta)
        self.skipped += seconds
        return self._fire_due()

    def _fire_due(self, workflow_id: str | None = None) -> int:
        durable, ahead = self.durable, self.skipped
        due = durable.store(lambda c: timer_queries.timers_due_by(c, ahead, workflow_id))
        if not due:
            return 0
        fired = durable.store(lambda c: timer_queries.fire_timers(c, due))
        for timer in fired:
            durable.after_timer(timer)
        return len(fired)

    def result(self, run: WorkflowRun, timeout: float = 30.0) -> Any:
        """Wait for ``run`` to end, skipping time whenever it only waits for a timer."""
        deadline = time.monotonic() + timeout
        while True:
            status = run.status()
            if status != "running":
                return run.result(timeout=0)
            if time.monotonic() > deadline:
                raise ResultTimeout(run.id, timeout, status)
            self._beat.tick()
            if self._idle(run.id):
                self._skip_to_next_timer(run.id)
            time.sleep(0.01)

    def _idle(self, workflow_id: str) -> bool:
        """Whether the run (and its children) only wait for a timer."""
        row = self.durable.store(lambda c: run_queries.get_run(c, workflow_id))
        if row is None:
            raise WorkflowNotFound(workflow_id)
        busy = self.durable.store(lambda c: tree_queries.has_work_in_flight(c, workflow_id))
        return not busy

    def _skip_to_next_timer(self, workflow_id: str) -> None:
        durable = self.durable
        fire_at = durable.store(lambda c: tree_queries.next_timer_of_tree(c, workflow_id))
        if fire_at is None:
            return
        gap = fire_at.timestamp() - time.time() - self.skipped
        if gap > 0:
            self.skipped += gap
        self._fire_due()


# -- pytest fixtures -------------------------------------------------------------------------


def _fixture(fn: Any) -> Any:
    import pytest

    return pytest.fixture(scope="session")(fn)


@_fixture
def durable_services() -> Iterator[Services]:
    """PostgreSQL and Redis for the test session (found, or started for it)."""
    from durable.dev.services import ensure_services

    services = ensure_services()
    yield services
    services.stop()


@_fixture
def durable_database_url(durable_services: Services) -> Iterator[str]:
    """A fresh database with durable's tables, dropped after the session."""
    from durable.dev.services import create_database, drop_database
    from durable.store import engine as store_engine
    from durable.store.migrate import upgrade

    name = f"durable_test_{uuid.uuid4().hex[:10]}"
    url = create_database(durable_services.database_url, name)
    upgrade(url)
    yield url
    store_engine.dispose_all()
    drop_database(durable_services.database_url, name)


@_fixture
def durable_redis_url(durable_services: Services) -> str:
    """The Redis server of the test session."""
    return durable_services.redis_url


def pytest_configure(config: pytest.Config) -> None:
    """Nothing to configure; present so pytest accepts the module as a plugin."""
