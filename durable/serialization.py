"""JSON encoding of everything durable stores or sends, with a size limit.

Arguments, results and payloads are JSON so that nothing read back can run code. Tuples come
back as lists, as they do through Celery's JSON serializer.
"""

from __future__ import annotations

import json
from typing import Any

from durable.codec import open_, seal
from durable.errors import PayloadError


def dumps(value: Any, what: str, limit: int) -> str:
    """``value`` as plain JSON text, or :class:`PayloadError` naming ``what``."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise PayloadError(what, f"not JSON-serialisable ({exc})") from None
    except RecursionError:
        raise PayloadError(what, "nested too deeply to store") from None
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > limit:
        raise PayloadError(what, f"{size} bytes is over the limit of {limit} bytes")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError(what, "contains text that is not valid UTF-8") from None
    return text


def encode(value: Any, what: str, limit: int, codec: Any = None) -> str:
    """``value`` as the JSON text to store or send: checked, then encoded by ``codec``."""
    return seal(dumps(value, what, limit), codec)


def decode(value: Any, codec: Any = None) -> Any:
    """A stored value as read back from PostgreSQL, opened if ``codec`` encoded it."""
    data = open_(value, codec)
    return value if data is None else json.loads(data)


def describe_exception(exc: BaseException) -> str:
    """One line naming an exception's type and message, as stored in ``error`` columns."""
    name = type(exc).__qualname__
    module = type(exc).__module__
    if module not in ("builtins", "__main__"):
        name = f"{module}.{name}"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{name}: {message}" if message else name
