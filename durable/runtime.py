"""The public object: ``Durable(app)``, the facade over the engine.

``Durable`` is the :class:`~durable.core.Core` a user creates. On top of the core it
registers ``durable.activate`` (its body is :func:`durable.activation.activate`), lets the
app's own tasks run the step messages sent under their names (:mod:`durable.stepmessage`),
keeps ``durable.step`` for step messages of earlier versions, registers the built-in
workflows, and it forwards the public verbs to the modules that implement them:
:mod:`durable.client` (``start``, ``run``, ``signal``, ``get_event``, ``cancel``),
:mod:`durable.canvas` (``chain``, ``group``, ``chord``), :mod:`durable.admin` (``pause``,
``unpause``) and :mod:`durable.scheduler` (``schedules``). Nothing below this module imports
it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from celery import Celery
from celery.canvas import Signature

from durable import (
    activation,
    admin,
    builtin_workflows,
    client,
    deadlines,
    dispatch,
    durations,
    ids,
    runner,
    stepmessage,
)
from durable.admin import RunInfo
from durable.attributes import AttributeFilter
from durable.canvas import DurableChain
from durable.client import WorkflowRun
from durable.config import check_names
from durable.core import Core
from durable.limits import Limit
from durable.scheduler import Schedules
from durable.store.timers import FiredTimer

F = TypeVar("F", bound=Callable[..., Any])

STATUSES = ("running", "completed", "failed", "cancelled")
"""The statuses a run can be in."""


class Durable(Core):
    """Durable execution for an existing Celery app.

    Example::

        app = Celery("shop")
        durable = Durable(app)          # database_url= / redis_url= or DURABLE_* env

        @durable.workflow("orders.fulfill")
        def fulfill(ctx, order_id):
            return ctx.step(charge_card, order_id)

        run = durable.start("orders.fulfill", "o-1", workflow_id="order-o-1")
        run.result(timeout=60)

    Creating it registers the task ``durable.activate`` (it runs workflow code) on ``app``
    and, when a worker of ``app`` starts, lets each of the app's tasks run the steps sent as
    its own messages (:mod:`durable.stepmessage`), so the user's ordinary
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
        super().__init__(app, codec, database_url=database_url, redis_url=redis_url, **settings)
        _register_tasks(self)
        stepmessage.install(self)
        builtin_workflows.register(self)

    @classmethod
    def of(cls, app: Celery) -> Durable:
        """The ``Durable`` created for ``app``; raises ``ConfigurationError`` if none was."""
        found = super().of(app)
        assert isinstance(found, Durable)
        return found

    def workflow(
        self,
        name: str | None = None,
        *,
        execution_timeout: timedelta | float | None = None,
        limit: Limit | None = None,
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

        With ``limit`` (a :class:`~durable.limits.Limit` with a concurrency, no rate) at most
        that many runs of a key run at once, the key computed from the start's arguments;
        a run over it is written ``queued`` and admitted, highest ``priority`` then oldest
        first, when a run of its key ends. Example::

            @durable.workflow("reports.build", limit=Limit("reports", 2, key=lambda t: t))
            def build(ctx, tenant: str) -> dict: ...
        """
        timeout = durations.optional_checked("execution_timeout", execution_timeout, positive=True)
        if limit is not None and not isinstance(limit, Limit):
            raise TypeError(f"workflow: limit must be a durable.Limit, not {limit!r:.60}")
        if limit is not None:
            limit.check_for_workflow()

        def register(fn: F) -> F:
            full = name or f"{fn.__module__}.{fn.__qualname__}"
            self.register_workflow(full, fn, timeout, limit)
            return fn

        return register

    # -- starting and reading runs --------------------------------------------------------

    def start(
        self,
        name_or_fn: str | Callable[..., Any],
        *args: Any,
        workflow_id: str | None = None,
        start_at: datetime | None = None,
        countdown: timedelta | float | None = None,
        debounce: timedelta | float | None = None,
        debounce_max: timedelta | float | None = None,
        attributes: Mapping[str, Any] | None = None,
        priority: int | None = None,
        **kwargs: Any,
    ) -> WorkflowRun:
        """Start a workflow, or return the existing run when ``workflow_id`` is taken.

        Example::

            run = durable.start("orders.fulfill", "o-1", workflow_id="order-o-1",
                                attributes={"customer": 42})
            durable.start("reports.build", "acme", countdown=timedelta(hours=1))
            durable.start("search.reindex", "acme", workflow_id="reindex-acme",
                          debounce=timedelta(seconds=30))

        Arguments must be JSON-serialisable and within ``max_payload_bytes``; otherwise
        :class:`~durable.errors.PayloadError` is raised and nothing is written.

        Args:
            name_or_fn: The workflow's registered name, or its function.
            *args: Its positional arguments.
            workflow_id: The run's id (default: random); an id that exists returns its run.
            attributes: Searchable attributes stored on the run (JSON scalars under keys, see
                :mod:`durable.attributes`) for ``list_runs`` and ``durable list --attr`` to
                find it by; bad ones raise :class:`~durable.errors.InvalidAttributes`.
            start_at: Start at this time (timezone-aware), by a durable timer.
            countdown: Start this long from now (seconds or a timedelta), likewise.
            debounce: Start this long after the last call with this ``workflow_id``: a call
                while the run waits for its start replaces its arguments and pushes the start
                back; once it has started or ended, the call returns it unchanged.
            debounce_max: With ``debounce``: start at the latest this long after the first
                call, however often it is pushed back.
            priority: For a workflow declared with a ``limit``: the run's place in its key's
                queue (highest first; default 0). Any other workflow receives it as its own
                keyword argument, as it always has.
            **kwargs: Its keyword arguments.

        See :func:`durable.client.start` and :mod:`durable.delayed`.
        """
        if workflow_id is not None:
            ids.check_id(workflow_id)
        return client.start(
            self,
            name_or_fn,
            *args,
            workflow_id=workflow_id,
            attributes=attributes,
            start_at=start_at,
            countdown=countdown,
            debounce=debounce,
            debounce_max=debounce_max,
            priority=priority,
            **kwargs,
        )

    def start_many(
        self,
        name_or_fn: str | Callable[..., Any],
        args_list: Sequence[Sequence[Any]],
        *,
        workflow_ids: Sequence[str | None] | None = None,
        kwargs_list: Sequence[dict[str, Any]] | None = None,
        start_at: datetime | None = None,
        countdown: timedelta | float | None = None,
        attributes_list: Sequence[Mapping[str, Any] | None] | None = None,
    ) -> list[WorkflowRun]:
        """Start many runs of one workflow in one statement; idempotent per id like ``start``.

        Example::

            runs = durable.start_many("orders.fulfill", [("o-1",), ("o-2",)],
                                      workflow_ids=["order-o-1", "order-o-2"])

        ``start_at`` or ``countdown`` delays every run to that one start time, as
        :meth:`start` does. See :func:`durable.client.start_many`.
        """
        return client.start_many(
            self,
            name_or_fn,
            args_list,
            workflow_ids=workflow_ids,
            kwargs_list=kwargs_list,
            start_at=start_at,
            countdown=countdown,
            attributes_list=attributes_list,
        )

    def run(self, workflow_id: str) -> WorkflowRun:
        """A handle on an existing run; raises :class:`WorkflowNotFound` if there is none."""
        ids.check_id(workflow_id)
        return client.run(self, workflow_id)

    def list_runs(
        self,
        *,
        status: str | None = None,
        name: str | None = None,
        since: datetime | timedelta | None = None,
        waiting: str | None = None,
        paused: bool = False,
        attributes: Mapping[str, Any] | Sequence[AttributeFilter | str] | None = None,
        limit: int = 50,
    ) -> list[RunInfo]:
        """Runs, newest first, as ``durable list`` shows them: the same filters, typed records.

        Example::

            for run in durable.list_runs(status="running", attributes={"customer": 42}):
                print(run.id, run.attributes, run.waiting)
            big = durable.list_runs(attributes=["amount>=100", "due<2026-12-01T00:00"])

        ``attributes`` is a mapping (equality on each key) or filters
        (:func:`durable.attributes.parse_filter`); every filter must hold. Equalities are
        answered from the attributes' GIN index; see :func:`durable.admin.list_runs`.
        ``paused=True`` keeps only paused runs (``durable pause``).

        Raises:
            ValueError: a filter is malformed (:class:`~durable.errors.InvalidAttributes`
                for attributes); nothing is read.
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {status!r}")
        rows = self.store(
            lambda c: admin.list_runs(
                c,
                status=status,
                name=name,
                since=since,
                waiting=waiting,
                paused=paused,
                attributes=attributes,
                limit=limit,
            )
        )
        return [RunInfo.of(row) for row in rows]

    @property
    def schedules(self) -> Schedules:
        """Schedules from Python: ``durable.schedules.add("nightly", workflow=..., cron=...)``.

        See :class:`durable.scheduler.Schedules` and ``docs/scheduling.md``.
        """
        return Schedules(self)

    def chain(self, *signatures: Signature[Any] | DurableChain) -> DurableChain:
        """A Celery chain made durable: ``durable.chain(a.s(1), b.s()).start(workflow_id=...)``.

        Each link runs as a checkpointed step; results pass as Celery passes them. A link may
        be a Celery signature or canvas, or another ``durable.chain``; ``|`` composes too.
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
        client.signal(self, workflow_id, name, payload)

    def get_event(
        self, workflow_id: str, key: str, timeout: timedelta | float | None = None
    ) -> Any:
        """The latest value a workflow published with ``ctx.set_event(key, ...)``, or None.

        With ``timeout`` (seconds or a timedelta) wait up to that long for the key to be set.
        """
        ids.check_id(workflow_id)
        ids.check_id(key, "event key")
        return client.get_event(self, workflow_id, key, timeout)

    def cancel(self, workflow_id: str) -> None:
        """Cancel a running workflow and its child workflows.

        The workflow receives :class:`WorkflowCancelled` at its next step, sleep or signal
        wait, may run compensation in ``except``/``finally``, and ends ``cancelled``.
        """
        ids.check_id(workflow_id)
        client.cancel(self, workflow_id)

    def pause(self, workflow_id: str) -> bool:
        """Pause a running workflow: nothing moves it until :meth:`unpause`.

        Example::

            durable.pause("order-o-1")     # deploy the fix, then:
            durable.unpause("order-o-1")

        Its steps are not dispatched (one already running finishes and its result is kept),
        its timers do not fire, and signals sent to it are kept; its status stays
        ``running``. Returns False if it was paused already. A :meth:`cancel` lifts the pause.
        Raises :class:`WorkflowNotFound` or :class:`WorkflowNotRunning`.
        """
        ids.check_id(workflow_id)
        return admin.pause(self, workflow_id)

    def unpause(self, workflow_id: str) -> bool:
        """Let a paused workflow go on where it stopped; False if it was not paused.

        What came due while it was paused is dispatched now: due timers fire, steps it held
        back are sent, and signals and results that arrived meanwhile are replayed.
        Raises :class:`WorkflowNotFound` or :class:`WorkflowNotRunning`.
        """
        ids.check_id(workflow_id)
        return admin.unpause(self, workflow_id) is not None

    # -- what the beat drives ------------------------------------------------------------------

    def after_timer(self, timer: FiredTimer) -> None:
        """Send what a timer fired by ``durable beat`` made due."""
        deadlines.after_timer(self, timer)

    def enforce_step_deadlines(self) -> int:
        """Fail the attempts of steps running past their ``timeout`` (run by the beat)."""
        return deadlines.enforce_step_deadlines(self)


def _register_tasks(core: Core) -> None:
    """Register ``durable.activate`` and ``durable.step`` on the core's Celery app.

    ``durable.step`` (a workflow id and a step number) is the step message of earlier
    versions, still run for messages left in queues by them.
    """

    @core.app.task(
        name=dispatch.ACTIVATE_TASK, acks_late=True, ignore_result=True, shared=False, typing=False
    )
    def activate(workflow_id: str) -> str:
        return activation.activate(core, workflow_id)

    @core.app.task(
        name=dispatch.STEP_TASK,
        bind=True,
        acks_late=True,
        ignore_result=True,
        shared=False,
        typing=False,
    )
    def step(self: Any, workflow_id: str, seq: int) -> str:
        request = self.request
        fresh = runner.first_delivery(
            core,
            getattr(request, dispatch.SENT_AT_HEADER, None),
            bool((request.delivery_info or {}).get("redelivered")),
        )
        return runner.execute_step(core, workflow_id, seq, fresh=fresh)
