"""Applying the Alembic migrations in ``alembic/`` (``durable db upgrade``)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

from durable.config import normalise_database_url
from durable.errors import ConfigurationError

VERSION_TABLE = "durable_alembic_version"


def script_location() -> Path:
    """The folder holding the migration scripts.

    In an installed wheel they are the package ``durable.store.alembic``; in a checkout (or
    an editable install) the repository's ``alembic/`` folder.
    """
    here = Path(__file__).resolve().parent
    for candidate in (here / "alembic", here.parent.parent / "alembic"):
        if (candidate / "env.py").is_file() and (candidate / "versions").is_dir():
            return candidate
    raise ConfigurationError("the durable migration scripts (alembic/) are not installed")


def alembic_config(database_url: str) -> Config:
    """An Alembic config for the store at ``database_url``."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Bring the store's schema to ``revision``; ``postgresql://`` URLs are accepted."""
    command.upgrade(alembic_config(normalise_database_url(database_url)), revision)
