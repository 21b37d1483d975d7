"""Secrets kept out of what durable prints: URLs with their passwords masked.

A database or Redis URL can carry its password in two places: after the user name
(``postgresql://app:secret@db/shop``) and in the query string, as libpq and redis-py accept
it (``postgresql://db/shop?user=app&password=secret``, also ``sslpassword``). Every URL
durable shows in an error, a log line or a command's output passes through :func:`redact`.

Example::

    >>> redact("postgresql://app:secret@db/shop?sslpassword=x&sslmode=require")
    'postgresql://app:***@db/shop?sslpassword=***&sslmode=require'
"""

from __future__ import annotations

import re

MASK = "***"

# A query parameter whose name says it holds a secret (password, sslpassword, a token).
_SECRET_PARAM = re.compile(r"(?i)([?&;][^=&;#]*(?:password|secret|token)[^=&;#]*=)[^&;#]*")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``, before the host and in the query."""
    scheme, sep, rest = url.partition("://")
    # The last "@" before the query ends the credentials, whatever they hold ("/" too).
    base, question, query = rest.partition("?")
    if sep and "@" in base:
        creds, _, host = base.rpartition("@")
        user = creds.split(":", 1)[0]
        url = f"{scheme}://{user}{':' + MASK if ':' in creds else ''}@{host}{question}{query}"
    return _SECRET_PARAM.sub(lambda m: m.group(1) + MASK, url)


def redact_text(text: str, urls: list[str]) -> str:
    """``text`` with each of ``urls`` (as given) replaced by its redacted form."""
    for url in urls:
        if url and url in text:
            text = text.replace(url, redact(url))
    return text
