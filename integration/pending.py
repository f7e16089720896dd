"""Pending leads, coalesced per CRM account: one entry per lead, the newest event wins.

The web side appends each delivery's events to the account's intake stream, in the
transaction that lets it answer 2xx. The account's `collect` job drains the intake — drops
events seen before, coalesces the rest into one pending entry per lead — moves every full
batch into a `score_batch` RQ job at once, and batches what is left after a short linger
(only while the workers have nothing else to do). Each move is one MULTI transaction, so an
event is always in the intake, pending, or inside a durable RQ job — never in between; a
collector killed mid-drain leaves its entries in the intake for the next one, and the
seen marks make draining them twice harmless.

Batches of leads that only `leadscore rescore` brought go to the backfill queue beside the
workers' queue; workers take from their own queue first, so a lead a webhook just brought is
scored within seconds while a backfill of every lead of an account runs behind it.

Keys, all under `leadscore:`:
  intake:{crm}:{account}         stream  deliveries as the web queued them (`pack_intake`)
  intake-events:{crm}:{account}  string  how many events the intake holds
  seen:{crm}:{account}:{window}  set     event ids drained, per SEEN_WINDOW_S window
  pending:{crm}:{account}        hash    lead id → LeadEvent JSON
  since:{crm}:{account}          zset    lead id → when its event was accepted (linger, age)
  accounts                       zset    "{crm}:{account}" → when its oldest waiting event came
  kick:{crm}:{account}           string  a collect job is queued or running for the account
  handoffs                       string  the last hand-off's number: each batch takes the next
  handed:{crm}:{account}         hash    lead id → the number of its newest hand-off
  handed-at:{crm}:{account}      zset    lead id → when it was handed off, so old marks are trimmed
  handoff:{crm}:{account}        hash    the marks as older releases kept them, never trimmed: read
                                         until it expires, HANDOFF_TTL_S after their last hand-off
  backfill:{crm}:{account}       zset    lead id → when a backfill batch took it, until a batch scores it
"""

from __future__ import annotations

import re
import uuid

from redis import Redis
from redis.client import Pipeline
from redis.exceptions import WatchError
from rq import Queue, Retry
from rq.job import Job

from integration import hubspot, metrics, salesforce
from integration.clock import shared_now
from integration.events import (
    ERASE,
    FORCED,
    RESCORE,
    LeadEvent,
    coalesce,
    dump_events,
    parse_events,
    unpack_intake,
)

_DELETE_IF_OWN = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
)
# Renews a collector's kick while it is its own (or nobody's: it expired); 0 when another's.
_HOLD_KICK = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""
# Deletes intake entries (ARGV: id, events, id, events, …) and takes the events of those it
# deleted off the intake's count; an entry another collector already deleted counts nothing.
_DELETE_DRAINED = """
local drained = 0
for i = 1, #ARGV, 2 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then drained = drained + tonumber(ARGV[i + 1]) end
end
if drained > 0 then redis.call('DECRBY', KEYS[2], drained) end
return drained
"""
# accounts[member] = the older of the first pending lead and the first intake entry (its id
# starts with its time in ms), or no entry when both are empty.
_REFRESH_OLDEST = """
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local oldest = first[2] and tonumber(first[2])
local head = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
if head[1] then
  local queued = tonumber(string.match(head[1][1], '^(%d+)')) / 1000
  if not oldest or queued < oldest then oldest = queued end
end
if oldest then return redis.call('ZADD', KEYS[3], oldest, ARGV[1]) end
return redis.call('ZREM', KEYS[3], ARGV[1])
"""
# Forgets the hand-off marks (KEYS[1]) of leads last handed to a batch before ARGV[1], by when each
# was handed (KEYS[2]); at most ARGV[2] a call, so no call blocks Redis for long.
_TRIM_HANDOFFS = """
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #old > 0 then
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('ZREM', KEYS[2], unpack(old))
end
return #old
"""
# A rescore's hand-off marks (KEYS[1], when in KEYS[2]) only the leads no batch has marked, in these
# marks or in those of older releases (KEYS[3]). ARGV: the hand-off, now, the lead ids.
_MARK_UNMARKED = """
for i = 3, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 and redis.call('HEXISTS', KEYS[3], ARGV[i]) == 0 then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[1])
    redis.call('ZADD', KEYS[2], ARGV[2], ARGV[i])
  end
end
"""
ACCOUNTS = "leadscore:accounts"
CRM_BATCH_LIMIT = {"hubspot": hubspot.BATCH_LIMIT, "salesforce": salesforce.BATCH_LIMIT}
COLLECT_JOB = "workers.batch.collect"
SCORE_BATCH_JOB = "workers.batch.score_batch"
HANDOFFS = "leadscore:handoffs"
HANDOFF_TTL_S = 3 * 24 * 3600  # past the longest a batch is put off for a CRM outage (48 h)
HANDOFFS_TRIMMED = 1000  # old marks a hand-off trims at most: five times the largest batch
KICK_TTL_S = 120  # a collect job that died is replaced after this long
# In a waiting event's JSON, without parsing every one: an erasure or a forced rescore among its kinds
# (not a changed property that happens to be named so).
_NOT_TO_REPLACE = re.compile(rf'"kinds":\[[^\]]*"(?:{ERASE}|{FORCED})"'.encode())
BATCH_RETRY = Retry(max=5, interval=[5, 30, 120, 600, 1800])
# A failed job stays a month for `leadscore failed` and `requeue`, not RQ's default year: its error may
# quote what the CRM said of a lead.
FAILED_KEPT_S = 30 * 24 * 3600
BATCH_TIMEOUT_S = 600
SEEN_WINDOW_S = 4 * 24 * 3600  # HubSpot retries for up to three days
DRAIN_ENTRIES = 20  # deliveries a collector takes from the intake at a time
BACKFILL = "-backfill"  # suffix of the queue beside the workers' queue that rescores wait in


def pending_key(crm: str, account: str) -> str:
    return f"leadscore:pending:{crm}:{account}"


def since_key(crm: str, account: str) -> str:
    return f"leadscore:since:{crm}:{account}"


def kick_key(crm: str, account: str) -> str:
    return f"leadscore:kick:{crm}:{account}"


def intake_key(crm: str, account: str) -> str:
    return f"leadscore:intake:{crm}:{account}"


def intake_events_key(crm: str, account: str) -> str:
    return f"leadscore:intake-events:{crm}:{account}"


def seen_keys(crm: str, account: str, now: float) -> tuple[str, str]:
    """This window's set of drained event ids, and the last window's; both are checked."""
    window = int(now // SEEN_WINDOW_S)
    return tuple(f"leadscore:seen:{crm}:{account}:{w}" for w in (window, window - 1))


def seen_until(now: float) -> int:
    """When this window's set is last checked: the end of the next window, which checks it as the last."""
    return (int(now // SEEN_WINDOW_S) + 2) * SEEN_WINDOW_S


def add_intake(pipe: Pipeline, crm: str, account: str, packed: str, events: int, accepted_at: float) -> None:
    """The web's half of accepting a delivery; runs inside its transaction."""
    pipe.xadd(intake_key(crm, account), {"d": packed})
    pipe.incrby(intake_events_key(crm, account), events)
    pipe.zadd(ACCOUNTS, {f"{crm}:{account}": accepted_at}, nx=True)


def drain(redis: Redis, crm: str, account: str, entries: int = DRAIN_ENTRIES) -> int:
    """Move the oldest intake entries into pending leads; returns how many entries it moved."""
    taken = redis.xrange(intake_key(crm, account), count=entries)
    if taken:
        move_to_pending(redis, crm, account, taken)
    return len(taken)


def move_to_pending(redis: Redis, crm: str, account: str, taken: list[tuple[bytes, dict]]) -> None:
    """Events drained before (a CRM's retry, a redelivery, a racing collector) are dropped and
    counted; the rest are coalesced, one pending entry per lead, in the transaction that deletes
    the entries. The account's waiting leads and drained ids are watched from before they are read:
    a second collector (one kicked after this one's kick expired) that moves any of them first makes
    this one read again, so neither replaces what the other wrote (an erasure above all)."""
    unpacked = [(entry_id, unpack_intake(crm, fields[b"d"])) for entry_id, fields in taken]
    events = [event for _, entry_events in unpacked for event in entry_events]
    drained_at = shared_now(redis)
    current, previous = seen_keys(crm, account, drained_at)
    ids = [event.event_ids[0] for event in events]
    sizes = [arg for entry_id, entry_events in unpacked for arg in (entry_id, len(entry_events))]
    with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(pending_key(crm, account), current)
                seen_now, seen_before = pipe.smismember(current, ids), pipe.smismember(previous, ids)
                fresh: dict[str, LeadEvent] = {}
                for event, now, before in zip(events, seen_now, seen_before, strict=True):
                    if not (now or before):
                        fresh.setdefault(event.event_ids[0], event)
                leads = _keeping_erasures(pipe, crm, account, coalesce(list(fresh.values()))) if fresh else []
                pipe.multi()
                if fresh:
                    record(pipe, leads)
                    pipe.sadd(current, *fresh)
                    pipe.expireat(current, seen_until(drained_at))  # marks live 4 to 8 days
                intake = (intake_key(crm, account), intake_events_key(crm, account))
                pipe.eval(_DELETE_DRAINED, len(intake), *intake, *sizes)
                refresh_oldest(pipe, crm, account)
                deduplicated = len(events) - len(fresh)
                metrics.add_counters(pipe, [("events_deduplicated_total", deduplicated, {"crm": crm})])
                pipe.execute()
                return
            except WatchError:
                continue


def _keeping_erasures(redis: Redis, crm: str, account: str, events: list[LeadEvent]) -> list[LeadEvent]:
    """The newest event replaces a lead's waiting one, except an erasure, which nothing may drop, and
    a forced rescore: an event that comes after one (a late retry of an older change) is merged into
    it. The caller watches the waiting events, so none changes between this read and its replacement."""
    return _over_waiting(redis, crm, account, events, always=False)[0]


def _over_waiting(
    redis: Redis, crm: str, account: str, events: list[LeadEvent], always: bool
) -> tuple[list[LeadEvent], int]:
    """Each event merged into its lead's waiting one where `always`, or where that one is an erasure
    or a forced rescore; else the event alone. And how many of the leads had none waiting."""
    waiting = redis.hmget(pending_key(crm, account), [event.lead_id for event in events])
    merged = [
        LeadEvent.model_validate_json(raw).merged_with(event)
        if raw and (always or _not_to_replace(raw))
        else event
        for event, raw in zip(events, waiting, strict=True)
    ]
    return merged, sum(raw is None for raw in waiting)


def _not_to_replace(raw: bytes) -> bool:
    return _NOT_TO_REPLACE.search(raw) is not None


def refresh_oldest(pipe: Pipeline, crm: str, account: str) -> None:
    keys = (since_key(crm, account), intake_key(crm, account), ACCOUNTS)
    pipe.eval(_REFRESH_OLDEST, len(keys), *keys, f"{crm}:{account}")


def batch_size(crm: str, wanted: int) -> int:
    return min(wanted, CRM_BATCH_LIMIT[crm])


def record(pipe: Pipeline, events: list[LeadEvent], keep_waiting: bool = False) -> None:
    """Make these leads pending (the newest event replaces one already there, unless `keep_waiting`:
    a rescore leaves a lead's waiting event, which scores it anyway, as it is); in the caller's
    transaction. A lead's linger counts from when its event was accepted."""
    by_account: dict[tuple[str, str], list[LeadEvent]] = {}
    for event in events:
        by_account.setdefault((event.crm, event.account_id), []).append(event)
    for (crm, account), group in by_account.items():
        ids = [e.lead_id for e in group]
        if keep_waiting:
            for lead_id, event in zip(ids, dump_events(group), strict=True):
                pipe.hsetnx(pending_key(crm, account), lead_id, event)
        else:
            pipe.hset(pending_key(crm, account), mapping=dict(zip(ids, dump_events(group), strict=True)))
        pipe.zadd(since_key(crm, account), {e.lead_id: e.accepted_at.timestamp() for e in group}, nx=True)
        pipe.zadd(ACCOUNTS, {f"{crm}:{account}": min(e.accepted_at.timestamp() for e in group)}, nx=True)


def requeue(queue: Queue, crm: str, account: str, events: list[LeadEvent], merge: bool = False) -> int:
    """Make these leads of one account pending again, to be scored as they are now, in one
    transaction, and kick the account's collector. A lead already waiting keeps its event (it is
    scored anyway), so running this twice queues nothing twice; with `merge` (a forced rescore), these
    events are merged into it, so what they ask is not lost. Returns how many were not waiting."""
    if merge:
        added = _merged_into_waiting(queue.connection, crm, account, events)
    else:
        with queue.connection.pipeline(transaction=True) as pipe:
            record(pipe, events, keep_waiting=True)
            added = sum(pipe.execute()[: len(events)])  # `record` sends one HSETNX a lead first
    kick(queue, crm, account)
    return added


def _merged_into_waiting(redis: Redis, crm: str, account: str, events: list[LeadEvent]) -> int:
    """Each event merged into the lead's waiting one, if any, in one transaction watched from the read."""
    with redis.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(pending_key(crm, account))
                merged, added = _over_waiting(pipe, crm, account, events, always=True)
                pipe.multi()
                record(pipe, merged)
                pipe.execute()
                return added
            except WatchError:
                continue


def worker_queues(name: str, connection: Redis) -> list[Queue]:
    """The queues a worker takes jobs from, in order: webhook work first, then the backfill."""
    return [Queue(name, connection=connection), Queue(name + BACKFILL, connection=connection)]


def live_queue(queue: Queue) -> Queue:
    """The workers' own queue, from either of the two: collectors and live batches belong there."""
    if not queue.name.endswith(BACKFILL):
        return queue
    return Queue(queue.name.removesuffix(BACKFILL), connection=queue.connection)


def kick(queue: Queue, crm: str, account: str) -> Job | None:
    """Make sure one collect job is queued or running for the account (on the live queue, even
    when a backfill batch's fallback rescore asks). The kick and its job are made in one transaction:
    a kick whose job Redis never took would keep the sweeper off the account for KICK_TTL_S."""
    queue = live_queue(queue)
    token, key = uuid.uuid4().hex, kick_key(crm, account)
    with queue.connection.pipeline() as pipe:
        try:
            pipe.watch(key)
            if pipe.exists(key):
                pipe.unwatch()
                return None
            pipe.multi()
            pipe.set(key, token, ex=KICK_TTL_S)
            [job] = queue.enqueue_many(
                [
                    Queue.prepare_data(
                        COLLECT_JOB,
                        args=(crm, account, token),
                        timeout=BATCH_TIMEOUT_S,
                        retry=Retry(max=3, interval=[1, 5, 30]),
                        result_ttl=300,
                        failure_ttl=FAILED_KEPT_S,
                        description=f"collect {crm}:{account}",
                    )
                ],
                pipeline=pipe,
            )
            pipe.execute()
        except WatchError:  # another process kicked it meanwhile
            return None
    return job


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
                handoff = pipe.incr(HANDOFFS)  # numbered after they were read: above any earlier hand-off
                pipe.multi()
                pipe.hdel(pending, *ids)
                pipe.zrem(since, *ids)
                refresh_oldest(pipe, crm, account)
                job = enqueue_batch(queue, pipe, crm, account, events, handoff)
                pipe.execute()
                return job
            except WatchError:
                continue


def backfill_key(crm: str, account: str) -> str:
    return f"leadscore:backfill:{crm}:{account}"


def backfilling(redis: Redis, crm: str, account: str, lead_ids: list[str]) -> list[bool]:
    """Whether each lead waits in a backfill batch not yet scored: a second rescore leaves it there.
    A lead whose batch failed for good counts as waiting for HANDOFF_TTL_S at most (to be requeued
    from `leadscore failed`), then a rescore queues it again."""
    if not lead_ids:
        return []
    since = shared_now(redis) - HANDOFF_TTL_S
    taken = redis.zmscore(backfill_key(crm, account), lead_ids)
    return [at is not None and at > since for at in taken]


def backfilled(redis: Redis, crm: str, account: str, lead_ids: list[str]) -> None:
    """A batch, backfill or live, has scored these leads: no backfill batch need wait for them."""
    if lead_ids:
        redis.zrem(backfill_key(crm, account), *lead_ids)


def handoff_keys(crm: str, account: str) -> tuple[str, str, str]:
    """The account's hand-off marks, when each was made, and the marks older releases kept."""
    return (
        f"leadscore:handed:{crm}:{account}",
        f"leadscore:handed-at:{crm}:{account}",
        f"leadscore:handoff:{crm}:{account}",
    )


def newest_handoffs(redis: Redis, crm: str, account: str, lead_ids: list[str]) -> list[int | None]:
    """The number of each lead's newest hand-off, or None for a lead not handed off in HANDOFF_TTL_S."""
    marks, _, marks_before = handoff_keys(crm, account)
    with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(marks, lead_ids)
        pipe.hmget(marks_before, lead_ids)
        now, before = pipe.execute()
    return [
        max((int(mark) for mark in pair if mark is not None), default=None)
        for pair in zip(now, before, strict=True)
    ]


def enqueue_batch(
    queue: Queue, pipe: Pipeline, crm: str, account: str, events: list[str], handoff: int
) -> Job:
    """A score_batch job for these leads (LeadEvent JSON), numbered `handoff`, queued inside the
    caller's transaction.

    Each lead keeps the number of its newest hand-off, so a slower batch holding an older event can
    tell that a newer one has been handed out since. Redis hands the numbers out in order, so the mark
    only ever rises; the web hosts' clocks, which may disagree, have no say in it. A mark older than
    HANDOFF_TTL_S, past any batch still waiting, is trimmed by a later hand-off of the account.

    A batch of rescores only (no webhook waits on it) goes to the backfill queue, behind live work,
    and marks only leads that have no mark: a webhook's batch still waiting for its turn must not
    be superseded by a rescore that reached its lead meanwhile, or the lead would wait behind the
    whole backfill. Both read the CRM when they run, so both may write.
    """
    numbered = [event.model_copy(update={"handoff": handoff}) for event in parse_events(events)]
    target = live_queue(queue)
    marks, marked_at, marks_before = handoff_keys(crm, account)
    now = shared_now(queue.connection)
    if all(RESCORE in event.kinds for event in numbered):
        target = Queue(target.name + BACKFILL, connection=target.connection)
        ids = [event.lead_id for event in numbered]
        pipe.eval(_MARK_UNMARKED, 3, marks, marked_at, marks_before, handoff, now, *ids)
        pipe.zadd(backfill_key(crm, account), {event.lead_id: now for event in numbered})
        pipe.zremrangebyscore(backfill_key(crm, account), 0, now - HANDOFF_TTL_S)
        pipe.expire(backfill_key(crm, account), HANDOFF_TTL_S)
    else:
        pipe.hset(marks, mapping={event.lead_id: handoff for event in numbered})
        pipe.zadd(marked_at, {event.lead_id: now for event in numbered})
    pipe.eval(_TRIM_HANDOFFS, 2, marks, marked_at, now - HANDOFF_TTL_S, HANDOFFS_TRIMMED)
    pipe.expire(marks, HANDOFF_TTL_S)
    pipe.expire(marked_at, HANDOFF_TTL_S)
    [job] = target.enqueue_many(
        [
            Queue.prepare_data(
                SCORE_BATCH_JOB,
                args=(crm, account, dump_events(numbered)),
                timeout=BATCH_TIMEOUT_S,
                retry=BATCH_RETRY,
                failure_ttl=FAILED_KEPT_S,
                description=f"score {len(events)} leads of {crm}:{account}",
            )
        ],
        pipeline=pipe,
    )
    return job


def hold_kick(redis: Redis, crm: str, account: str, token: str | None) -> bool:
    """Keep this collector's kick alive while it runs; False when a later collector holds it (this
    one waited in the queue past the kick's life), which then collects instead."""
    if token is None:
        return True
    return bool(redis.eval(_HOLD_KICK, 1, kick_key(crm, account), token, KICK_TTL_S))


def release(queue: Queue, crm: str, account: str, token: str | None) -> Job | None:
    """A collect job is done: drop its kick (only its own), and kick again if leads arrived meanwhile."""
    redis = queue.connection
    redis.eval(_DELETE_IF_OWN, 1, kick_key(crm, account), token or "")
    if redis.zcard(since_key(crm, account)) or redis.xlen(intake_key(crm, account)):
        return kick(queue, crm, account)
    return None


def stale_accounts(redis: Redis, older_than_s: float) -> list[tuple[str, str]]:
    """Accounts whose oldest pending lead waits longer than it should (a lost kick)."""
    cutoff = shared_now(redis) - older_than_s
    return [tuple(member.decode().split(":", 1)) for member in redis.zrangebyscore(ACCOUNTS, 0, cutoff)]


def depth(redis: Redis) -> int:
    """Leads pending plus events still in the intakes (not yet deduplicated or coalesced)."""
    accounts = [member.decode().split(":", 1) for member in redis.zrange(ACCOUNTS, 0, -1)]
    with redis.pipeline(transaction=False) as pipe:
        for crm, account in accounts:
            pipe.zcard(since_key(crm, account))
            pipe.get(intake_events_key(crm, account))
        return sum(int(answer or 0) for answer in pipe.execute())
