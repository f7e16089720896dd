"""A rolling-window rate limiter shared by every worker through Redis.

HubSpot counts calls per app and portal over a rolling 10 seconds; all of
leadscore's workers, on however many machines, must stay under it together.
Each call takes a slot in a Redis sorted set (one Lua script: drop expired slots,
count, take one or say how long to wait), on Redis's clock, so hosts whose clocks
disagree still share one window. A 429 from the CRM pauses every worker for the
time the CRM asked for; an LLM's 429 pauses its calls alike (`SharedPause`).
"""

from __future__ import annotations

import logging
import time
import uuid

from redis import Redis
from redis.exceptions import RedisError

from integration.errors import RateLimited

log = logging.getLogger(__name__)

_TAKE = """
redis.replicate_commands()
local time = redis.call('TIME')
local key, now = KEYS[1], tonumber(time[1]) + tonumber(time[2]) / 1000000
local window, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return tostring(paused / 1000) end
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, ARGV[3])
  redis.call('PEXPIRE', key, math.ceil(window * 1000))
  return '0'
end
local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
return tostring(tonumber(oldest[2]) + window - now)
"""


_PAUSE = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], 1, 'PX', ARGV[1])
end
"""


class SharedPause:
    """A hold-off every worker sees, kept in Redis on Redis's clock: set for as long as a 429 asked,
    and never cut short by a shorter one. Its calls raise RedisError: each caller knows how to hold
    off without Redis."""

    def __init__(self, redis: Redis, name: str):
        self.redis, self.key = redis, f"leadscore:rate-pause:{name}"
        self._pause = redis.register_script(_PAUSE)

    def pause(self, seconds: float) -> None:
        self._pause(keys=[self.key], args=[max(1, int(seconds * 1000))])

    def left_s(self) -> float:
        return max(self.redis.pttl(self.key), 0) / 1000


MAX_UNSHARED_PAUSE_S = 2.0  # the most a caller sleeps for a pause it cannot share (Redis unreachable)
DEFAULT_MAX_WAIT_S = 120.0  # a command's (`rescore`, `outcomes sync`): it has no other work to do


class RateLimiter:
    def __init__(
        self,
        redis: Redis,
        name: str,
        limit: int,
        window_s: float = 10.0,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
    ):
        """`max_wait_s`: how long `acquire` waits before it raises RateLimited; a worker's is short, so
        a pause the CRM asked for puts its batch off rather than holding the worker from other work."""
        self.redis, self.name, self.limit, self.window_s = redis, name, limit, window_s
        self.max_wait_s = max_wait_s
        self.paused = SharedPause(redis, name)
        self.key, self.pause_key = f"leadscore:rate:{name}", self.paused.key
        self._take = redis.register_script(_TAKE)

    def beside(self, what: str, limit: int, window_s: float) -> RateLimiter:
        """A limiter of its own for one kind of call the CRM limits apart (HubSpot's searches), waiting as
        long as this one does."""
        return RateLimiter(self.redis, f"{self.name}:{what}", limit, window_s, self.max_wait_s)

    def acquire(self) -> float:
        """Block until a call may be made, `max_wait_s` at most; returns the seconds waited."""
        max_wait_s, waited = self.max_wait_s, 0.0
        while True:
            try:
                wait = float(
                    self._take(
                        keys=[self.key, self.pause_key],
                        args=[self.window_s, self.limit, uuid.uuid4().hex],
                    )
                )
            except RedisError as exc:  # a limiter outage must not stop scoring; the CRM's 429s still bind
                log.warning("rate limiter unavailable (%s); calling without it", exc)
                return waited
            if wait <= 0:
                return waited
            if waited + wait > max_wait_s:
                raise RateLimited(
                    f"{self.key}: no call slot for {wait:.0f}s more, past the {max_wait_s:.0f}s it waits",
                    retry_after_s=wait,
                )
            time.sleep(min(wait, 1.0) + 0.01)
            waited += min(wait, 1.0) + 0.01

    def pause(self, seconds: float) -> None:
        """Every worker holds off for `seconds` (the CRM said so with a 429), or longer where another
        429 asked for longer: a secondly limit's 2 s must not cut short the daily limit's hour. Without
        Redis only this caller holds off, and a few seconds at most: a longer pause (a daily limit, a
        portal moving) is its caller's to wait out by putting its batch off, not a work horse asleep
        past its job's timeout."""
        try:
            self.paused.pause(seconds)
        except RedisError:
            time.sleep(min(seconds, MAX_UNSHARED_PAUSE_S))
