"""Hand-off from the web side to the queue: deduplicate, coalesce, record atomically.

A delivery is acknowledged only after its pending leads and its "seen" marks are
in Redis in one MULTI/EXEC, so an answered 2xx always means durably queued and a
redelivery after a failure is never mistaken for a duplicate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

from redis import Redis
from redis.exceptions import RedisError
from rq import Queue

from integration import metrics, pending
from integration.errors import QueueUnavailable
from integration.events import LeadEvent, coalesce

log = logging.getLogger(__name__)

SEEN_WINDOW_S = 4 * 24 * 3600  # HubSpot retries for up to three days


@dataclass(frozen=True)
class Triaged:
    """What one CRM event comes to: a lead to score, or the reason it is not scored."""

    verdict: Literal["score", "ignore", "unsupported"]
    ref: str  # the CRM's own id for the event, for logs
    detail: str = ""
    lead_event: LeadEvent | None = None


@dataclass
class EnqueueReport:
    leads: list[str] = field(default_factory=list)
    duplicates: int = 0


def redis_from_url(url: str) -> Redis:
    return Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)


def _seen_keys(crm: str, account: str, window: int) -> list[str]:
    """Seen event ids per account in windows of SEEN_WINDOW_S; this window's and the last are checked."""
    return [f"leadscore:seen:{crm}:{account}:{w}" for w in (window, window - 1)]


def enqueue_scoring(
    queue: Queue, events: list[LeadEvent], batch_size: int = 100, counters: metrics.Increments = ()
) -> EnqueueReport:
    """Queue the leads of events not seen before, and get them batched.

    Two round trips a delivery, whatever its size: SMISMEMBER on two sets per account, then
    one transaction holding the seen marks, a score_batch job for every full batch in this
    delivery, the rest as pending leads (HSET, two ZADDs) for the collector, the delivery's
    counters (`counters` plus deduplicated/enqueued) and a ZCARD telling whether to kick.
    """
    report = EnqueueReport()
    connection: Redis = queue.connection
    if not events:
        metrics.incr_many(connection, list(counters))
        return report
    now = datetime.now(UTC)
    window = int(now.timestamp() // SEEN_WINDOW_S)
    groups: dict[tuple[str, str], list[LeadEvent]] = {}
    for event in events:
        groups.setdefault((event.crm, event.account_id), []).append(event)
    try:
        with connection.pipeline(transaction=False) as pipe:
            for (crm, account), group in groups.items():
                for key in _seen_keys(crm, account, window):
                    pipe.smismember(key, [e.event_ids[0] for e in group])
            answers = iter(pipe.execute())
        fresh: dict[tuple[str, str], list[LeadEvent]] = {}
        for account_key, group in groups.items():
            flags = zip(next(answers), next(answers), strict=True)
            fresh[account_key] = [
                e for e, (now_seen, before) in zip(group, flags, strict=True) if not (now_seen or before)
            ]
        report.duplicates = len(events) - sum(len(g) for g in fresh.values())
        queued: list[str] = []
        pending_counts: dict[tuple[str, str], int] = {}  # account → position of its ZCARD's answer
        with connection.pipeline(transaction=True) as pipe:
            for (crm, account), group in fresh.items():
                if not group:
                    continue
                leads = coalesce(group)
                queued += [e.lead_key for e in leads]
                size = pending.batch_size(crm, batch_size)
                full = len(leads) - len(leads) % size  # full batches go straight to the workers
                for start in range(0, full, size):
                    pending.enqueue_batch(queue, pipe, crm, account, leads[start : start + size])
                if leads[full:]:
                    pending.record(pipe, leads[full:], now.timestamp())
                key = _seen_keys(crm, account, window)[0]
                pipe.sadd(key, *(i for e in group for i in e.event_ids))
                pipe.expire(key, 2 * SEEN_WINDOW_S)
                pending_counts[(crm, account)] = len(pipe)
                pipe.zcard(pending.since_key(crm, account))
            crm = events[0].crm
            metrics.add_counters(
                pipe,
                [
                    *counters,
                    ("events_deduplicated_total", report.duplicates, {"crm": crm}),
                    ("events_enqueued_total", len(events) - report.duplicates, {"crm": crm}),
                ],
            )
            answers = pipe.execute()
        report.leads = queued  # durably queued from here on
        for (crm, account), position in pending_counts.items():
            if answers[position]:
                pending.kick(queue, crm, account)
    except RedisError as exc:
        log.error("redis refused the delivery: %s", exc)
        if report.leads:  # queued durably; only a kick failed, and the sweeper repairs that
            return report
        raise QueueUnavailable("the queue (Redis) is unavailable, nothing was accepted; retry later") from exc
    return report


def hand_off(queue: Queue, crm: str, triaged: list[Triaged], batch_size: int = 100) -> dict:
    """Log what is not scored, enqueue the rest; the summary every webhook answers with."""
    ignored: dict[str, int] = {}
    for item in triaged:
        if item.verdict != "score":
            level = logging.INFO if item.verdict == "ignore" else logging.WARNING
            log.log(
                level, "%s event %s not scored: %s", crm, item.ref, item.detail, extra={"event_id": item.ref}
            )
            ignored[item.verdict] = ignored.get(item.verdict, 0) + 1
    to_score = [t.lead_event for t in triaged if t.verdict == "score"]
    counters = [
        ("events_received_total", len(triaged), {"crm": crm}),
        *(("events_ignored_total", n, {"crm": crm, "reason": reason}) for reason, n in ignored.items()),
    ]
    report = enqueue_scoring(queue, to_score, batch_size, counters)
    return {
        "received": len(triaged),
        "enqueued": len(report.leads),
        "duplicates": report.duplicates,
        "ignored": ignored.get("ignore", 0),
        "unsupported": ignored.get("unsupported", 0),
        "leads": report.leads,
    }
