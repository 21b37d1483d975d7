"""Every ```python block of README.md and docs/*.md runs, against the real services.

One test per block, named ``file:line``. A document is read like a notebook: a block runs
after the document's earlier runnable blocks (which define the app, the tasks and the
workflows it uses), in one fresh namespace per test, with the environment pointing durable
and Celery at the test's PostgreSQL and Redis (``DURABLE_DATABASE_URL``,
``DURABLE_REDIS_URL``, ``CELERY_BROKER_URL``, which Celery prefers to a ``broker=`` in the
code, and a key prefix of the test's own). An HTML comment on the line before a block says
more about it:

- ``<!-- example: setup NAME ... -->``: run the named set-ups of :data:`SETUPS` first (a run
  the block signals, a module it imports, names it uses from the surrounding text);
- ``<!-- example: alone -->``: run without the document's earlier blocks;
- ``<!-- example: file NAME -->``: a file of a project the document builds, written under
  its name with the document's earlier files and imported; ``file NAME; pytest`` then runs
  pytest on them, on the test session's servers;
- ``<!-- example: not run: REASON -->``: a fragment shown inside a larger example, or code
  that needs what a test cannot give it; it must still compile (unless the marker also has
  a part ``not-python WHY``: a file of another kind shown in the block);
- ``then CALL``: after the block, make the call the text says the code is for.

A block without a comment runs. A new block that fails makes this test fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import celery._state as celery_state
import pytest
from celery import Celery, shared_task
from celery.contrib.testing.worker import start_worker

from durable import Durable
from durable.activation import activate
from durable.client import WorkflowRun
from durable.dev.services import Services, start_private_redis
from tests.conftest import ROOT, clean_tables

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!-- example: (?P<what>.*?) -->$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    source: str
    marker: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def not_run(self) -> str | None:
        return (
            self.marker[len("not run:") :].strip() if self.marker.startswith("not run:") else None
        )

    def part(self, word: str) -> list[str]:
        """The words after ``word`` in the marker's part that starts with it."""
        for part in self.marker.split(";"):
            words = part.split()
            if words and words[0] == word:
                return words[1:]
        return []

    def rest(self, word: str) -> str:
        """The text after ``word`` in the marker's part that starts with it."""
        for part in self.marker.split(";"):
            if part.split()[:1] == [word]:
                return part.strip()[len(word) :].strip()
        return ""

    @property
    def setups(self) -> list[str]:
        return self.part("setup")

    @property
    def raises(self) -> str | None:
        found = self.part("raises")
        return found[0] if found else None

    @property
    def alone(self) -> bool:
        return any(part.strip() == "alone" for part in self.marker.split(";"))


def read_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() != "```python":
            i += 1
            continue
        start = i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        match = MARKER.match(before.strip())
        # A block inside a list item is indented as the item is: read it as written.
        source = textwrap.dedent("\n".join(lines[start + 1 : end])) + "\n"
        found.append(Block(path, start + 1, source, match["what"] if match else ""))
        i = end + 1
    return found


ALL = [block for path in DOCS for block in read_blocks(path)]


# -- set-ups: what the text around a block says exists -----------------------------------------


def _module(name: str, **attrs: Any) -> None:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module


def _start(workflow: str, workflow_id: str, *args: Any) -> Callable[[dict[str, Any]], None]:
    """A run the block acts on, taken by one activation to its first wait."""

    def setup(ns: dict[str, Any]) -> None:
        ns["durable"].start(workflow, *args, workflow_id=workflow_id)
        activate(ns["durable"], workflow_id)

    return setup


def _nothing(*args: Any, **kwargs: Any) -> None:
    """The body of a task the text only names."""


def _undefined_tasks(*names: str) -> Callable[[dict[str, Any]], None]:
    """Tasks the text mentions but the block does not define, on every app."""

    def setup(ns: dict[str, Any]) -> None:
        for name in names:
            ns.setdefault(name, shared_task(name=f"docs.{name}")(_nothing))

    return setup


class _Service:
    """A stand-in for a service the text's tasks call (payments, the catalogue)."""

    def charge(self, cents: int, idempotency_key: str | None = None) -> str:
        return f"txn-{idempotency_key}"

    def total_cents(self, order_id: str) -> int:
        return 1200


def _shop(ns: dict[str, Any]) -> None:
    """What the README's example leaves out: its other tasks and the services they call."""
    _undefined_tasks("reserve_stock", "release_stock", "refund", "ask_for_review")(ns)
    ns["payments"] = ns["catalogue"] = _Service()
    ns["CardDeclined"] = type("CardDeclined", (Exception,), {})


def _worker(ns: dict[str, Any]) -> None:
    """A worker for the block's app, started at its first wait for a result (by then the
    block has defined its tasks and workflows)."""
    original = WorkflowRun.result

    def result(run: WorkflowRun, *args: Any, **kwargs: Any) -> Any:
        app = run._core.app
        if app not in _WORKERS:
            _WORKERS[app] = _STACK.enter_context(
                start_worker(app, pool="threads", concurrency=4, perform_ping_check=False)
            )
        return original(run, *args, **kwargs)

    _PATCH.setattr(WorkflowRun, "result", result)


def _app(ns: dict[str, Any]) -> None:
    """The user's Celery ``app`` the text says the block runs in."""
    ns["app"] = Celery("shop")


def _durable(ns: dict[str, Any]) -> None:
    """``app`` and its ``durable``."""
    _app(ns)
    ns["durable"] = Durable(ns["app"])


def _shop_package(ns: dict[str, Any]) -> None:
    """The ``shop`` package the migration guide imports: ``shop.app``, ``shop.tasks``."""
    _durable(ns)
    app = ns["app"]
    _module("shop", __path__=[])
    _module("shop.app", app=app, durable=ns["durable"])
    names = ("validate", "charge", "ship")
    _module("shop.tasks", **{n: app.task(name=f"shop.{n}")(_nothing) for n in names})


def _tasks(*names: str) -> Callable[[dict[str, Any]], None]:
    """Tasks of the app the text names and the block uses."""

    def setup(ns: dict[str, Any]) -> None:
        for name in names:
            ns[name] = ns["app"].task(name=f"docs.{name}")(_nothing)

    return setup


def _errors(*names: str) -> Callable[[dict[str, Any]], None]:
    def setup(ns: dict[str, Any]) -> None:
        for name in names:
            ns[name] = type(name, (Exception,), {})

    return setup


def _values(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda ns: ns.update(values)


def _names(ns: dict[str, Any]) -> None:
    """The imports the text shows elsewhere."""
    exec(
        "from datetime import datetime, timedelta\nfrom zoneinfo import ZoneInfo\n"
        "from durable import *\n",
        ns,
    )


def _crontab(ns: dict[str, Any]) -> None:
    """Celery's names the text's Celery code imports."""
    exec("from celery import chain, group\nfrom celery.schedules import crontab\n", ns)


def _keys(ns: dict[str, Any]) -> None:
    """Two Fernet keys, as ``python -m durable.codec`` prints them."""
    from cryptography.fernet import Fernet

    ns.update(new_key=Fernet.generate_key().decode(), old_key=Fernet.generate_key().decode())


def _scheduled(ns: dict[str, Any]) -> None:
    """The workflows the text's schedules start."""
    durable = ns["durable"]

    @durable.workflow("reports.nightly")
    def nightly(ctx: Any, region: str) -> str:
        return region

    @durable.workflow("ops.ping")
    def ping(ctx: Any) -> str:
        return "pong"


SETUPS: dict[str, Callable[[dict[str, Any]], None]] = {
    "app": _app,
    "durable": _durable,
    "crontab": _crontab,
    "shop-package": _shop_package,
    "order-tasks": _tasks("validate", "charge", "ship"),
    "digest-tasks": _tasks("summarise", "combine"),
    "digest": _values(chunks=["a", "b"], doc_id="doc-1"),
    "onboarding-tasks": _tasks("send_welcome", "send_reminder"),
    "report-tasks": _tasks("collect_sales", "collect_failed_orders", "store_report", "send_report"),
    "reminder": _values(user_id="u-1", remind_at=datetime(2030, 1, 1, tzinfo=UTC)),
    "order": _values(order_id="o-1"),
    "services": _values(payments=_Service(), db=_Service(), warehouse=_Service()),
    "report-errors": _errors("RendererBusy", "WebhookBusy"),
    "scheduled": _scheduled,
    "names": _names,
    "keys": _keys,
    "shop": _shop,
    "worker": _worker,
    "ship-o-1": _start("orders.ship", "ship-o-1", "o-1", "ann@example.com"),
    "track-o-1": _start("orders.track", "track-o-1", "o-1"),
    "checkout-o-1": _start("orders.checkout", "checkout-o-1", "o-1", ["mug"], 1200),
}


# -- the test --------------------------------------------------------------------------------


_MODULES = {"shop", "subscriptions"}
"""Top-level modules the set-ups make; forgotten after each test."""
_STACK = contextlib.ExitStack()
_WORKERS: dict[Any, Any] = {}
_PATCH = pytest.MonkeyPatch()


@pytest.fixture
def doc_env(database_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    clean_tables(database_url)
    # A Redis of the test's own: the blocks' apps use Celery's default queue names.
    url, stop = start_private_redis()
    monkeypatch.setenv("DURABLE_DATABASE_URL", database_url)
    monkeypatch.setenv("DURABLE_REDIS_URL", url)
    monkeypatch.setenv("DURABLE_KEY_PREFIX", prefix)
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    modules = set(sys.modules)
    finalizers = set(celery_state._on_app_finalizers)
    try:
        yield
    finally:
        # The README's shared tasks must not reach the apps of later tests.
        celery_state._on_app_finalizers.intersection_update(finalizers)
        _PATCH.undo()
        _STACK.close()
        _WORKERS.clear()
        for name in set(sys.modules) - modules:
            if name.startswith("docs_") or name.split(".")[0] in _MODULES:
                sys.modules.pop(name, None)
        stop()


def run_block(block: Block, ns: dict[str, Any]) -> None:
    for name in block.setups:
        SETUPS[name](ns)
    exec(compile(block.source, block.name, "exec"), ns)
    if block.rest("then"):
        eval(block.rest("then"), ns)  # what the text says the code is for: call it


def feeds(block: Block) -> bool:
    """Whether the block runs before the document's later blocks, as part of the story."""
    runs = block.not_run is None and block.raises is None
    return runs and not block.alone and not block.part("file")


def write_files(block: Block, into: Path) -> None:
    """Write the document's file blocks up to ``block`` into ``into``, by their names."""
    for each in ALL:
        if each.path == block.path and each.line <= block.line and each.part("file"):
            (into / each.part("file")[0]).write_text(each.source)


def run_pytest(into: Path, services: Services) -> None:
    """Run the written test files with pytest, on the test session's servers."""
    env = {**os.environ, **services.environ(), "PYTHONPATH": str(into)}
    for name in ("DURABLE_DATABASE_URL", "DURABLE_REDIS_URL", "CELERY_BROKER_URL"):
        env.pop(name, None)  # the example's conftest sets them from durable.testing
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(into)],
        cwd=into,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("block", ALL, ids=[b.name for b in ALL])
def test_the_example_runs(block: Block, doc_env: None, tmp_path: Path, services: Services) -> None:
    if block.not_run is not None:
        assert block.not_run, f"{block.name}: say why the block is not run"
        if not block.part("not-python"):
            compile(block.source, block.name, "exec")  # a fragment must still be Python
        return
    if block.part("file"):  # a file of a project the document builds
        write_files(block, tmp_path)
        if any(part.strip() == "pytest" for part in block.marker.split(";")):
            run_pytest(tmp_path, services)
            return
        sys.path.insert(0, str(tmp_path))
        try:
            run_block(block, {"__name__": block.part("file")[0].removesuffix(".py")})
        finally:
            sys.path.remove(str(tmp_path))
        return
    ns: dict[str, Any] = {"__name__": f"docs_{block.path.stem}"}
    if not block.alone:
        for earlier in ALL:
            if earlier.path == block.path and earlier.line < block.line and feeds(earlier):
                run_block(earlier, ns)
    if block.raises is None:
        run_block(block, ns)
        return
    with pytest.raises(Exception) as raised:
        run_block(block, ns)
    assert type(raised.value).__name__ == block.raises, raised.value
