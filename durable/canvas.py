"""Celery's canvas made durable: ``durable.chain``, ``durable.group`` and ``durable.chord``.

Example::

    # before: chain(validate_order.s("o-1"), reserve.s(), charge_card.s())()
    durable.chain(validate_order.s("o-1"), reserve.s(), charge_card.s()).start(workflow_id="c-1")
    # before: chord([summarise.s(c) for c in chunks], combine.s())()
    durable.chord([summarise.s(c) for c in chunks], combine.s()).start(workflow_id="d-1")

Each is a run of the built-in workflow ``durable.chain``. A task link is one step, a group
link is parallel steps (``ctx.parallel``), each checkpointed, so a crash mid-chain never
re-runs a committed link. Results pass as Celery passes them:

- a link's result is prepended to the next link's arguments, unless that signature is
  immutable (``.si()``); every member of a group link gets it the same way;
- after a group, the next link gets the list of the members' results, in order (a chord);
- arguments given to ``delay``/``apply_async`` are prepended to the first link's (to every
  member's, when the first link is a group), keyword arguments merged into them.

Celery's own canvas objects are accepted as links: a chain (its links are spliced in, as
Celery does), a group, a chord (its header as a group link, then its body). A group's members
must be task signatures. Inside a chain a group of one member is that member, as Celery
unrolls it (started alone, ``durable.group`` of one still gives a list of one result). A
``durable.chain`` nests the same way, and ``|`` composes as Celery's does
(``durable.chain(a.s()) | b.s()``, ``a.s() | durable.chain(b.s())``); the chains' retry
policies must agree, since ``with_retry`` covers every link of the run.

Options on signatures:

- ``queue``, ``routing_key``, ``exchange`` and ``priority`` route the step as they would the
  task; on a group they are the default of every member;
- ``countdown`` and ``eta`` become a durable sleep before the link (on a group, before the
  whole group; not on a group's member);
- ``time_limit`` and ``soft_time_limit`` become the step's ``timeout`` (the smaller one);
  the members of a group must agree on it;
- ``expires`` on a link counts, as in Celery, from when that link is sent (its step is
  scheduled): a link not started by then is not run and fails with ``TaskExpired``;
- ``link`` and ``link_error`` are refused with ``ValueError``: durable cannot honour them as
  Celery does; so are the options above on a nested chain or on a chord itself (set them on
  its parts), and ``expires`` as a call option of ``apply_async``. Every other option
  (``task_id``, ``serializer``, ``headers``, ``ignore_result``...) shapes Celery's
  message, and durable sends its own: it is ignored.

``apply_async`` takes Celery's call options too: ``task_id`` (the workflow id),
``countdown`` and ``eta`` (a durable delayed start: the run begins with a durable sleep, a
timer in PostgreSQL, never a broker ETA), and routing options and time limits for the first
link, as Celery applies a chain's call options to its first task.

A link keeps its task's own Celery retry options (their waits durable timers), as in a
Celery chain; ``with_retry`` gives every link a :class:`~durable.retry.RetryPolicy`
instead.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery.canvas import Signature, _chain, chord, group, maybe_signature

from durable import client
from durable.context import WorkflowContext
from durable.dispatch import ROUTING_OPTIONS, routing_options
from durable.retry import RetryPolicy

if TYPE_CHECKING:
    from durable.client import WorkflowRun
    from durable.core import Core

CHAIN_WORKFLOW = "durable.chain"
REFUSED_OPTIONS = {
    "link": "a callback; run the task as the next link instead",
    "link_error": "an error callback; write a workflow that catches StepFailed instead",
}
CALL_REFUSED = {
    **REFUSED_OPTIONS,
    "expires": "set it on the links: each counts from when its step is scheduled",
}
TIME_LIMITS = ("time_limit", "soft_time_limit")
# Celery's built-in tasks behind ``task.map``, ``task.starmap`` and ``task.chunks``.
CELERY_CANVAS_TASKS = ("celery.map", "celery.starmap", "celery.chunks")

Link = dict[str, Any]


class DurableChain:
    """A chain of links (task signatures and groups) to start as one durable workflow run.

    Build it with ``durable.chain(...)``, ``durable.group(...)`` or ``durable.chord(...)``;
    compose with ``|`` or by nesting, as Celery's canvas does.
    """

    def __init__(
        self,
        core: Core,
        signatures: Iterable[Signature[Any] | DurableChain],
        retry: RetryPolicy | None = None,
    ) -> None:
        self._core = core
        self.retry = retry
        self.links: list[Link] = []
        for number, signature in enumerate(signatures, 1):
            self.links += self._describe(signature, f"link {number}")
        if not self.links:
            raise ValueError("durable.chain needs at least one signature")

    def _describe(self, signature: Any, where: str) -> list[Link]:
        if not isinstance(signature, DurableChain):
            return describe(signature, where)
        if signature.retry is not None and self.retry not in (None, signature.retry):
            raise ValueError(
                f"durable.chain: {where}: the chains have different retry policies; compose "
                "them first, then call with_retry on the result"
            )
        self.retry = self.retry or signature.retry
        if len(signature.links) == 1:  # a durable.group of one, unrolled as Celery does
            return [_unrolled(signature.links[0])]
        return list(signature.links)

    @classmethod
    def of_group(cls, core: Core, signatures: tuple[Any, ...]) -> DurableChain:
        """``durable.group(a.s(), b.s())`` or ``durable.group([a.s(), b.s()])``."""
        if len(signatures) == 1 and not isinstance(signatures[0], Signature):
            signatures = tuple(signatures[0])
        canvas = group(*signatures)
        chain = cls(core, [canvas])  # checks the members, unrolls a group of one
        # Started alone, a group of one still gives a list of one result, as Celery's does.
        chain.links = [describe_group(canvas.tasks, canvas, "link 1")]
        return chain

    @classmethod
    def of_chord(cls, core: Core, header: Any, body: Signature[Any]) -> DurableChain:
        """``durable.chord([a.s(), b.s()], c.s())``: the body gets the header's results."""
        return cls(core, [chord(header if isinstance(header, group) else list(header), body)])

    def __or__(self, other: Signature[Any] | DurableChain) -> DurableChain:
        """``chain | signature`` or ``chain | chain``: a new chain, this one's links first."""
        return DurableChain(self._core, [self, other], retry=self.retry)

    def __ror__(self, other: Signature[Any]) -> DurableChain:
        """``signature | chain``: a new chain, the signature's links first."""
        return DurableChain(self._core, [other, self], retry=self.retry)

    def with_retry(self, policy: RetryPolicy) -> DurableChain:
        """Retry every link (every member of a group) under ``policy``; returns the chain."""
        self.retry = policy
        return self

    def start(self, workflow_id: str | None = None, **options: Any) -> WorkflowRun:
        """Start the chain (idempotent by ``workflow_id``); returns its run.

        ``options`` are :meth:`apply_async`'s (``countdown``, ``eta``, ``queue``...).
        """
        return self.apply_async(workflow_id=workflow_id, **options)

    def apply_async(
        self,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        workflow_id: str | None = None,
        *,
        task_id: str | None = None,
        countdown: float | None = None,
        eta: datetime | str | None = None,
        **options: Any,
    ) -> WorkflowRun:
        """Celery's ``apply_async``: start the chain; returns its run (an ``AsyncResult``'s API).

        Args:
            args: Partial arguments, put before the first link's (each member's of a group).
            kwargs: Keyword arguments merged into the first link's.
            workflow_id: The run's id (Celery's ``task_id`` is taken as one); a second start
                under the same id returns the existing run.
            task_id: Celery's name for ``workflow_id``.
            countdown: Seconds to wait before the first link: a durable delayed start. The
                run is created now and begins with a durable sleep (a timer in PostgreSQL),
                not a broker ETA; it replaces the first link's own countdown or eta.
            eta: The time to start at (a datetime, naive meaning UTC, or ISO text), likewise.
            **options: ``queue``, ``routing_key``, ``exchange``, ``priority``,
                ``time_limit`` and ``soft_time_limit`` apply to the first link, as Celery
                applies a chain's call options to its first task. ``link``, ``link_error``
                and ``expires`` (set it on the links) are refused with ``ValueError``; every
                other option shapes
                Celery's message, and durable sends its own: it is ignored.
        """
        for option, reason in CALL_REFUSED.items():
            if options.get(option):
                raise ValueError(f"durable.chain: option {option!r} is refused: {reason}")
        if workflow_id and task_id and workflow_id != task_id:
            raise ValueError("durable.chain: give workflow_id or task_id, not two different ids")
        links = list(self.links)
        if args or kwargs:
            links[0] = _with_partial(links[0], tuple(args or ()), dict(kwargs or {}))
        if countdown is not None:
            eta = datetime.now(UTC) + timedelta(seconds=float(countdown))
        links[0] = _with_call_options(links[0], eta, options)
        extra: dict[str, Any] = {} if self.retry is None else {"retry": self.retry.to_dict()}
        wid = workflow_id or task_id
        return client.start(self._core, CHAIN_WORKFLOW, links, workflow_id=wid, **extra)

    def delay(self, *args: Any, **kwargs: Any) -> WorkflowRun:
        """Celery's ``delay``: start with a generated id, arguments for the first link."""
        return self.apply_async(args, kwargs)


# -- signatures as plain data -----------------------------------------------------------------


def describe(signature: Any, where: str) -> list[Link]:
    """The links a signature stands for, as stored in the chain run's arguments."""
    signature = _as_signature(signature, where)
    if isinstance(signature, _chain):
        _check_no_options(signature, where, "a nested chain")
        return [link for t in signature.tasks for link in describe(t, where)]
    if isinstance(signature, chord):
        if signature.body is None:
            raise ValueError(f"durable.chain: {where}: a chord needs a body")
        _check_no_options(signature, where, "a chord")
        header = signature.tasks
        head = header if isinstance(header, group) else group(*header)
        return [describe_group(head.tasks, head, where), *describe(signature.body, where)]
    if isinstance(signature, group):
        return [_unrolled(describe_group(signature.tasks, signature, where))]
    return [describe_task(signature, where)]


def describe_task(signature: Signature[Any], where: str) -> Link:
    """A task signature as a link: its name, arguments, immutability and options."""
    if signature.get("subtask_type") or str(signature.task) in CELERY_CANVAS_TASKS:
        kind = signature.get("subtask_type") or str(signature.task)
        raise ValueError(f"durable.chain: {where}: Celery's {kind} signatures are not supported")
    options = routing_options(signature.options)
    expires = signature.options.get("expires")
    if expires is not None:  # Celery's, counted when the link's step is scheduled
        options["expires"] = expires.isoformat() if isinstance(expires, datetime) else expires
    link: Link = {
        "task": str(signature.task),
        "args": list(signature.args),
        "kwargs": dict(signature.kwargs),
        "options": options,
        "immutable": bool(signature.immutable),
    }
    return {**link, **_timing(signature.options, f"{where} ({signature.task})")}


def describe_group(members: Iterable[Any], signature: Signature[Any], where: str) -> Link:
    """A group (or a chord's header) as one link of parallel members."""
    defaults = routing_options(signature.options)
    timing = _timing(signature.options, f"{where} (a group)")
    described = []
    for number, member in enumerate(members, 1):
        place = f"{where}, member {number}"
        member = _as_signature(member, place)
        if isinstance(member, _chain | chord | group):
            raise ValueError(f"durable.chain: {place}: a group's members must be task signatures")
        link = describe_task(member, place)
        if "countdown" in link or "eta" in link:
            raise ValueError(f"durable.chain: {place}: set countdown/eta on the group instead")
        link["options"] = {**defaults, **link["options"]}
        described.append(link)
    limits = {m.pop("timeout", None) for m in described}
    if len(limits) > 1:
        raise ValueError(f"durable.chain: {where}: a group's members must share one time limit")
    member_limit = limits.pop() if limits else None
    if member_limit is not None:
        timing["timeout"] = min(member_limit, timing.get("timeout", member_limit))
    return {"group": described, **timing}


def _as_signature(value: Any, where: str) -> Signature[Any]:
    if isinstance(value, dict) and not isinstance(value, Signature) and "task" in value:
        value = maybe_signature(value)
    if not isinstance(value, Signature):
        raise TypeError(f"durable.chain takes Celery signatures (task.s(...)), got {value!r}")
    for option, reason in REFUSED_OPTIONS.items():
        if value.options.get(option):
            raise ValueError(f"durable.chain: {where}: option {option!r} is refused: {reason}")
    return value


def _check_no_options(signature: Signature[Any], where: str, what: str) -> None:
    honoured = set(ROUTING_OPTIONS) | {"countdown", "eta", *TIME_LIMITS}
    given = sorted(k for k, v in signature.options.items() if k in honoured and v is not None)
    if given:
        raise ValueError(f"durable.chain: {where}: set {', '.join(given)} on {what}'s parts")


def _timing(options: dict[str, Any], where: str) -> dict[str, Any]:
    """``countdown``, ``eta`` (ISO UTC) and ``timeout`` from Celery's options, where given."""
    timing: dict[str, Any] = {}
    if options.get("countdown"):
        timing["countdown"] = float(options["countdown"])
    eta = options.get("eta")
    if eta:
        moment = datetime.fromisoformat(eta) if isinstance(eta, str) else eta
        if not isinstance(moment, datetime):
            raise ValueError(f"durable.chain: {where}: eta must be a datetime, got {eta!r}")
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)  # Celery's reading, with enable_utc
        timing["eta"] = moment.astimezone(UTC).isoformat()
    limits = [float(options[k]) for k in TIME_LIMITS if options.get(k)]
    if limits:
        timing["timeout"] = min(limits)
    return timing


def _unrolled(link: Link) -> Link:
    """A group link of one member as that member, as Celery unrolls it in a chain."""
    if len(link.get("group", ())) != 1:
        return link
    timing = {key: value for key, value in link.items() if key != "group"}
    return {**link["group"][0], **timing}


def _with_call_options(link: Link, eta: datetime | str | None, options: dict[str, Any]) -> Link:
    """``link`` given ``apply_async``'s start time, routing and time limits, which win."""
    timing = _timing({"eta": eta, **{k: options.get(k) for k in TIME_LIMITS}}, "apply_async")
    if "eta" in timing:
        link = {key: value for key, value in link.items() if key != "countdown"}
    link = {**link, **timing}
    routing = routing_options(options)
    if routing and "group" in link:
        members = [{**m, "options": {**m["options"], **routing}} for m in link["group"]]
        return {**link, "group": members}
    if routing:
        return {**link, "options": {**link["options"], **routing}}
    return link


def _with_partial(link: Link, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Link:
    """``link`` given partial arguments as Celery's ``Signature.clone`` would give them."""
    if "group" in link:
        return {**link, "group": [_with_partial(m, args, kwargs) for m in link["group"]]}
    if link.get("immutable"):
        return link
    return {**link, "args": [*args, *link["args"]], "kwargs": {**link["kwargs"], **kwargs}}


# -- the workflow ----------------------------------------------------------------------------


def run_chain(ctx: WorkflowContext, links: list[Link], retry: dict[str, Any] | None = None) -> Any:
    """The body of ``durable.chain``: each link a step (a group parallel steps)."""
    policy = None if retry is None else RetryPolicy.from_dict(retry)
    result: Any = None
    for index, link in enumerate(links):
        _wait_before(ctx, link)
        previous = (result,) if index > 0 else ()
        timeout = link.get("timeout")
        if "group" in link:
            calls = [_signature(ctx, member, previous) for member in link["group"]]
            result = ctx.parallel(calls, retry=policy, timeout=timeout)
        else:
            result = ctx.step(_signature(ctx, link, previous), retry=policy, timeout=timeout)
    return result


def _wait_before(ctx: WorkflowContext, link: Link) -> None:
    """A link's ``countdown`` or ``eta``, as a durable sleep (none when already due)."""
    if link.get("countdown"):
        ctx.sleep(float(link["countdown"]))
    if link.get("eta"):
        wait = datetime.fromisoformat(link["eta"]) - ctx.now()
        if wait.total_seconds() > 0:
            ctx.sleep(wait)


def _signature(ctx: WorkflowContext, link: Link, previous: tuple[Any, ...]) -> Signature[Any]:
    args = list(link["args"])
    if previous and not link.get("immutable"):
        args = [*previous, *args]
    options = link.get("options") or {}
    return ctx.app.signature(link["task"], args=args, kwargs=link.get("kwargs") or {}, **options)
