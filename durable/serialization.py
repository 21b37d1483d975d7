"""JSON encoding of everything durable stores or sends, with a size limit.

Arguments, results and payloads are JSON so that nothing read back can run code. Tuples come
back as lists, as they do through Celery's JSON serializer.
"""

from __future__ import annotations

import json
from typing import Any

from durable.errors import PayloadError


def encode(value: Any, what: str, limit: int) -> str:
    """Return ``value`` as JSON text, or raise :class:`PayloadError` naming ``what``."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PayloadError(what, f"not JSON-serialisable ({exc})") from None
    size = len(text.encode("utf-8"))
    if size > limit:
        raise PayloadError(what, f"{size} bytes is over the limit of {limit} bytes")
    return text


def check(value: Any, what: str, limit: int) -> Any:
    """Validate ``value`` like :func:`encode` and return its JSON round trip."""
    return json.loads(encode(value, what, limit))


def describe_exception(exc: BaseException) -> str:
    """One line naming an exception's type and message, as stored in ``error`` columns."""
    name = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__"):
        name = f"{module}.{name}"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{name}: {message}" if message else name
