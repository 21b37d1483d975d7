"""The Redis index of durable timers: a sorted set of timer ids scored by fire time.

PostgreSQL holds every timer (``durable_timers``); this index only lets ``durable beat`` find
the due ones without scanning the table. Losing it loses nothing: the beat rebuilds it from
PostgreSQL when its marker key is gone (a flush, a restart without persistence), and sweeps
PostgreSQL for overdue timers in case an entry went missing some other way.

Keys, under the configurable prefix ``P`` (default ``durable``):

- ``P:timers`` sorted set, member = timer id, score = fire time (epoch seconds);
- ``P:timers:built`` string, present while the index is known complete.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import redis

# Atomically take up to ARGV[2] members due by ARGV[1] (epoch seconds) out of KEYS[1] and
# return them. Two beats calling this at once never receive the same member.
CLAIM_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #due > 0 then
    redis.call('ZREM', KEYS[1], unpack(due))
end
return due
"""


class TimerIndex:
    """The sorted set of pending timers, owned by this class with its key templates."""

    def __init__(self, redis_url: str, prefix: str = "durable") -> None:
        self.redis_url = redis_url
        self.key = f"{prefix}:timers"
        self.built_key = f"{prefix}:timers:built"
        self._client: redis.Redis | None = None
        self._pid = 0
        self._claim: Any = None

    @property
    def client(self) -> redis.Redis:
        """A client for this process (a forked child opens its own connections)."""
        if self._client is None or self._pid != os.getpid():
            self._client = redis.Redis.from_url(
                self.redis_url, socket_timeout=5, socket_connect_timeout=5
            )
            self._claim = self._client.register_script(CLAIM_DUE)
            self._pid = os.getpid()
        return self._client

    def add(self, timer_id: int, fire_at: float) -> None:
        """Index one timer."""
        self.client.zadd(self.key, {str(timer_id): fire_at})

    def claim_due(self, now: float, limit: int = 500) -> list[int]:
        """Remove and return the ids of timers due by ``now``."""
        _ = self.client
        members = self._claim(keys=[self.key], args=[now, limit])
        return [int(m) for m in members]

    def next_fire(self) -> float | None:
        """Fire time of the earliest indexed timer, or None."""
        first = self.client.zrange(self.key, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    def is_built(self) -> bool:
        """Whether the index is known complete (its marker survived)."""
        return bool(self.client.exists(self.built_key))

    def rebuild(self, timers: Iterable[tuple[int, float]]) -> int:
        """Add every given (id, fire time) and mark the index complete; returns the count."""
        count = 0
        pipe = self.client.pipeline(transaction=False)
        for timer_id, fire_at in timers:
            pipe.zadd(self.key, {str(timer_id): fire_at})
            count += 1
            if count % 1000 == 0:
                pipe.execute()
        pipe.set(self.built_key, "1")
        pipe.execute()
        return count

    def missing(self, timer_ids: list[int]) -> list[int]:
        """The ids among ``timer_ids`` that the index does not hold (one pipelined round trip).

        One ZSCORE per id: ZMSCORE would need Redis 6.2.
        """
        if not timer_ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for timer_id in timer_ids:
            pipe.zscore(self.key, str(timer_id))
        scores = pipe.execute()
        return [t for t, score in zip(timer_ids, scores, strict=True) if score is None]

    def size(self) -> int:
        """Number of indexed timers."""
        return int(self.client.zcard(self.key))

    def clear(self) -> None:
        """Delete the index and its marker (tests, tear-down)."""
        self.client.delete(self.key, self.built_key)
