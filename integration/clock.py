"""The time every host agrees on: Redis's clock, read once a minute and run on by this host's own timer.

A web host stamps when it accepted a delivery; a worker on another host compares that stamp with its
own "now" to linger, to sweep lost kicks and to measure freshness. Host clocks disagree (a VM resumed,
NTP not yet synced), and a web host an hour ahead would make a lone lead linger for an hour. So the
stamps and the comparisons both read Redis's clock, at the cost of one TIME call a minute per process
(a forked job that needs the time reads it once). Erasure marks need Redis's time exactly, so
`redis_now` asks it every time.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from weakref import WeakKeyDictionary

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

REFRESH_S = 60.0
RETRY_S = 1.0  # while no reading was ever had: this host's clock meanwhile, Redis asked again soon
# Runs on through a suspend (a VM paused, a laptop asleep), where the monotonic clock stops.
_timer = getattr(time, "CLOCK_BOOTTIME", None)


def _elapsed() -> float:
    return time.clock_gettime(_timer) if _timer is not None else time.monotonic()


class _Reading:
    __slots__ = ("redis_time", "read_at", "tried_at", "warned")

    def __init__(self, redis_time: float | None, read_at: float):
        self.redis_time, self.read_at, self.tried_at, self.warned = redis_time, read_at, read_at, False


# connection pool → the last reading of Redis's clock through it
_readings: WeakKeyDictionary = WeakKeyDictionary()


def redis_now(redis: Redis) -> float:
    """Redis's clock this instant, asked of Redis."""
    seconds, microseconds = redis.time()
    return seconds + microseconds / 1e6


def shared_now(redis: Redis) -> float:
    """Seconds since the epoch on Redis's clock. Between readings it runs on from the last good one,
    a failed refresh included; only a process that never reached Redis uses its own clock. One caller
    refreshes while the others run on, so a Redis that stalls costs one request its wait, not all."""
    pool = redis.connection_pool
    now = _elapsed()
    reading = _readings.get(pool)
    if reading is None:
        reading = _readings.setdefault(pool, _Reading(None, now - RETRY_S))
    if now - reading.tried_at >= (RETRY_S if reading.redis_time is None else REFRESH_S):
        reading.tried_at = now  # claimed before asking
        reading = _refresh(redis, pool, reading)
    if reading.redis_time is None:
        return time.time()
    return reading.redis_time + (_elapsed() - reading.read_at)


def shared_now_utc(redis: Redis) -> datetime:
    return datetime.fromtimestamp(shared_now(redis), UTC)


def _refresh(redis: Redis, pool, last: _Reading) -> _Reading:
    before = _elapsed()
    try:
        at = redis_now(redis)
    except RedisError as exc:  # the caller's own Redis call will say so
        if last.redis_time is None and not last.warned:
            last.warned = True
            log.warning("could not read Redis's clock, using this host's until it answers: %s", exc)
        last.tried_at = _elapsed()  # a slow failure does not make the next caller due at once
        return last
    fresh = _Reading(at, (before + _elapsed()) / 2)
    _readings[pool] = fresh
    return fresh
