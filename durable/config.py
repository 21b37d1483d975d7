"""Settings, read once from arguments, the environment and the Celery config.

Precedence, highest first, for every setting ``x``:

1. the keyword argument given to ``Durable(app, x=...)``;
2. the environment variable ``DURABLE_X``;
3. the Celery setting ``durable_x`` (``app.conf.durable_x``);
4. the default below.

``redis_url`` has one more source, documented here so it is not a surprise: when none of the
above names it and the Celery broker is a ``redis://`` URL, the broker's server is used.
``database_url`` has no default: without it durable refuses to start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from datetime import timedelta
from typing import Any

from durable.errors import ConfigurationError


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

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between lease renewals: a third of the lease."""
        return self.lease_ttl.total_seconds() / 3


_DURATIONS = {"lease_ttl", "redispatch_after", "leader_ttl", "schedule_grace", "retention"}
_INTS = {
    "max_payload_bytes",
    "connect_retries",
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
    "schedule_catchup_limit",
    "max_steps",
    "max_signals",
    "max_signals_per_minute",
}
_BOOLS = {"inline_activation", "eager_start"}


def normalise_database_url(url: str) -> str:
    """Return ``url`` with the psycopg 3 driver named, as SQLAlchemy needs it."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    if not url.startswith("postgresql+"):
        scheme = url.partition("://")[0] or url[:20]
        raise ConfigurationError(f"database_url must be a PostgreSQL URL, not {scheme!r}")
    return url


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
            return value if isinstance(value, timedelta) else timedelta(seconds=float(value))
        if name in _INTS:
            return int(value)
        if name in _BOOLS:
            if isinstance(value, bool):
                return value
            return str(value).strip().lower() in {"1", "true", "yes", "on"}
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"setting {name}: cannot read {value!r} ({exc})") from None
    return value


def load_settings(conf: Any = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from ``overrides``, ``DURABLE_*`` and the Celery config ``conf``."""
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
    return Settings(**values)
