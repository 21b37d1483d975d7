"""The public object: ``Durable(app)``, its workflow registry, ``start`` and ``WorkflowRun``."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from celery import Celery
from celery.canvas import Signature
from sqlalchemy import Connection

from durable import activation as activation_mod
from durable import builtins, durations, ids, messaging, timeouts, worker
from durable.canvas import DurableChain
from durable.codec import codec_from_settings
from durable.config import Settings, check_names, load_settings
from durable.context import Effects
from durable.errors import (
    ConfigurationError,
    ResultTimeout,
    UnknownWorkflow,
    WorkflowCancelled,
    WorkflowFailed,
    WorkflowIdConflict,
    WorkflowNotFound,
)
from durable.histories import HistoryCache
from durable.liveness import Heartbeat
from durable.serialization import decode, encode
from durable.store import engine as store_engine
from durable.store import runs
from durable.store.timers import FiredTimer
from durable.timers import TimerIndex

if TYPE_CHECKING:
    from durable.scheduler import Schedules

log = logging.getLogger(__name__)

ACTIVATE_TASK = "durable.activate"
STEP_TASK = "durable.step"
ROUTING_KEYS = ("queue", "routing_key", "exchange", "priority")
TIME_LIMIT_GRACE = 5.0
# Characters a Celery task id may not carry legibly into Flower's links and search.
_NOT_IN_TASK_ID = re.compile(r"[^\w.:@/-]")


def task_id(workflow_id: str, what: str) -> str:
    """A legible, unique Celery task id: ``<workflow id>:<what>:<8 hex>``.

    ``what`` is the step number or ``activation``; the suffix tells two messages for the
    same step (a re-send, a retry) apart. Characters that would break Flower's links become
    ``_``. Example: ``order-o-1:3:5f2a9c1e``.
    """
    return f"{_NOT_IN_TASK_ID.sub('_', workflow_id)}:{what}:{uuid.uuid4().hex[:8]}"


"""Seconds between a step's soft time limit (its ``timeout``) and Celery's hard kill."""

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class Durable:
    """Durable execution for an existing Celery app.

    Example::

        app = Celery("shop")
        durable = Durable(app)          # database_url= / redis_url= or DURABLE_* env

        @durable.workflow("orders.fulfill")
        def fulfill(ctx, order_id):
            return ctx.step(charge_card, order_id)

        run = durable.start("orders.fulfill", "o-1", workflow_id="order-o-1")
        run.result(timeout=60)

    Creating it registers two tasks on ``app`` (``durable.activate`` runs workflow code,
    ``durable.step`` runs a step as the user's task), so the user's ordinary
    ``celery -A app worker`` runs workflows with nothing new to deploy.
    """

    def __init__(
        self,
        app: Celery,
        *,
        database_url: str | None = None,
        redis_url: str | None = None,
        codec: Any = None,
        **settings: Any,
    ) -> None:
        check_names(settings)  # a misspelt setting must not be ignored in silence
        self.app = app
        self._codec = codec
        self._overrides = {"database_url": database_url, "redis_url": redis_url, **settings}
        self._settings: Settings | None = None
        self.registry: dict[str, Callable[..., Any]] = {}
        self.execution_timeouts: dict[str, float | None] = {}
        self._heartbeat: Heartbeat | None = None
        self._index: TimerIndex | None = None
        self._histories: HistoryCache | None = None
        self._register_tasks()
        builtins.register(self)
        app._durable = self  # type: ignore[attr-defined]

    @classmethod
    def of(cls, app: Celery) -> Durable:
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
            self._settings = load_settings(self.app.conf, **self._overrides)
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
    def timer_index(self) -> TimerIndex:
        """The Redis index of durable timers."""
        if self._index is None:
            self._index = TimerIndex(self.settings.redis_url, self.settings.key_prefix)
        return self._index

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
        never for a result (see :func:`durable.store.engine.get_engine`).
        """
        url = self.settings.database_url

        def attempt() -> T:
            with store_engine.autocommit(url, flush).connect() as conn:
                return fn(conn)

        return store_engine.with_retry(url, attempt, self.settings.connect_retries)

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

    def _renew_leases(self, owner: str) -> int:
        ttl = self.settings.lease_ttl.total_seconds()
        return self.store(lambda c: runs.renew_leases(c, owner, ttl), flush=False)

    # -- registration -------------------------------------------------------------------------

    def workflow(
        self, name: str | None = None, *, execution_timeout: timedelta | float | None = None
    ) -> Callable[[F], F]:
        """Register a function as a workflow under ``name`` (default: module.qualname).

        Example::

            @durable.workflow("orders.fulfill")
            def fulfill(ctx, order_id: str) -> dict:
                order = ctx.step(validate_order, order_id)
                return {"order": order}

        The function receives the workflow context first, then the arguments given to
        :meth:`start`. It must be deterministic: anything that reads the world (time,
        randomness, I/O) belongs in a step or in ``ctx.now()``/``ctx.uuid4()``/``ctx.random()``.
        With ``execution_timeout`` a run that has not ended that long after its start is
        failed (``execution timeout exceeded``) and its child workflows cancelled.
        """
        timeout = durations.optional_seconds("execution_timeout", execution_timeout, positive=True)

        def register(fn: F) -> F:
            key = name or f"{fn.__module__}.{fn.__qualname__}"
            existing = self.registry.get(key)
            if existing is not None and existing is not fn:
                same = getattr(existing, "__qualname__", None) == fn.__qualname__
                if not (same and existing.__module__ == fn.__module__):
                    raise ValueError(f"workflow name {key!r} is already registered")
            self.registry[key] = fn
            self.execution_timeouts[key] = timeout
            fn.__durable_name__ = key  # type: ignore[attr-defined]
            return fn

        return register

    def _register_tasks(self) -> None:
        durable = self

        @self.app.task(
            name=ACTIVATE_TASK, acks_late=True, ignore_result=True, shared=False, typing=False
        )
        def activate(workflow_id: str) -> str:
            return activation_mod.activate(durable, workflow_id)

        @self.app.task(
            name=STEP_TASK,
            bind=True,
            acks_late=True,
            ignore_result=True,
            shared=False,
            typing=False,
        )
        def step(self: Any, workflow_id: str, seq: int) -> str:
            request = self.request
            fresh = worker.first_delivery(
                durable,
                getattr(request, worker.SENT_AT_HEADER, None),
                bool((request.delivery_info or {}).get("redelivered")),
            )
            return worker.execute_step(durable, workflow_id, seq, fresh=fresh)

    # -- starting and reading runs --------------------------------------------------------

    def workflow_name(self, name_or_fn: str | Callable[..., Any]) -> str:
        """The registered name of a workflow given by name or by function."""
        name = name_or_fn if isinstance(name_or_fn, str) else None
        if name is None:
            name = getattr(name_or_fn, "__durable_name__", None)
        if name is None or name not in self.registry:
            shown = name or getattr(name_or_fn, "__qualname__", repr(name_or_fn))
            raise UnknownWorkflow(str(shown), list(self.registry))
        return name

    def start(
        self,
        name_or_fn: str | Callable[..., Any],
        *args: Any,
        workflow_id: str | None = None,
        **kwargs: Any,
    ) -> WorkflowRun:
        """Start a workflow, or return the existing run when ``workflow_id`` is taken.

        Example::

            run = durable.start("orders.fulfill", "o-1", workflow_id="order-o-1")

        Arguments must be JSON-serialisable and within ``max_payload_bytes``; otherwise
        :class:`~durable.errors.PayloadError` is raised and nothing is written. The run is
        committed before its first message is sent; if the broker cannot be reached the
        run still starts, sent again by ``durable beat``'s recovery sweep.

        With the setting ``eager_start`` the workflow's code runs here, in memory, up to its
        first durable operation; if that is one or more remote steps they are scheduled in
        the statement that creates the run and sent at once, saving the first activation's
        broker hop (anything else starts the run as usual).
        """
        name = self.workflow_name(name_or_fn)
        if workflow_id is not None:
            ids.check_id(workflow_id)
        args_json = self.encode(list(args), f"arguments of workflow {name}")
        kwargs_json = self.encode(kwargs, f"keyword arguments of workflow {name}")
        wid = workflow_id or uuid.uuid4().hex
        timeout = self.execution_timeouts.get(name)
        eager = None
        if self.settings.eager_start:
            eager = self._replay_new_run(wid, name, args_json, kwargs_json)
        steps = None
        if eager is not None:
            steps = "[" + ",".join(step.as_json() for step in eager.effects.schedules) + "]"
        inserted = self.store(
            lambda c: runs.insert_run(c, wid, name, args_json, kwargs_json, timeout, steps)
        )
        created = inserted.created
        if inserted.timer:
            self.index_timers([inserted.timer])
        existing = None if created else self.store(lambda c: runs.get_run(c, wid))
        if existing is not None and existing.name != name:
            raise WorkflowIdConflict(wid, existing.name, name)
        if created and eager is not None:
            self.apply_effects(eager.effects)  # the first steps' messages, no activation
        elif created:
            self.send_activation(wid, name)
        return WorkflowRun(self, wid)

    def _replay_new_run(
        self, workflow_id: str, name: str, args: str, kwargs: str
    ) -> activation_mod.Replayed | None:
        try:
            return activation_mod.replay_new_run(self, workflow_id, name, args, kwargs)
        except Exception:
            log.exception("durable: eager start of %s failed; activating it", workflow_id)
            return None

    def run(self, workflow_id: str) -> WorkflowRun:
        """A handle on an existing run; raises :class:`WorkflowNotFound` if there is none."""
        ids.check_id(workflow_id)
        if self.store(lambda c: runs.get_run(c, workflow_id)) is None:
            raise WorkflowNotFound(workflow_id)
        return WorkflowRun(self, workflow_id)

    @property
    def schedules(self) -> Schedules:
        """Schedules from Python: ``durable.schedules.add("nightly", workflow=..., cron=...)``.

        See :class:`durable.scheduler.Schedules` and ``docs/scheduling.md``.
        """
        from durable.scheduler import Schedules

        return Schedules(self)

    def chain(self, *signatures: Signature[Any]) -> DurableChain:
        """A Celery chain made durable: ``durable.chain(a.s(1), b.s()).start(workflow_id=...)``.

        Each link runs as a checkpointed step; results pass as Celery passes them.
        """
        return DurableChain(self, signatures)

    def group(self, *signatures: Any) -> DurableChain:
        """A Celery group made durable: ``durable.group(a.s(1), a.s(2)).start(...)``."""
        return DurableChain.of_group(self, signatures)

    def chord(self, header: Any, body: Signature[Any]) -> DurableChain:
        """A Celery chord made durable: ``durable.chord([a.s(1), a.s(2)], b.s()).start(...)``."""
        return DurableChain.of_chord(self, header, body)

    # -- talking to running workflows ------------------------------------------------------

    def signal(self, workflow_id: str, name: str, payload: Any = None) -> None:
        """Send signal ``name`` with a JSON ``payload`` to a running workflow.

        Example::

            durable.signal("order-o-1", "shipped", {"carrier": "ups"})

        The signal is stored before this returns, so it survives any crash, and is delivered
        to the workflow's ``ctx.wait_for_signal(name)`` (now or later), oldest first.
        Raises :class:`WorkflowNotFound` or :class:`WorkflowNotRunning`.
        """
        ids.check_id(workflow_id)
        ids.check_id(name, "signal name")
        messaging.signal(self, workflow_id, name, payload)

    def get_event(
        self, workflow_id: str, key: str, timeout: timedelta | float | None = None
    ) -> Any:
        """The latest value a workflow published with ``ctx.set_event(key, ...)``, or None.

        With ``timeout`` (seconds or a timedelta) wait up to that long for the key to be set.
        """
        ids.check_id(workflow_id)
        ids.check_id(key, "event key")
        return messaging.get_event(self, workflow_id, key, timeout)

    def cancel(self, workflow_id: str) -> None:
        """Cancel a running workflow and its child workflows.

        The workflow receives :class:`WorkflowCancelled` at its next step, sleep or signal
        wait, may run compensation in ``except``/``finally``, and ends ``cancelled``.
        """
        ids.check_id(workflow_id)
        messaging.cancel(self, workflow_id)

    # -- dispatching ----------------------------------------------------------------------

    def send_activation(self, workflow_id: str, name: str | None = None) -> None:
        """Ask a worker to replay the run; a failed send is logged and left to recovery."""
        options: dict[str, Any] = {"shadow": f"workflow {name or ''}[{workflow_id}]".strip()}
        if self.settings.workflow_queue:
            options["queue"] = self.settings.workflow_queue
        options["task_id"] = task_id(workflow_id, "activation")
        self._send(ACTIVATE_TASK, [workflow_id], options)

    def send_step(
        self,
        workflow_id: str,
        seq: int,
        name: str,
        options: dict[str, Any] | None = None,
        first: bool = False,
    ) -> None:
        """Send a step message, routed like the user's task ``name`` would be.

        ``first``: this is the step's first dispatch, right after the statement that wrote
        the step; the message then carries its send time (``durable.worker.first_delivery``).
        """
        options = options or {}
        send: dict[str, Any] = {k: options[k] for k in ROUTING_KEYS if options.get(k) is not None}
        send["route_name"] = name
        send["shadow"] = options.get("label") or f"{name}[{workflow_id}#{seq}]"
        send["argsrepr"] = repr((workflow_id, seq))
        send["task_id"] = task_id(workflow_id, str(seq))
        timeout = options.get("timeout")
        if timeout:
            # Celery's own limits stop the body where the pool can (prefork); the beat's
            # deadline sweep fails the attempt either way.
            send["soft_time_limit"] = float(timeout)
            send["time_limit"] = float(timeout) + TIME_LIMIT_GRACE
        if first:
            send["headers"] = {worker.SENT_AT_HEADER: time.time()}
        self._send(STEP_TASK, [workflow_id, seq], send)

    def _send(self, task: str, args: list[Any], options: dict[str, Any]) -> None:
        try:
            # JSON whatever the app's default serializer: durable never sends pickle.
            self.app.send_task(task, args=args, ignore_result=True, serializer="json", **options)
        except Exception as exc:  # the commit stands; recovery sends it again
            cause = " ".join(str(exc).split())[:200] or type(exc).__name__  # one line
            log.warning(
                "durable: could not send %s%r (%s); durable beat will send it", task, args, cause
            )

    def apply_effects(self, effects: Effects, first: bool = False) -> None:
        """After an activation's commits: index its timers, send its messages.

        ``first``: the steps were just written by this process (see ``send_step``).
        """
        if effects.timers:
            self.index_timers(effects.timers)
        for pending in effects.dispatches:
            self.send_step(effects.workflow_id, pending.seq, pending.name, pending.options, first)
        for workflow_id in effects.activations:
            self.send_activation(workflow_id, effects.names.get(workflow_id))

    def after_timer(self, timer: FiredTimer) -> None:
        """Send what a timer fired by ``durable beat`` made due."""
        timeouts.after_timer(self, timer)

    def enforce_step_deadlines(self) -> int:
        """Fail the attempts of steps running past their ``timeout`` (run by the beat)."""
        return timeouts.enforce_step_deadlines(self)

    def index_timers(self, timers: list[tuple[int, float]]) -> None:
        """Add committed timers to the Redis index; PostgreSQL sweeps cover a failure here."""
        if not timers:
            return
        try:
            for timer_id, fire_at in timers:
                self.timer_index.add(timer_id, fire_at)
        except Exception:
            log.warning("durable: could not index timers %r; the sweep will fire them", timers)

    def replay_in_memory(
        self, run: runs.Activation, seq: int, result: str | None, error: str | None, attempts: int
    ) -> activation_mod.Replayed | None:
        """The run's next steps once step ``seq`` settles, worked out without writing.

        See :func:`durable.activation.replay_in_memory`; None when an activation is needed.
        """
        try:
            return activation_mod.replay_in_memory(self, run, seq, result, error, attempts)
        except Exception:
            log.exception("durable: in-memory replay of %s failed; activating it", run.workflow_id)
            return None

    def continue_workflow(
        self, workflow_id: str, owner: str | None = None, leased: Any = None
    ) -> None:
        """Replay the run in this process now, as the step that woke it just finished."""
        try:
            activation_mod.activate(self, workflow_id, owner, leased)
        except Exception:
            log.exception("durable: inline activation of %s failed; sending it", workflow_id)
            self.send_activation(workflow_id, getattr(leased, "name", None))


class WorkflowRun:
    """A handle on one workflow run: ``run.id``, ``run.status()``, ``run.result()``."""

    def __init__(self, durable: Durable, workflow_id: str) -> None:
        self._durable = durable
        self.id = workflow_id
        """The run's workflow id."""

    def __repr__(self) -> str:
        return f"WorkflowRun({self.id!r})"

    def _row(self) -> Any:
        row = self._durable.store(lambda c: runs.get_run(c, self.id))
        if row is None:
            raise WorkflowNotFound(self.id)
        return row

    def status(self) -> str:
        """``running``, ``completed``, ``failed`` or ``cancelled``."""
        return str(self._row().status)

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to end and return its result.

        Raises :class:`~durable.errors.WorkflowFailed` or ``WorkflowCancelled`` when it
        did not complete, and :class:`~durable.errors.ResultTimeout` (a ``TimeoutError``)
        after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            row = self._row()
            if row.status == "completed":
                return self._durable.decode(row.result)
            if row.status == "failed":
                raise WorkflowFailed(self.id, row.error or "")
            if row.status == "cancelled":
                raise WorkflowCancelled(self.id)
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(self.id, float(timeout or 0), row.status)
            pause = delay if deadline is None else min(delay, max(deadline - time.monotonic(), 0))
            time.sleep(pause)
            delay = min(delay * 1.5, 0.25)
