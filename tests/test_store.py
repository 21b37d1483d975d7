"""The schema: models and migrations agree; the public names are pinned."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import OperationalError, ProgrammingError

import durable
from durable.store import engine as store_engine
from durable.store.migrate import VERSION_TABLE, alembic_config, upgrade
from durable.store.models import metadata
from durable.store.statement import first_row, statement


def test_models_and_migrations_agree(database_url: str) -> None:
    with store_engine.get_engine(database_url).connect() as conn:
        # Only durable's own tables: example apps keep theirs in the same test database.
        context = MigrationContext.configure(
            conn,
            opts={
                "version_table": VERSION_TABLE,
                "include_name": lambda name, type_, parents: (
                    type_ != "table" or str(name).startswith("durable_")
                ),
            },
        )
        diff = compare_metadata(context, metadata)
    assert diff == []


def test_upgrade_is_idempotent(database_url: str) -> None:
    upgrade(database_url)
    upgrade(database_url)
    with store_engine.get_engine(database_url).connect() as conn:
        version = conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalar_one()
    head = ScriptDirectory.from_config(alembic_config(database_url)).get_current_head()
    assert version == head


def test_public_names_are_pinned() -> None:
    assert sorted(durable.__all__) == sorted(
        [
            "ConfigurationError",
            "Durable",
            "DurableError",
            "InvalidAttributes",
            "InvalidLimit",
            "Limit",
            "LimitExceeded",
            "LimitKeyError",
            "NonDeterminismError",
            "PayloadError",
            "ResultTimeout",
            "RetryPolicy",
            "SignalTimeout",
            "StepFailed",
            "StepInfo",
            "StoreUnavailable",
            "UnknownWorkflow",
            "WorkflowCancelled",
            "WorkflowContext",
            "WorkflowFailed",
            "WorkflowIdConflict",
            "WorkflowNotFound",
            "WorkflowNotRunning",
            "WorkflowRun",
            "current_step",
        ]
    )
    for name in durable.__all__:
        assert getattr(durable, name) is not None


def test_values_are_written_with_keys_in_jsonb_order(database_url: str) -> None:
    """What durable writes reads back from a jsonb column unchanged, keys included."""
    from sqlalchemy import text

    from durable.serialization import dumps

    value = {
        "zz": 1,
        "a": {"ccc": [{"y": 1, "x": 2}], "bb": None},
        7: "int key",
        "é": "two bytes",
        "mm": [{"b": True, "a": 1.5}],
        "": "empty",
    }
    written = dumps(value, "a test value", 1 << 20)
    with store_engine.autocommit(database_url).connect() as conn:
        read = conn.execute(text("SELECT CAST(:v AS jsonb)"), {"v": written}).scalar()
    assert json.dumps(read, ensure_ascii=False, separators=(",", ":")) == written


def test_the_package_list_ships_every_package_and_the_migrations() -> None:
    """pyproject lists packages by hand (for the alembic/ mapping): none may be missing."""
    import tomllib

    root = Path(__file__).resolve().parent.parent
    config = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(init.parent.relative_to(root).parts)
        for init in root.glob("durable/**/__init__.py")
    }
    assert on_disk <= listed, on_disk - listed
    mapped = root / config["package-dir"]["durable.store.alembic"]
    assert (mapped / "env.py").is_file()
    shipped = config["package-data"]["durable.store.alembic.versions"]
    assert all(
        any(script.match(pattern) for pattern in shipped)
        for script in (mapped / "versions").glob("*.py")
    )


def test_an_installed_package_finds_its_own_migrations(tmp_path: Path) -> None:
    """Laid out as a wheel installs it, the package uses durable/store/alembic."""
    root = Path(__file__).resolve().parent.parent
    shutil.copytree(
        root / "durable", tmp_path / "durable", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(root / "alembic", tmp_path / "durable" / "store" / "alembic")
    code = "from durable.store.migrate import script_location; print(script_location())"
    found = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(found) == tmp_path / "durable" / "store" / "alembic"


def test_a_statement_sent_on_the_driver_fails_as_sqlalchemy_would(database_url: str) -> None:
    """``first_row``: a lost connection is invalidated and retried; SQL errors keep their kind."""
    engine = store_engine.autocommit(database_url)
    with engine.connect() as conn:
        row = first_row(conn, statement("SELECT CAST(:x AS int) + 1 AS y"), {"x": 41})
        assert row is not None and row.y == 42
        with pytest.raises(ProgrammingError) as missing:
            first_row(conn, statement("SELECT 1 FROM durable_nowhere WHERE 1 = :x"), {"x": 1})
        assert getattr(missing.value.orig, "sqlstate", None) == "42P01"
        assert first_row(conn, statement("SELECT :x AS x"), {"x": "still usable"}).x == (
            "still usable"
        )
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
        with engine.connect() as other:
            pooled = other.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(OperationalError) as lost:
            first_row(conn, statement("SELECT :x AS x"), {"x": 1})
        assert lost.value.connection_invalidated
    # The pool was replaced with the lost connection (a restart takes them all).
    with engine.connect() as fresh:
        assert fresh.exec_driver_sql("SELECT pg_backend_pid()").scalar_one() != pooled

    # Through the store's retry, a connection that dies is replaced and the statement runs.
    calls: list[int] = []

    def once_killed() -> Any:
        with engine.connect() as conn:
            if not calls:
                pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
                with engine.connect() as other:
                    other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            calls.append(1)
            return first_row(conn, statement("SELECT :x AS x"), {"x": "again"})

    assert store_engine.with_retry(database_url, once_killed, delay=0.01).x == "again"
    assert len(calls) == 2


def test_a_statement_inside_a_transaction_is_the_transaction_s(database_url: str) -> None:
    """Off autocommit, ``first_row`` goes through SQLAlchemy: a rollback takes it back."""
    engine = store_engine.get_engine(database_url)
    wid = f"tx-{uuid.uuid4().hex[:8]}"
    insert = statement(
        "INSERT INTO durable_workflows (id, name, status, args, kwargs)"
        " VALUES (:id, 'wf.tx', 'running', '[]', '{}') RETURNING id"
    )
    with engine.connect() as conn:
        with conn.begin() as tx:
            assert first_row(conn, insert, {"id": wid}).id == wid
            tx.rollback()
        assert (
            conn.execute(
                text("SELECT count(*) FROM durable_workflows WHERE id = :id"), {"id": wid}
            ).scalar_one()
            == 0
        )
