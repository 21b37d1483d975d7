"""The store's schema: the one definition that Alembic revisions are drafted from.

Tables (all prefixed ``durable_``):

- ``workflows``: one row per run; its lease (one writer), its wake counters, its pause and
  its searchable attributes.
- ``steps``: one row per position in a run's history, unique on (workflow id, step number):
  remote steps, local steps and sleeps alike; the result is committed here.
- ``timers``: durable timers (sleeps and retry back-offs); PostgreSQL is the truth, the Redis
  sorted set only an index.
- ``history``: append-only events that ``durable show`` renders.
- ``signals``: data pushed into a run from outside, consumed once, oldest first.
- ``events``: key/value state a run publishes (``ctx.set_event``), read from outside.
- ``schedules``: what ``durable beat`` starts when; the next fire, indexed in Redis.
- ``limits``: named concurrency limits (of steps or of runs), as declared and as
  overridden at run time.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    Interval,
    MetaData,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

Timestamp = DateTime(timezone=True)
NOW = text("now()")


class Base(DeclarativeBase):
    """Declarative base bound to the store's metadata."""

    metadata = metadata


class Workflow(Base):
    """A workflow run."""

    __tablename__ = "durable_workflows"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    name: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    args: Mapped[Any] = mapped_column(JSONB)
    kwargs: Mapped[Any] = mapped_column(JSONB)
    result: Mapped[Any | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    # wake_seq counts reasons to run the workflow code; run_seq is the last one an activation
    # finished with. wake_seq > run_seq means an activation is owed (the activation outbox).
    wake_seq: Mapped[int] = mapped_column(BigInteger, server_default=text("1"))
    run_seq: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    # Settles that advanced the run (scheduled its next steps, or ended it, in the statement
    # that settled a step) while it was at rest: such a settle leaves wake_seq, run_seq and
    # woken_at as they were, so that the row's update touches no indexed column (a HOT
    # update), and counts here instead. wake_seq + advances is the run's version: it grows
    # with every change a replay can see (``durable.store.steps``).
    advances: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    woken_at: Mapped[datetime] = mapped_column(Timestamp, server_default=NOW)
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=NOW)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=NOW)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # A child run knows its parent and the parent's position waiting for it.
    parent_id: Mapped[str | None] = mapped_column(Text)
    parent_seq: Mapped[int | None] = mapped_column(Integer)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # The position at which the cancellation was delivered, so that replay delivers it there.
    cancelled_at_seq: Mapped[int | None] = mapped_column(Integer)
    # Change ids that ``ctx.patched`` found new code for in this run.
    patches: Mapped[Any | None] = mapped_column(JSONB)
    deadline_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Held by ``durable pause`` (or a step's ``RetryPolicy(on_exhausted="pause")``): the run
    # stays 'running' but nothing moves it until ``durable unpause``.
    paused: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # A delayed or debounced start not yet due: no activation runs the workflow until its
    # 'start' timer fires and clears this (``durable.store.runs``).
    start_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Searchable attributes (``durable.attributes``): JSON scalars under string keys, set at
    # the start and merged by ``ctx.set_attributes``; the GIN index serves containment (@>).
    attributes: Mapped[Any] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    # The trace context the run's spans continue (W3C traceparent/tracestate): the start's,
    # or the parent run's for a child; NULL when tracing was off (durable.tracing).
    trace_context: Mapped[Any | None] = mapped_column(JSONB)
    # A run of a workflow declared with a concurrency limit (``durable.Limit``): the limit's
    # name, the key its key function gave at the start, and its priority in the key's queue.
    # ``queued`` while it waits for a slot (at rest, running no code); from its admission
    # until it ends it holds a slot of its key (see ``durable.store.run_limits``).
    limit_name: Mapped[str | None] = mapped_column(Text)
    limit_key: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    queued: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))

    __table_args__ = (
        Index("ix_durable_workflows_status_created_at", "status", "created_at"),
        # The slots a key's running runs hold, and its queue in admission order.
        Index(
            "ix_durable_workflows_limit",
            "limit_name",
            "limit_key",
            postgresql_where=text("limit_name IS NOT NULL AND status = 'running'"),
        ),
        Index(
            "ix_durable_workflows_queued",
            "limit_name",
            "limit_key",
            text("priority DESC"),
            "created_at",
            postgresql_where=text("queued"),
        ),
        Index("ix_durable_workflows_paused", "name", postgresql_where=text("paused")),
        Index(
            "ix_durable_workflows_attributes",
            "attributes",
            postgresql_using="gin",
            postgresql_ops={"attributes": "jsonb_path_ops"},
        ),
        Index("ix_durable_workflows_name", "name"),
        Index(
            "ix_durable_workflows_parent_id",
            "parent_id",
            postgresql_where=text("parent_id IS NOT NULL"),
        ),
        Index(
            "ix_durable_workflows_lease_owner",
            "lease_owner",
            postgresql_where=text("lease_owner IS NOT NULL"),
        ),
        Index(
            "ix_durable_workflows_owed",
            "woken_at",
            postgresql_where=text("status = 'running' AND wake_seq > run_seq"),
        ),
        # Room on each page for the new version of a row a settle updates (HOT).
        {"postgresql_with": {"fillfactor": 85}},
    )


class Step(Base):
    """One position of a run's history: a remote step, a local step or a sleep."""

    __tablename__ = "durable_steps"

    workflow_id: Mapped[str] = mapped_column(
        Text, ForeignKey("durable_workflows.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    name: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    args: Mapped[Any | None] = mapped_column(JSONB)
    kwargs: Mapped[Any | None] = mapped_column(JSONB)
    options: Mapped[Any | None] = mapped_column(JSONB)
    result: Mapped[Any | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(Timestamp)
    dispatched_at: Mapped[datetime | None] = mapped_column(Timestamp)
    dispatch_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=NOW)
    started_at: Mapped[datetime | None] = mapped_column(Timestamp)
    completed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Start-to-close limit of the current attempt (``ctx.step(..., timeout=...)``).
    deadline_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # Who ran the current attempt (the claim's or the unclaimed settle's lease token), and
    # whether it ran without a claim: with the times above, the step row is its own history
    # (``durable.store.history``); only earlier attempts are written to durable_history.
    worker: Mapped[str | None] = mapped_column(Text)
    unclaimed: Mapped[bool | None] = mapped_column(Boolean)
    # A step under a concurrency limit (``durable.Limit``): the limit's name and the key its
    # key function gave when the step was scheduled, and its priority in the key's queue.
    # It waits ``queued`` until admitted; from then on it holds a slot of the key while
    # ``scheduled``, ``started`` or ``waiting`` (see ``durable.store.limits``).
    limit_name: Mapped[str | None] = mapped_column(Text)
    limit_key: Mapped[str | None] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))

    __table_args__ = (
        Index(
            "ix_durable_steps_started_lease",
            "lease_expires_at",
            postgresql_where=text("status = 'started'"),
        ),
        Index(
            "ix_durable_steps_scheduled",
            "dispatched_at",
            postgresql_where=text("status = 'scheduled'"),
        ),
        # The slots a key holds, and its queue in admission order.
        Index(
            "ix_durable_steps_limit",
            "limit_name",
            "limit_key",
            "status",
            postgresql_where=text("limit_name IS NOT NULL"),
        ),
        Index(
            "ix_durable_steps_queued",
            "limit_name",
            "limit_key",
            text("priority DESC"),
            "created_at",
            postgresql_where=text("status = 'queued'"),
        ),
    )


class Timer(Base):
    """A durable timer: a sleep's end or a retry's back-off."""

    __tablename__ = "durable_timers"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    workflow_id: Mapped[str] = mapped_column(
        Text, ForeignKey("durable_workflows.id", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(Integer)
    purpose: Mapped[str] = mapped_column(Text)
    fire_at: Mapped[datetime] = mapped_column(Timestamp)
    fired_at: Mapped[datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=NOW)

    __table_args__ = (
        Index("ix_durable_timers_pending", "fire_at", postgresql_where=text("fired_at IS NULL")),
        Index("ix_durable_timers_workflow_id_seq", "workflow_id", "seq"),
    )


class HistoryEvent(Base):
    """An append-only record of what happened to a run.

    No foreign key to the run: each row is written with a change to the run, a step, a timer
    or a signal (whose keys hold), and a key would add a check query per row, three per step.
    The statements that delete runs delete their history too.
    """

    __tablename__ = "durable_history"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    workflow_id: Mapped[str] = mapped_column(Text)
    seq: Mapped[int | None] = mapped_column(Integer)
    event: Mapped[str] = mapped_column(Text)
    detail: Mapped[Any | None] = mapped_column(JSONB)
    at: Mapped[datetime] = mapped_column(Timestamp, server_default=NOW)

    __table_args__ = (Index("ix_durable_history_workflow_id_id", "workflow_id", "id"),)


class Signal(Base):
    """A signal sent to a run; consumed by one ``wait_for_signal`` position, oldest first."""

    __tablename__ = "durable_signals"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    workflow_id: Mapped[str] = mapped_column(
        Text, ForeignKey("durable_workflows.id", ondelete="CASCADE")
    )
    name: Mapped[str] = mapped_column(Text)
    payload: Mapped[Any | None] = mapped_column(JSONB)
    sent_at: Mapped[datetime] = mapped_column(Timestamp, server_default=NOW)
    consumed_seq: Mapped[int | None] = mapped_column(Integer)
    consumed_at: Mapped[datetime | None] = mapped_column(Timestamp)

    __table_args__ = (
        Index("ix_durable_signals_workflow_id_sent_at", "workflow_id", "sent_at"),
        Index(
            "ix_durable_signals_unconsumed",
            "workflow_id",
            "name",
            "id",
            postgresql_where=text("consumed_seq IS NULL"),
        ),
    )


class Event(Base):
    """A key a run publishes with ``ctx.set_event``; the latest value wins."""

    __tablename__ = "durable_events"

    workflow_id: Mapped[str] = mapped_column(
        Text, ForeignKey("durable_workflows.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    value: Mapped[Any | None] = mapped_column(JSONB)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=NOW)


workflows = Workflow.__table__
steps = Step.__table__
timers = Timer.__table__
history = HistoryEvent.__table__
signals = Signal.__table__
events = Event.__table__


class Schedule(Base):
    """A schedule: which workflow ``durable beat`` starts when, and how far firing has got.

    ``next_fire_at`` is the truth of the next fire (the Redis sorted set only indexes it);
    NULL when the expression never fires again. A fire starts the run
    ``<name>@<fire time, ISO-8601 UTC>``.
    """

    __tablename__ = "durable_schedules"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    workflow: Mapped[str] = mapped_column(Text)
    args: Mapped[Any] = mapped_column(JSONB)
    kwargs: Mapped[Any] = mapped_column(JSONB)
    # Exactly one of: a cron expression read in ``timezone``, or an interval whose fires fall
    # on its multiples since the Unix epoch.
    cron: Mapped[str | None] = mapped_column(Text)
    every: Mapped[timedelta | None] = mapped_column(Interval)
    timezone: Mapped[str] = mapped_column(Text, server_default=text("'UTC'"))
    catchup: Mapped[str] = mapped_column(Text, server_default=text("'skip'"))
    overlap: Mapped[str] = mapped_column(Text, server_default=text("'skip'"))
    paused: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # Who wrote it: 'api' (Python or the CLI), 'crontab' (import-crontab), or 'beat_schedule'
    # (imported from the Celery config at beat start, and removed when gone from it).
    origin: Mapped[str] = mapped_column(Text, server_default=text("'api'"))
    next_fire_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_fire_at: Mapped[datetime | None] = mapped_column(Timestamp)
    # No foreign key: a schedule outlives the runs it started.
    last_run_id: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=NOW)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=NOW)

    __table_args__ = (
        CheckConstraint("(cron IS NULL) <> (every IS NULL)", name="cron_or_every"),
        CheckConstraint("catchup IN ('skip', 'once', 'all')", name="catchup"),
        CheckConstraint("overlap IN ('skip', 'allow')", name="overlap"),
        Index("ix_durable_schedules_due", "next_fire_at", postgresql_where=text("NOT paused")),
    )


schedules = Schedule.__table__


class FlowLimit(Base):
    """A named limit: what the code last declared, and the operators' override.

    A row is written when a step under the limit is first admitted (or a run of a workflow
    declared with it started); ``durable limits set`` writes ``concurrency_override`` and
    ``rate_interval_override``, which win over the declaration while they are set.
    """

    __tablename__ = "durable_limits"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    concurrency: Mapped[int | None] = mapped_column(Integer)
    concurrency_override: Mapped[int | None] = mapped_column(Integer)
    # Seconds between two starts of a key under the declared rate (period / count), and the
    # operators' override of it (``durable limits set --rate``), which wins while set.
    rate_interval: Mapped[float | None] = mapped_column(Float)
    rate_interval_override: Mapped[float | None] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(Timestamp, server_default=NOW)

    __table_args__ = (
        CheckConstraint("concurrency IS NULL OR concurrency > 0", name="concurrency"),
        CheckConstraint(
            "concurrency_override IS NULL OR concurrency_override >= 0", name="override"
        ),
        CheckConstraint(
            "rate_interval_override IS NULL OR rate_interval_override > 0", name="rate_override"
        ),
    )


limits = FlowLimit.__table__
