"""What a running step knows about itself: :func:`current_step` and :class:`StepInfo`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime

from durable.cadence import parse_fire_id


@dataclass(frozen=True)
class StepInfo:
    """What a running step knows about itself; see :func:`current_step`."""

    workflow_id: str | None = None
    step: int | None = None
    name: str | None = None
    attempt: int = 0

    @property
    def idempotency_key(self) -> str | None:
        """``"<workflow id>:<step number>"``: the same on every attempt and redelivery.

        ``None`` outside a workflow. Pass it to a payment API or use it as a unique key in
        your own tables so that a step re-run after a crash does its side effect once.
        """
        if self.workflow_id is None or self.step is None:
            return None
        return f"{self.workflow_id}:{self.step}"

    @property
    def schedule(self) -> str | None:
        """The name of the schedule whose fire started this run; None for another run."""
        fire = parse_fire_id(self.workflow_id)
        return fire[0] if fire else None

    @property
    def fire_time(self) -> datetime | None:
        """When the schedule fired this run (UTC), the same on every attempt; else None.

        A scheduled run's id is ``<schedule>@<fire time>`` (``nightly@2026-01-01T03:00:00Z``);
        this reads it back, so a task run by a schedule (an imported ``beat_schedule`` entry
        included) learns its fire time however late it runs::

            @app.task
            def nightly_report():
                day = (current_step().fire_time - timedelta(days=1)).date()
        """
        fire = parse_fire_id(self.workflow_id)
        return fire[1] if fire else None


_NO_STEP = StepInfo()
_current: ContextVar[StepInfo] = ContextVar("durable_current_step")
_has_policy: ContextVar[bool] = ContextVar("durable_step_has_policy", default=False)


def current_step() -> StepInfo:
    """The step being run in this task, or an empty :class:`StepInfo` outside a workflow.

    Example::

        @app.task
        def charge_card(order):
            key = current_step().idempotency_key   # stable across retries; None outside
            return payments.charge(order, idempotency_key=key)
    """
    return _current.get(_NO_STEP)


def step_has_policy() -> bool:
    """Whether the running step was given ``retry=RetryPolicy(...)``, which then decides."""
    return _has_policy.get()


@contextmanager
def step_context(info: StepInfo, has_policy: bool = False) -> Iterator[None]:
    """Make ``info`` the :func:`current_step` for the duration of the block."""
    token = _current.set(info)
    policy_token = _has_policy.set(has_policy)
    try:
        yield
    finally:
        _has_policy.reset(policy_token)
        _current.reset(token)
