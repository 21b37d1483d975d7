"""The beat leader's lock: one Redis key whose holder alone fires schedules.

Key, under the configurable prefix ``P`` (default ``durable``):

- ``P:beat:leader`` string, the holder's token (``<host>:<pid>:<random>``), expiring after
  ``leader_ttl``.

The holder renews it every third of the TTL with a compare-and-renew script, so two renewals
can fail before it expires. A renewal that finds another token (or none: Redis was flushed)
ends the leadership at once; so does the local clock, which counts the TTL from before each
request was sent, so a beat that cannot reach Redis stops leading before its key can expire.
Stand-bys try to take the key every ``min(1 s, TTL/3)``: after the leader's death one takes
over within the TTL plus that.

Leadership is an optimisation, not the safety net: each fire is also gated in PostgreSQL
(:mod:`durable.scheduler`), so two beats that overlap for a moment still fire once.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger(__name__)

LEADER_KEY = "{prefix}:beat:leader"

# KEYS[1] the lock, ARGV[1] our token, ARGV[2] TTL in ms. Take the lock when it is free, or
# extend it when it is already ours; 1 if we hold it afterwards, else 0.
ACQUIRE = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return 1
end
if not holder then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""

# KEYS[1] the lock, ARGV[1] our token, ARGV[2] TTL in ms. Extend the lock only if it is ours;
# a lock that is gone or someone else's is not taken back here.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] the lock, ARGV[1] our token. Delete the lock only if it is ours.
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

# The share of the TTL a holder counts on, from before its request: margin for clock drift.
VALIDITY = 0.9


class LeaderLock:
    """One process's view of the leader lock; call :meth:`tick` often, :meth:`held` to ask.

    Args:
        client: Returns the Redis client to use (called for every request).
        prefix: The key prefix.
        ttl: Seconds the lock lives without renewal.
        token: This process's token (default: host, pid and a random part).
    """

    def __init__(
        self,
        client: Callable[[], redis.Redis],
        prefix: str,
        ttl: float,
        token: str | None = None,
    ) -> None:
        self._client = client
        self.key = LEADER_KEY.format(prefix=prefix)
        self.ttl = ttl
        self.token = token or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._valid_until = 0.0
        self._next_attempt = 0.0
        self._scripts: dict[str, Any] = {}

    @property
    def renew_interval(self) -> float:
        """Seconds between renewals while leading: a third of the TTL."""
        return self.ttl / 3

    @property
    def retry_interval(self) -> float:
        """Seconds between attempts to take the lock while standing by."""
        return min(1.0, self.ttl / 3)

    def held(self) -> bool:
        """Whether this process leads now (by its last successful request and its clock)."""
        return time.monotonic() < self._valid_until

    def tick(self) -> bool:
        """Renew or try to take the lock when it is time to; returns :meth:`held`."""
        if time.monotonic() >= self._next_attempt:
            self._attempt(renew_only=self.held())
        return self.held()

    def confirm(self) -> bool:
        """Renew now if leading (before acting as leader); False once the lock is lost."""
        if not self.held():
            return False
        self._attempt(renew_only=True)
        return self.held()

    def release(self) -> None:
        """Give the lock up if it is ours, so that a stand-by takes over at once."""
        was_held, self._valid_until = self.held(), 0.0
        try:
            self._run("release", RELEASE, [self.key], [self.token])
        except redis.RedisError as exc:
            log.warning("durable beat: could not release the leader lock (%s)", exc)
        if was_held:
            log.info("durable beat: stopped leading")

    def holder(self) -> str | None:
        """The token of the current leader, or None."""
        value = self._client().get(self.key)
        return value.decode() if isinstance(value, bytes) else value

    def _attempt(self, renew_only: bool) -> None:
        sent = time.monotonic()
        args = [self.token, int(self.ttl * 1000)]
        try:
            if renew_only:
                ok = bool(self._run("renew", RENEW, [self.key], args))
            else:
                ok = bool(self._run("acquire", ACQUIRE, [self.key], args))
        except redis.RedisError as exc:
            log.warning("durable beat: leader lock unreachable (%s)", exc)
            self._next_attempt = sent + self.retry_interval
            return
        if ok and not self.held():
            log.info("durable beat: leading (lock %s, ttl %gs)", self.key, self.ttl)
        elif not ok and renew_only:
            log.warning("durable beat: lost the leader lock; no longer firing schedules")
        self._valid_until = sent + self.ttl * VALIDITY if ok else 0.0
        self._next_attempt = sent + (self.renew_interval if ok else self.retry_interval)

    def _run(self, name: str, source: str, keys: list[str], args: list[Any]) -> Any:
        client = self._client()
        script = self._scripts.get(name)
        if script is None or script.registered_client is not client:
            script = self._scripts[name] = client.register_script(source)
        return script(keys=keys, args=args)
