"""The core every layer of the engine stands on: settings, payloads, the store, the outbox.

A :class:`Core` holds what one process needs to advance workflows, built lazily from the
Celery app's config so that it can be set after ``Durable(app)``:

- the settings (:mod:`durable.config`) and the payload codec, with ``encode``/``decode``;
- connections to the store (``store``, ``transaction``, ``connect``), retried on failure;
- the lease heartbeat, the history cache and the Redis index of timers;
- the workflow registry (name to function, and each workflow's execution timeout);
- the outbox: ``send_step``, ``send_activation``, ``apply_effects``, ``index_timers`` and
  ``admit`` (steps under a limit, admitted then sent; the buckets of rates, ``rate_buckets``),
  the one way a message leaves the process (the message itself is built by
  :mod:`durable.dispatch`).

Everything in the engine (the workflow context, activations, the step runner, the client
verbs) takes a ``Core``; :class:`durable.runtime.Durable` is the ``Core`` a user creates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from celery import Celery
from sqlalchemy import Connection

from durable import dispatch
from durable.codec import codec_from_settings
from durable.config import Settings, load_settings
from durable.effects import Effects
from durable.errors import ConfigurationError, UnknownWorkflow
from durable.histories import HistoryCache
from durable.limits import Limit
from durable.liveness import Heartbeat
from durable.rate import RateBuckets
from durable.serialization import decode, encode, open_error, readable_error, seal_error
from durable.store import engine as store_engine
from durable.store import limits as limit_queries
from durable.store import run_limits, runs
from durable.timer_index import TimerIndex

log = logging.getLogger(__name__)

T = TypeVar("T")


def limit_key(options: dict[str, Any]) -> limit_queries.LimitKey:
    """The key to admit of a limited step's stored options (``durable.limits``)."""
    limit = options["limit"]
    return str(limit["name"]), str(limit["key"]), limit.get("concurrency"), limit.get("interval")


class Core:
    """Settings, store, heartbeat, caches, the workflow registry and the outbox of an app."""

    def __init__(self, app: Celery, codec: Any = None, **overrides: Any) -> None:
        self.app = app
        self._codec = codec
        self._overrides = overrides
        self._settings: Settings | None = None
        self.registry: dict[str, Callable[..., Any]] = {}
        """Registered workflows by name."""
        self.execution_timeouts: dict[str, float | None] = {}
        """Each registered workflow's execution timeout in seconds (None: none)."""
        self.workflow_limits: dict[str, Limit] = {}
        """The concurrency limit of each registered workflow that declares one."""
        self._heartbeat: Heartbeat | None = None
        self._index: TimerIndex | None = None
        self._rates: RateBuckets | None = None
        self._histories: HistoryCache | None = None
        app._durable = self  # type: ignore[attr-defined]

    @classmethod
    def of(cls, app: Celery) -> Core:
        """The ``Durable`` created for ``app``; raises ``ConfigurationError`` if none was."""
        found = getattr(app, "_durable", None)
        if not isinstance(found, cls):
            raise ConfigurationError(f"no Durable(app) was created for the Celery app {app.main!r}")
        return found

    # -- configuration, read lazily so that the Celery config can be set after Durable() ----

    @property
    def settings(self) -> Settings:
        """The effective settings (see :mod:`durable.config` for their precedence)."""
        if self._settings is None:
            settings = load_settings(self.app.conf, **self._overrides)
            store_engine.configure(
                settings.database_url, settings.pool_size, settings.database_pooler
            )
            self._settings = settings
        return self._settings

    @property
    def codec(self) -> Any:
        """The payload codec: ``codec=`` if given, else built from the settings, else None."""
        if self._codec is None:
            self._codec = codec_from_settings(self.settings) or False
        return self._codec or None

    def encode(self, value: Any, what: str) -> str:
        """``value`` as stored or sent: JSON, checked against the size limit, then encoded."""
        return encode(value, what, self.settings.max_payload_bytes, self.codec)

    def decode(self, value: Any) -> Any:
        """A stored value as read back, opened if the codec encoded it."""
        return decode(value, self.codec)

    def seal_error(self, error: str) -> str:
        """An error as stored: its message encoded when a codec is set and ``encode_errors``."""
        return seal_error(error, self.codec if self.settings.encode_errors else None)

    @property
    def seals_errors(self) -> bool:
        """Whether stored errors have their messages encoded (a codec and ``encode_errors``)."""
        return self.codec is not None and self.settings.encode_errors

    def open_error(self, error: str) -> str:
        """A stored error with its message opened; ``CodecUnavailable`` if it cannot be."""
        return open_error(error, self.codec)

    def readable_error(self, error: str) -> str:
        """A stored error opened if this process can, else with ``<encrypted>`` for its message."""
        return readable_error(error, self.codec)

    @property
    def histories(self) -> HistoryCache:
        """Histories of the runs this process advanced (see :mod:`durable.histories`)."""
        if self._histories is None:
            self._histories = HistoryCache(self.settings.history_cache_size)
        return self._histories

    @property
    def heartbeat(self) -> Heartbeat:
        """This process's lease renewer."""
        if self._heartbeat is None:
            interval = self.settings.heartbeat_interval
            self._heartbeat = Heartbeat(self._renew_leases, interval)
        return self._heartbeat

    @property
    def rate_buckets(self) -> RateBuckets:
        """The Redis buckets of rate limits."""
        if self._rates is None:
            self._rates = RateBuckets(self.settings.redis_url, self.settings.key_prefix)
        return self._rates

    @property
    def timer_index(self) -> TimerIndex:
        """The Redis index of durable timers."""
        if self._index is None:
            self._index = TimerIndex(self.settings.redis_url, self.settings.key_prefix)
        return self._index

    # -- the store ----------------------------------------------------------------------------

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """An autocommit connection to the store: each statement commits on its own."""
        url = self.settings.database_url
        engine = store_engine.autocommit(url)
        conn = store_engine.with_retry(url, engine.connect, self.settings.connect_retries)
        try:
            yield conn
        finally:
            conn.close()

    def store(self, fn: Callable[[Connection], T], flush: bool = True) -> T:
        """Run ``fn`` on an autocommit connection, retrying if the connection fails.

        ``fn`` must be safe to run twice (every store statement is, by its WHERE clause or
        ON CONFLICT); after ``connect_retries`` attempts ``StoreUnavailable`` is raised.
        ``flush=False`` does not wait for the commit to reach the disk: only for writes whose
        loss in a PostgreSQL crash the recovery sweep repairs (a claim, a lease, a schedule),
        never for a result (see :func:`durable.store.engine.autocommit`).
        """
        url = self.settings.database_url

        def attempt() -> T:
            with store_engine.autocommit(url, flush).connect() as conn:
                return fn(conn)

        return store_engine.with_retry(url, attempt, self.settings.connect_retries)

    def atomically(self, fn: Callable[[Connection], T]) -> T:
        """Run ``fn`` in one transaction, retried whole if the connection fails."""

        def attempt() -> T:
            with self.transaction() as conn:
                return fn(conn)

        return store_engine.with_retry(
            self.settings.database_url, attempt, self.settings.connect_retries
        )

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection inside one transaction, committed at the end of the block."""
        url = self.settings.database_url
        engine = store_engine.get_engine(url)
        conn = store_engine.with_retry(url, engine.connect, self.settings.connect_retries)
        try:
            with conn.begin():
                yield conn
        finally:
            conn.close()

    def _renew_leases(self, tokens: list[str]) -> int:
        ttl = self.settings.lease_ttl.total_seconds()
        return self.store(lambda c: runs.renew_leases(c, tokens, ttl), flush=False)

    # -- the workflow registry ----------------------------------------------------------------

    def register_workflow(
        self,
        name: str,
        fn: Callable[..., Any],
        timeout: float | None,
        limit: Limit | None = None,
    ) -> None:
        """Register ``fn`` under ``name``; the same function registered again is harmless.

        ``limit``: the concurrency limit of its runs (checked: concurrency only).
        """
        if limit is not None:
            limit.check_for_workflow()
        existing = self.registry.get(name)
        if existing is not None and existing is not fn:
            same = getattr(existing, "__qualname__", None) == fn.__qualname__
            if not (same and existing.__module__ == fn.__module__):
                raise ValueError(f"workflow name {name!r} is already registered")
        self.registry[name] = fn
        self.execution_timeouts[name] = timeout
        if limit is not None:
            self.workflow_limits[name] = limit
        else:
            self.workflow_limits.pop(name, None)
        fn.__durable_name__ = name  # type: ignore[attr-defined]

    def workflow_name(self, name_or_fn: str | Callable[..., Any]) -> str:
        """The registered name of a workflow given by name or by function."""
        name = name_or_fn if isinstance(name_or_fn, str) else None
        if name is None:
            name = getattr(name_or_fn, "__durable_name__", None)
        if name is None or name not in self.registry:
            shown = name or getattr(name_or_fn, "__qualname__", repr(name_or_fn))
            raise UnknownWorkflow(str(shown), list(self.registry))
        return name

    # -- the outbox ---------------------------------------------------------------------------

    def send_activation(self, workflow_id: str, name: str | None = None) -> None:
        """Ask a worker to replay the run; a failed send is logged and left to recovery."""
        options = dispatch.activation_options(workflow_id, name, self.settings.workflow_queue)
        self._send(dispatch.ACTIVATE_TASK, [workflow_id], options)

    def send_step(
        self,
        workflow_id: str,
        seq: int,
        name: str,
        options: dict[str, Any] | None = None,
        first: bool = False,
    ) -> None:
        """Send a step message: the task ``name``'s own, whose one argument is a label.

        ``first``: this is the step's first dispatch, right after the statement that wrote
        it, and the step is its run's one open position; the message then carries its send
        time, and its first delivery may run the step unclaimed (see :mod:`durable.runner`).
        """
        send = dispatch.step_options(workflow_id, seq, name, options or {}, first)
        label = {dispatch.STEP_KWARG: dispatch.step_label(workflow_id, seq)}
        self._send(name, [], send, label)

    def apply_many(self, effects: list[Effects], activations: list[tuple[str, str]]) -> None:
        """Send the messages of many starts at once, on one producer (one broker connection).

        ``effects``: eager starts' first steps; ``activations``: (workflow id, name) of runs
        started by an activation.
        """
        try:
            limited = [
                limit_key(pending.options)
                for each in effects
                for pending in each.dispatches
                if "limit" in pending.options
            ]
            if limited:
                self.admit(limited)
            with self.app.producer_or_acquire() as producer:
                for each in effects:
                    alone = len(each.schedules) == 1  # may run unclaimed (durable.runner)
                    for pending in each.dispatches:
                        if "limit" in pending.options:
                            continue
                        options = dispatch.step_options(
                            each.workflow_id, pending.seq, pending.name, pending.options, alone
                        )
                        label = {
                            dispatch.STEP_KWARG: dispatch.step_label(each.workflow_id, pending.seq)
                        }
                        self._send(pending.name, [], {**options, "producer": producer}, label)
                for workflow_id, name in activations:
                    options = dispatch.activation_options(
                        workflow_id, name, self.settings.workflow_queue
                    )
                    self._send(
                        dispatch.ACTIVATE_TASK, [workflow_id], {**options, "producer": producer}
                    )
        except Exception:  # no broker connection: the runs are committed; recovery sends them
            log.exception(
                "durable: could not send the messages of %d starts", len(effects) + len(activations)
            )

    def _send(
        self,
        task: str,
        args: list[Any],
        options: dict[str, Any],
        kwargs: dict[str, Any] | None = None,
    ) -> None:
        try:
            # JSON whatever the app's default serializer: durable never sends pickle.
            self.app.send_task(task, args=args, kwargs=kwargs, serializer="json", **options)
        except Exception as exc:  # the commit stands; recovery sends it again
            cause = " ".join(str(exc).split())[:200] or type(exc).__name__  # one line
            log.warning(
                "durable: could not send %s%r (%s); durable beat will send it", task, args, cause
            )

    def apply_effects(self, effects: Effects, first: bool = False) -> None:
        """After an activation's commits: index its timers, send its messages.

        ``first``: the one step was just written by this process, alone (see ``send_step``).
        """
        if effects.timers:
            self.index_timers(effects.timers)
        limited = []
        for pending in effects.dispatches:
            if "limit" in pending.options:
                limited.append(limit_key(pending.options))
                continue
            self.send_step(effects.workflow_id, pending.seq, pending.name, pending.options, first)
        if limited:
            self.admit(limited)
        for workflow_id in effects.activations:
            self.send_activation(workflow_id, effects.names.get(workflow_id))

    def admit(self, keys: list[limit_queries.LimitKey]) -> int:
        """Admit and send the queued steps that fit under each key; returns how many.

        Called after the commit that queued steps or freed slots; a failure is logged and
        left to the beat's sweep, which admits every key with queued steps and room.
        """
        url, sent = self.settings.database_url, 0
        for each in dict.fromkeys(keys):

            def attempt(each: limit_queries.LimitKey = each) -> Any:
                with self.transaction() as conn:
                    return self._admit(conn, each)

            try:
                admitted, timer = store_engine.with_retry(
                    url, attempt, self.settings.connect_retries
                )
            except Exception as exc:
                log.warning("durable: could not admit %s/%s (%s); the sweep will", *each[:2], exc)
                continue
            if timer is not None:
                self.index_timers([timer])
            for d in admitted:
                self.send_step(d.workflow_id, d.seq, d.name, d.options)
            sent += len(admitted)
        return sent

    def admit_runs(self, keys: list[run_limits.RunKey]) -> int:
        """Admit the queued runs that fit under each key and send their activations.

        Called after a commit that freed run slots outside an admission's transaction; a
        failure is logged and left to the beat's sweep. Returns how many were admitted.
        """
        sent = 0
        for name, key in dict.fromkeys(keys):

            def admit(conn: Connection, name: str = name, key: str = key) -> list[tuple[str, str]]:
                return run_limits.admit(conn, name, key)

            try:
                admitted = self.atomically(admit)
            except Exception as exc:
                log.warning("durable: could not admit runs of %s/%s (%s)", name, key, exc)
                continue
            self.send_activations(admitted)
            sent += len(admitted)
        return sent

    def send_activations(self, runs_to_start: list[tuple[str, str]]) -> None:
        """Send each (workflow id, name) its activation: runs just admitted."""
        for workflow_id, name in runs_to_start:
            self.send_activation(workflow_id, name)

    def finish_run(
        self,
        workflow_id: str,
        owner: str,
        status: str,
        result: str | None = None,
        error: str | None = None,
        limited: bool = False,
    ) -> runs.Finished:
        """End a run (``runs.finish``); a limited run's freed slot admits the next queued.

        ``limited`` (the workflow declares a limit): the end and the admission of its key
        share one transaction. Otherwise the end commits alone, and admits after its commit
        if the run turns out to hold a slot (a limit since removed from the code). The
        admitted runs' activations are sent after the commit.
        """
        if not limited:
            done = self.store(lambda c: runs.finish(c, workflow_id, owner, status, result, error))
            if done.limit:
                self.admit_runs([done.limit])
            return done

        def end(conn: Connection) -> tuple[runs.Finished, list[tuple[str, str]]]:
            done = runs.finish(conn, workflow_id, owner, status, result, error)
            admitted = run_limits.admit(conn, *done.limit) if done.limit else []
            return done, admitted

        ended, admitted = self.atomically(end)
        self.send_activations(admitted)
        return ended

    def _admit(
        self, conn: Connection, each: limit_queries.LimitKey
    ) -> tuple[list[Any], tuple[int, float] | None]:
        """One key's admission, in ``conn``'s transaction: (steps admitted, timer to index).

        Under a rate the steps that fit also need a start from the key's bucket; when the
        bucket has none, a durable timer admits the key again when the next one is free.
        """
        name, key, declared, interval = each
        if interval is None:
            return limit_queries.admit(conn, name, key, declared), None
        picked, override = limit_queries.candidates(conn, name, key, declared, interval)
        if not picked:
            return [], None
        spacing = override if override is not None else interval  # durable limits set --rate
        granted, wait = self.rate_buckets.take(name, key, spacing, len(picked))
        admitted = limit_queries.mark_admitted(conn, picked[:granted])
        timer = None
        if granted < len(picked):
            timer = limit_queries.admit_later(conn, picked[granted], wait)
        return admitted, timer

    def index_timers(self, timers: list[tuple[int, float]]) -> None:
        """Add committed timers to the Redis index; PostgreSQL sweeps cover a failure here."""
        if not timers:
            return
        try:
            for timer_id, fire_at in timers:
                self.timer_index.add(timer_id, fire_at)
        except Exception:
            log.warning("durable: could not index timers %r; the sweep will fire them", timers)
