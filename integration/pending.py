"""Pending leads, coalesced per CRM account: one entry per lead, the newest event wins.

The web side records leads here and moves every full batch straight into a
`score_batch` RQ job; for what is left, a `collect` job per account waits out a short
linger — only while the workers have nothing else to do — and batches it then. Each move
is one WATCH/MULTI transaction, so a lead is always either pending or inside a
durable RQ job — never in between.

Keys, all under `leadscore:`:
  pending:{crm}:{account}  hash   lead id → LeadEvent JSON
  since:{crm}:{account}    zset   lead id → when it first became pending (linger, age)
  accounts                 zset   "{crm}:{account}" → its oldest pending lead's time
  kick:{crm}:{account}     string a collect job is queued or running for the account
"""

from __future__ import annotations

import time
import uuid

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq import Queue, Retry
from rq.job import Job

from integration.events import LeadEvent, dump_events, parse_events

_DELETE_IF_OWN = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)
ACCOUNTS = "leadscore:accounts"
CRM_BATCH_LIMIT = {"hubspot": 100, "salesforce": 200}
COLLECT_JOB = "workers.batch.collect"
SCORE_BATCH_JOB = "workers.batch.score_batch"
LATEST_TTL_S = 24 * 3600
KICK_TTL_S = 120  # a collect job that died is replaced after this long
BATCH_RETRY = Retry(max=5, interval=[5, 30, 120, 600, 1800])
BATCH_TIMEOUT_S = 600


def pending_key(crm: str, account: str) -> str:
    return f"leadscore:pending:{crm}:{account}"


def since_key(crm: str, account: str) -> str:
    return f"leadscore:since:{crm}:{account}"


def kick_key(crm: str, account: str) -> str:
    return f"leadscore:kick:{crm}:{account}"


def batch_size(crm: str, wanted: int) -> int:
    return min(wanted, CRM_BATCH_LIMIT[crm])


def record(pipe: Pipeline, events: list[LeadEvent], now: float) -> None:
    """Queue-side half of accepting a delivery; runs inside the web's transaction."""
    by_account: dict[tuple[str, str], list[LeadEvent]] = {}
    for event in events:
        by_account.setdefault((event.crm, event.account_id), []).append(event)
    for (crm, account), group in by_account.items():
        ids = [e.lead_id for e in group]
        pipe.hset(pending_key(crm, account), mapping=dict(zip(ids, dump_events(group), strict=True)))
        pipe.zadd(since_key(crm, account), dict.fromkeys(ids, now), nx=True)
        pipe.zadd(ACCOUNTS, {f"{crm}:{account}": now}, nx=True)


def kick(queue: Queue, crm: str, account: str) -> Job | None:
    """Make sure one collect job is queued or running for the account."""
    token = uuid.uuid4().hex
    if not queue.connection.set(kick_key(crm, account), token, nx=True, ex=KICK_TTL_S):
        return None
    return queue.enqueue(
        COLLECT_JOB,
        crm,
        account,
        token,
        job_timeout=BATCH_TIMEOUT_S,
        retry=Retry(max=3, interval=[1, 5, 30]),
        result_ttl=300,
        description=f"collect {crm}:{account}",
    )


def oldest(redis: Redis, crm: str, account: str) -> tuple[int, float | None]:
    """How many leads are pending for the account, and since when the oldest."""
    with redis.pipeline(transaction=True) as pipe:
        pipe.zcard(since_key(crm, account))
        pipe.zrange(since_key(crm, account), 0, 0, withscores=True)
        count, first = pipe.execute()
    return (count, first[0][1]) if first else (0, None)


def take_batch(queue: Queue, crm: str, account: str, size: int) -> Job | None:
    """Move up to `size` pending leads, oldest first, into one durable score_batch job."""
    pending, since = pending_key(crm, account), since_key(crm, account)
    with queue.connection.pipeline() as pipe:
        while True:
            try:
                pipe.watch(pending, since)
                ids = [i.decode() for i in pipe.zrange(since, 0, size - 1)]
                if not ids:
                    pipe.unwatch()
                    return None
                events = [raw.decode() for raw in pipe.hmget(pending, ids) if raw is not None]
                after = pipe.zrange(since, size, size, withscores=True)
                pipe.multi()
                pipe.hdel(pending, *ids)
                pipe.zrem(since, *ids)
                if after:
                    pipe.zadd(ACCOUNTS, {f"{crm}:{account}": after[0][1]})
                else:
                    pipe.zrem(ACCOUNTS, f"{crm}:{account}")
                job = enqueue_batch(queue, pipe, crm, account, parse_events(events))
                pipe.execute()
                return job
            except WatchError:
                continue


def latest_key(crm: str, account: str) -> str:
    return f"leadscore:latest:{crm}:{account}"


def enqueue_batch(queue: Queue, pipe: Pipeline, crm: str, account: str, events: list[LeadEvent]) -> Job:
    """A score_batch job for these leads, queued inside the caller's transaction.

    When each lead's newest event was accepted is kept per lead, so a slower batch holding an
    older event can tell that a newer one has been handed out since.
    """
    pipe.hset(latest_key(crm, account), mapping={e.lead_id: e.accepted_at.timestamp() for e in events})
    pipe.expire(latest_key(crm, account), LATEST_TTL_S)
    [job] = queue.enqueue_many(
        [
            Queue.prepare_data(
                SCORE_BATCH_JOB,
                args=(crm, account, dump_events(events)),
                timeout=BATCH_TIMEOUT_S,
                retry=BATCH_RETRY,
                description=f"score {len(events)} leads of {crm}:{account}",
            )
        ],
        pipeline=pipe,
    )
    return job


def release(queue: Queue, crm: str, account: str, token: str | None) -> Job | None:
    """A collect job is done: drop its kick (only its own), and kick again if leads arrived meanwhile."""
    redis = queue.connection
    redis.eval(_DELETE_IF_OWN, 1, kick_key(crm, account), token or "")
    if redis.zcard(since_key(crm, account)):
        return kick(queue, crm, account)
    return None


def stale_accounts(redis: Redis, older_than_s: float, now: float | None = None) -> list[tuple[str, str]]:
    """Accounts whose oldest pending lead waits longer than it should (a lost kick)."""
    cutoff = (now or time.time()) - older_than_s
    return [tuple(member.decode().split(":", 1)) for member in redis.zrangebyscore(ACCOUNTS, 0, cutoff)]


def depth(redis: Redis) -> int:
    members = redis.zrange(ACCOUNTS, 0, -1)
    return sum(redis.zcard(since_key(*member.decode().split(":", 1))) for member in members)
