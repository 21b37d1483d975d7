"""Settings, read once from arguments, the environment and the Celery config.

Precedence, highest first, for every setting ``x``:

1. the keyword argument given to ``Durable(app, x=...)``;
2. the environment variable ``DURABLE_X``;
3. the Celery setting ``durable_x`` (``app.conf.durable_x``);
4. the default below.

``redis_url`` has one more source, documented here so it is not a surprise: when none of the
above names it and the Celery broker is a ``redis://`` URL, the broker's server is used.
``database_url`` has no default: without it durable refuses to start.

Nothing is ignored in silence: ``Durable(app, encryption_key=...)`` (a name that is not a
setting) raises :class:`~durable.errors.ConfigurationError` naming the closest setting; a
``DURABLE_*`` variable or ``durable_*`` Celery setting that names none warns
(:class:`ConfigurationWarning`) with the closest; a value that cannot be read as its
setting's type (``inline_activation="maybe"``, a negative, infinite or absurdly long
duration) is refused. The repr of :class:`Settings` masks passwords and keys.
"""

from __future__ import annotations

import difflib
import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from durable.durations import MAX_DURATION
from durable.errors import ConfigurationError
from durable.redaction import MASK, redact


class ConfigurationWarning(UserWarning):
    """A ``DURABLE_*`` variable or ``durable_*`` Celery setting that names no setting."""


@dataclass(frozen=True)
class Settings:
    """Every tunable of durable, with its default."""

    database_url: str
    """PostgreSQL URL; ``postgresql://`` is read as ``postgresql+psycopg://``."""
    redis_url: str
    """Redis server holding the timer index."""
    key_prefix: str = "durable"
    """Prefix of every Redis key durable writes."""
    lease_ttl: timedelta = timedelta(seconds=10)
    """How long a running step or activation stays owned without a heartbeat."""
    redispatch_after: timedelta = timedelta(seconds=10)
    """How long a dispatched message may go unclaimed before it is sent again. A step that
    runs unclaimed on its first delivery (see ``durable.runner``) is claimed at half of it."""
    max_payload_bytes: int = 1024 * 1024
    """Largest encoded argument list, result or payload accepted."""
    workflow_queue: str | None = None
    """Queue of workflow activations (``None``: Celery's default queue)."""
    inline_activation: bool = True
    """Continue the workflow in the process that finished its step (saves a broker hop)."""
    eager_start: bool = True
    """``start()`` runs the workflow's code in the caller, in memory, up to its first
    durable operation, and schedules its first remote steps with the run: one statement and
    one message per start, no activation hop (see ``Durable.start``). Off: the first
    activation, on a worker, runs the code up to there."""
    history_cache_size: int = 256
    """Runs whose history a worker process keeps between two of their steps, so that the
    next step's claim need not read it again (0: keep none; see ``durable.histories``)."""
    connect_retries: int = 3
    """Attempts to reach PostgreSQL before giving up with a clear error."""
    pool_size: int = 10
    """Most PostgreSQL connections one process holds in its pool (the result-wait listener
    holds one more; see ``docs/operations.md``). A thread that finds all in use waits."""
    database_pooler: str | None = None
    """``"pgbouncer"`` when ``database_url`` names a PgBouncer in transaction mode: no
    prepared statements, no session settings, result waits poll instead of ``LISTEN``."""
    leader_ttl: timedelta = timedelta(seconds=10)
    """Life of the beat leader's Redis lock, renewed every third of it: a stand-by beat
    takes over within this (plus a second) of the leader's death."""
    schedule_grace: timedelta = timedelta(seconds=60)
    """How late a schedule's fire may be and still count as on time rather than missed."""
    schedule_catchup_limit: int = 100
    """Most missed fires one catch-up of policy ``all`` starts (the newest ones)."""
    max_steps: int = 10_000
    """Most positions (steps, sleeps, waits, events, children) one run may record."""
    max_signals: int = 10_000
    """Most signals one run may receive in all."""
    max_signals_per_minute: int = 600
    """Most signals one run may receive in any minute."""
    retention: timedelta | None = None
    """Finished runs older than this are purged by ``durable beat`` (with their steps,
    history, signals and events); None keeps everything."""
    encryption_keys: str | None = None
    """Comma-separated Fernet keys: payloads are encrypted with the first, decrypted with any
    (used when ``Durable(app, codec=...)`` is not given)."""
    compress_min_bytes: int = 0
    """Compress payloads of at least this many bytes (0: never; used without ``codec=``)."""
    encode_errors: bool = True
    """With a codec, encode the message of every error a step or workflow raised, as stored
    and logged (its exception's type stays readable); false keeps messages in plain text."""

    def __repr__(self) -> str:
        shown = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in _URLS and isinstance(value, str):
                value = redact(value)
            elif field.name in _SECRETS and value is not None:
                value = MASK
            shown.append(f"{field.name}={value!r}")
        return f"Settings({', '.join(shown)})"

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between lease renewals: a third of the lease."""
        return self.lease_ttl.total_seconds() / 3


_DURATIONS = {"lease_ttl", "redispatch_after", "leader_ttl", "schedule_grace", "retention"}
_INTS = {
    "max_payload_bytes",
    "connect_retries",
    "pool_size",
    "schedule_catchup_limit",
    "compress_min_bytes",
    "history_cache_size",
    "max_steps",
    "max_signals",
    "max_signals_per_minute",
}
# Settings that must be positive (durations: longer than zero; counts: at least one).
_POSITIVE = {
    "lease_ttl",
    "retention",
    "leader_ttl",
    "max_payload_bytes",
    "connect_retries",
    "pool_size",
    "schedule_catchup_limit",
    "max_steps",
    "max_signals",
    "max_signals_per_minute",
}
_BOOLS = {"inline_activation", "eager_start", "encode_errors"}
_STRINGS = {
    "database_url",
    "redis_url",
    "key_prefix",
    "workflow_queue",
    "encryption_keys",
    "database_pooler",
}
POOLERS = ("pgbouncer",)
"""Values of ``database_pooler`` (besides None: a direct connection)."""
_URLS = {"database_url", "redis_url"}
_SECRETS = {"encryption_keys"}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# Largest count a setting accepts (PostgreSQL's integer).
MAX_INT = 2**31 - 1
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
# DURABLE_* variables that are not settings: the CLI's (DURABLE_APP and, for each command,
# DURABLE_<COMMAND>_<OPTION>), the test suite's and the development services'.
_OTHER_VARIABLES = ("APP", "TEST", "PROBE_")
_CLI_COMMANDS = (
    "DB_", "BEAT_", "START_", "LIST_", "SHOW_", "SIGNAL_", "CANCEL_", "RESUME_", "RETRY_",
    "FORK_", "PURGE_", "TIMERS_", "RECONCILE_", "SCHEDULE_",
)  # fmt: skip
_warned: set[str] = set()


def setting_names() -> list[str]:
    """The name of every setting."""
    return [field.name for field in fields(Settings)]


def _closest(name: str, names: Iterable[str]) -> str:
    found = difflib.get_close_matches(name, list(names), n=1, cutoff=0.6)
    return f"; did you mean {found[0]!r}?" if found else ""


def check_names(overrides: dict[str, Any]) -> None:
    """Refuse keyword settings that name no setting, naming the closest one.

    Raises:
        ConfigurationError: ``overrides`` holds a name that is not a setting.
    """
    known = setting_names()
    for name in overrides:
        if name not in known:
            raise ConfigurationError(f"unknown setting {name!r}{_closest(name, known)}")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, ConfigurationWarning, stacklevel=4)


def warn_unknown_sources(conf: Any = None) -> None:
    """Warn of each ``DURABLE_*`` variable and ``durable_*`` Celery setting that names none."""
    known = {name.upper() for name in setting_names()}
    for var in os.environ:
        if not var.startswith("DURABLE_"):
            continue
        name = var[len("DURABLE_") :]
        if name in known or name.startswith(_OTHER_VARIABLES + _CLI_COMMANDS):
            continue
        hint = _closest(name, known).replace("'", "'DURABLE_", 1)
        _warn_once(f"durable: environment variable {var} is not a setting, ignored{hint}")
    keys = getattr(conf, "keys", None)
    for key in list(keys()) if callable(keys) else []:
        if isinstance(key, str) and key.startswith("durable_") and key[8:].upper() not in known:
            hint = _closest(key, [f"durable_{n.lower()}" for n in known])
            _warn_once(f"durable: Celery setting {key} is not a setting, ignored{hint}")


def normalise_database_url(url: str) -> str:
    """Return ``url`` with the psycopg 3 driver named, as SQLAlchemy needs it."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if not url.startswith("postgresql+"):
        scheme = url.partition("://")[0][:20] if "://" in url else redact(url)[:20]
        raise ConfigurationError(f"database_url must be a PostgreSQL URL, not {scheme!r}")
    return url


def _check_urls(values: dict[str, Any]) -> None:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        make_url(values["database_url"])
    except (ArgumentError, ValueError):
        raise ConfigurationError(
            f"database_url is not a valid URL: {redact(values['database_url'])}"
        ) from None
    if not values["redis_url"].startswith(REDIS_SCHEMES):
        scheme = values["redis_url"].partition("://")[0][:20]
        raise ConfigurationError(
            f"redis_url must be a redis://, rediss:// or unix:// URL, not {scheme!r}"
        )


def _coerce(name: str, value: Any) -> Any:
    coerced = _convert(name, value)
    if name in _POSITIVE and coerced <= (timedelta(0) if name in _DURATIONS else 0):
        raise ConfigurationError(f"setting {name}: {value!r} must be positive")
    if name in _DURATIONS and coerced < timedelta(0):
        raise ConfigurationError(f"setting {name}: {value!r} must not be negative")
    if name in _INTS and coerced < 0:
        raise ConfigurationError(f"setting {name}: {value!r} must not be negative")
    return coerced


def _convert(name: str, value: Any) -> Any:
    try:
        if name in _DURATIONS:
            return _duration(value)
        if name in _INTS:
            return _integer(value)
        if name in _BOOLS:
            return _boolean(value)
    except (TypeError, ValueError, OverflowError) as exc:
        shown = redact(str(value))[:80]
        raise ConfigurationError(f"setting {name}: cannot read {shown!r} ({exc})") from None
    if name in _STRINGS and not isinstance(value, str):
        raise ConfigurationError(f"setting {name}: must be text, not {type(value).__name__}")
    if name == "database_pooler" and value.strip().lower() not in POOLERS:
        shown = redact(value)[:40]
        raise ConfigurationError(f"setting database_pooler: {shown!r} is not one of {POOLERS}")
    return value.strip().lower() if name == "database_pooler" else value


def _duration(value: Any) -> timedelta:
    if isinstance(value, bool):
        raise TypeError("a duration, not a boolean")
    if not isinstance(value, timedelta):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise ValueError("not a finite number of seconds")
        if abs(seconds) > MAX_DURATION.total_seconds():
            raise ValueError(f"longer than {MAX_DURATION.days} days")
        value = timedelta(seconds=seconds)
    duration: timedelta = value
    if abs(duration) > MAX_DURATION:
        raise ValueError(f"longer than {MAX_DURATION.days} days")
    return duration


def _integer(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError("a whole number")
    number = int(str(value).strip()) if isinstance(value, str) else int(value)
    if number > MAX_INT:
        raise ValueError(f"more than {MAX_INT}")
    return number


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE | _FALSE:
        return text in _TRUE
    raise ValueError("expected true/false, yes/no, on/off or 1/0")


def read_setting(name: str, conf: Any = None) -> Any:
    """One setting from ``DURABLE_<NAME>``, else the Celery config ``conf``, else its default.

    For commands that need a setting or two of the store without loading an app.
    """
    env = os.environ.get(f"DURABLE_{name.upper()}")
    if env not in (None, ""):
        return _coerce(name, env)
    conf_value = conf.get(f"durable_{name}") if conf is not None else None
    if conf_value is not None:
        return _coerce(name, conf_value)
    return next(f.default for f in fields(Settings) if f.name == name)


def load_settings(conf: Any = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from ``overrides``, ``DURABLE_*`` and the Celery config ``conf``."""
    check_names(overrides)
    warn_unknown_sources(conf)
    values: dict[str, Any] = {}
    for field in fields(Settings):
        name = field.name
        env = os.environ.get(f"DURABLE_{name.upper()}")
        conf_value = conf.get(f"durable_{name}") if conf is not None else None
        if overrides.get(name) is not None:
            values[name] = _coerce(name, overrides[name])
        elif env not in (None, ""):
            values[name] = _coerce(name, env)
        elif conf_value is not None:
            values[name] = _coerce(name, conf_value)
    if "redis_url" not in values:
        broker = str(conf.get("broker_url") or "") if conf is not None else ""
        broker = broker or os.environ.get("CELERY_BROKER_URL", "")
        if broker.startswith(("redis://", "rediss://")):
            values["redis_url"] = broker
    for required in ("database_url", "redis_url"):
        if required not in values:
            raise ConfigurationError(
                f"no {required}: set DURABLE_{required.upper()} or pass {required}= to Durable()"
            )
    values["database_url"] = normalise_database_url(values["database_url"])
    _check_urls(values)
    return Settings(**values)
