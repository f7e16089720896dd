"""The pipeline's RQ jobs: `collect` turns pending leads into batches, `score_batch` scores them.

A batch is one CRM read (HubSpot `batch/read`, with the contacts' companies and, for those with
sales activity, their notes and emails; Salesforce one SOQL `IN`, with the Leads' latest tasks), LLM
calls made concurrently (cached by input fingerprint), and one CRM write (HubSpot `batch/update`,
Salesforce sObject Collections). A record the CRM refuses is split
off into a job of its own, so it is retried — or dead-lettered with the CRM's
reason — without holding back the rest.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from rq import Queue, get_current_job

from integration import metrics, pending
from integration.clock import redis_now, shared_now, shared_now_utc
from integration.crm import same_account
from integration.errors import CRMError, CRMUnavailable, RateLimited, WriteRejected, WritesRefusedAlike
from integration.events import ERASE, FORCED, RESCORE, LeadEvent, deal_of, dump_events, parse_events
from workers.jobs import context, erased_since, outcome, put_back_key
from workers.store import LeadFact

log = logging.getLogger(__name__)

SWEEP_AFTER_S = 30  # a pending lead older than this with no collector means a lost kick
LINGER_POLL_S = 0.05
PASS_S = 1.0  # under a steady stream of events, a collector steps aside this often
MAX_FALLBACK_RESCORES = 5  # at the default FALLBACK_RESCORE_S: after 5, 10, 20, 40 and 80 minutes
# Fallbacks because the LLM asked to wait (429) spend none of those rounds, up to this many (an hour at
# the default FALLBACK_RESCORE_S, in the first round): an LLM whose quota is spent for good still ends.
MAX_THROTTLED_RESCORES = 12
# A batch the CRM cannot take (down, in maintenance) waits 30 s, then twice as long each time up to an
# hour, for up to two days since it first failed: longer than any CRM's maintenance window, shorter than
# pending.SEEN_WINDOW_S, within which the CRM's redeliveries of its events are dropped as seen.
OUTAGE_FIRST_WAIT_S = 30
OUTAGE_MAX_WAIT_S = 3600
OUTAGE_GIVE_UP_S = 48 * 3600
OUTAGE_META = "crm_unavailable"  # job meta: {"since": when the batch first failed, "waits": put-offs}


def _queue() -> Queue:
    job = get_current_job()
    return Queue(job.origin, connection=job.connection)


def collect(crm: str, account: str, token: str | None = None) -> dict:
    """Drain the account's intake into pending leads and batch them: full batches at once, the
    rest once the oldest lead has lingered long enough. It waits only while no other job is
    queued, and stops batching after PASS_S when other jobs wait; then it steps aside (goes to
    the back of the queue), so it never holds a worker that has work to do."""
    queue = _queue()
    settings = context().settings
    size = pending.batch_size(crm, settings.batch_size)
    batches = 0
    step_aside_at = time.monotonic() + PASS_S
    try:
        while time.monotonic() < step_aside_at or not queue.count:
            if not pending.hold_kick(queue.connection, crm, account, token):
                break  # another collector of the account runs: two would do the same work twice
            drained = pending.drain(queue.connection, crm, account)
            count, since = pending.oldest(queue.connection, crm, account)
            if not count:
                if drained:
                    continue
                break
            if count >= size or since + settings.batch_linger_s <= shared_now(queue.connection):
                batches += pending.take_batch(queue, crm, account, size) is not None
                continue
            if queue.count:
                break  # the release below queues this collector again, behind that work
            if not drained:
                time.sleep(LINGER_POLL_S)
    finally:
        pending.release(queue, crm, account, token)
    sweep(queue)
    return {"account": f"{crm}:{account}", "batches": batches}


def _batch_of(queue: Queue, crm: str, account: str, events: list[LeadEvent], description: str) -> None:
    """A batch job of these events alone, retried and dead-lettered as every batch is."""
    queue.enqueue_many(
        [
            Queue.prepare_data(
                pending.SCORE_BATCH_JOB,
                args=(crm, account, dump_events(events)),
                timeout=pending.BATCH_TIMEOUT_S,
                retry=pending.BATCH_RETRY,
                failure_ttl=pending.FAILED_KEPT_S,
                description=description,
            )
        ]
    )


def sweep(queue: Queue) -> int:
    """Kick accounts whose leads wait with no collector (its kick was lost with a dead process)."""
    kicked = 0
    for crm, account in pending.stale_accounts(queue.connection, SWEEP_AFTER_S):
        kicked += pending.kick(queue, crm, account) is not None
    return kicked


def score_batch(crm: str, account: str, events: list[str]) -> list[dict]:
    """Score a batch of leads of one account; returns each event's outcome (`{"lead", "outcome", …}`):
    the leads' in order, then the deals', then the erasures'."""
    ctx = context()
    try:
        with ctx.tallied():
            return _score_batch(ctx, crm, account, events)
    except RateLimited as exc:  # not a failure: the CRM asked us to wait, so the batch waits
        log.warning("%s; batch of %d put off %.0fs", exc, len(events), exc.retry_after_s)
        outage = get_current_job().meta.get(OUTAGE_META)  # kept: a 429 mid-outage must not restart its clock
        return _put_off(crm, account, events, exc.retry_after_s, {OUTAGE_META: outage} if outage else None)
    except CRMUnavailable as exc:  # not a failure either, until the CRM has been down too long
        return _wait_for_crm(crm, account, events, exc)


def _put_off(
    crm: str, account: str, events: list[str], wait_s: float, meta: dict | None = None
) -> list[dict]:
    """Queue the batch again in `wait_s`, as a new job: waiting spends none of its RQ retries, which
    are kept for failures that are leadscore's own."""
    _queue().enqueue_in(
        timedelta(seconds=max(1.0, wait_s)),
        score_batch,
        crm,
        account,
        events,
        job_timeout=pending.BATCH_TIMEOUT_S,
        retry=pending.BATCH_RETRY,
        failure_ttl=pending.FAILED_KEPT_S,
        meta=meta,
    )
    return [{"lead": event.lead_key, "outcome": "deferred"} for event in parse_events(events)]


def _wait_for_crm(crm: str, account: str, events: list[str], exc: CRMUnavailable) -> list[dict]:
    """Put the batch off while the CRM is unavailable, waiting longer each time, since its events were
    acknowledged and nothing else holds them. After OUTAGE_GIVE_UP_S it fails, with no RQ retry, into
    the failed-job registry, where `leadscore requeue` finds it."""
    job = get_current_job()
    now = shared_now(job.connection)  # a later wait may run on another host
    outage = job.meta.get(OUTAGE_META, {"since": now, "waits": 0})
    down_s = now - outage["since"]
    if down_s >= OUTAGE_GIVE_UP_S:
        log.error(
            "%s:%s: the CRM has been unavailable for %.1f h (%s); batch of %d leads failed into RQ's "
            "failed-job registry: once the CRM answers, `leadscore requeue %s` (or `rq requeue --queue %s "
            "%s`) scores it", crm, account, down_s / 3600, exc, len(events), job.id, job.origin, job.id,
        )  # fmt: skip
        job.retries_left = 0  # the outage has been waited out already
        job.meta.pop(OUTAGE_META, None)
        job.save_meta()  # a requeued batch waits afresh
        raise exc
    wait_s = min(OUTAGE_FIRST_WAIT_S * 2 ** outage["waits"], OUTAGE_MAX_WAIT_S)
    log.warning(
        "%s; batch of %d leads of %s:%s put off %.0fs (attempt %d, the CRM unavailable for %.0fs)",
        exc, len(events), crm, account, wait_s, outage["waits"] + 1, down_s,
    )  # fmt: skip
    return _put_off(crm, account, events, wait_s, {OUTAGE_META: {**outage, "waits": outage["waits"] + 1}})


def _erasure_results(erased: list[LeadEvent], split_off: list[LeadEvent]) -> list[dict]:
    return [
        *(outcome(e.lead_key, "erased") for e in erased),
        *(outcome(e.lead_key, "erase_queued") for e in split_off),
    ]


def _not_this_account(ctx, crm: str, account: str, reached: str, events: list[LeadEvent]) -> list[dict]:
    """Another account's leads, which the credentials do not reach: read and written with them,
    a lead id the two accounts share would be another person. Not scored, and said, not retried:
    only another deployment, with that account's credentials, can score them."""
    if events:
        log.error(
            "%d events of %s account %s reached this deployment, whose credentials reach %s: not scored "
            "(leadscore serves one HubSpot portal and one Salesforce org; run another deployment, with "
            "its credentials, for %s)", len(events), crm, account, reached, account,
        )  # fmt: skip
        ctx.telemetry("events_ignored_total", len(events), crm=crm, reason="other_account")
    return [outcome(event.lead_key, "not_this_account") for event in events]


def _score_batch(ctx, crm: str, account: str, events: list[str]) -> list[dict]:
    started = time.monotonic()
    adapter = ctx.crm(crm, account)
    lead_events = parse_events(events)
    erasures = [event for event in lead_events if ERASE in event.kinds]  # whatever else came with it
    erased, split_off = [], []
    if erasures and len(erasures) < len(lead_events):  # on their own: a store that is down holds back
        _batch_of(_queue(), crm, account, erasures, f"erase {len(erasures)} leads of {crm}:{account}")
        split_off = erasures  # no score, and a failed erasure is retried alone
    elif erasures:
        ctx.erase(crm, account, [event.lead_id for event in erasures])  # a failure fails the job: owed
        erased = erasures
    lead_events = [event for event in lead_events if ERASE not in event.kinds]
    if (reached := ctx.reached_account(crm, account)) and not same_account(reached, account):
        return [
            *_not_this_account(ctx, crm, account, reached, lead_events),
            *_erasure_results(erased, split_off),
        ]
    deal_events = [event for event in lead_events if deal_of(event.lead_id)]
    if deal_events:
        lead_events = [event for event in lead_events if not deal_of(event.lead_id)]
    read_at = redis_now(ctx.redis)  # a lead erased after this, the batch keeps nothing of
    won, deal_results = _won_deals(adapter, crm, deal_events)
    by_id = {event.lead_id: event for event in lead_events}
    leads = adapter.read_leads(list(by_id))  # keyed by the ids asked for
    unread = [i for i in by_id if i not in leads]
    merged_into = adapter.merged_into(unread) if unread else {}  # Salesforce's merged-away Leads
    closed = {i: lead for i, lead in leads.items() if lead.read_only}  # converted: an outcome, no score
    open_leads = {i: lead for i, lead in leads.items() if i not in closed}
    forced = {event.lead_id for event in lead_events if FORCED in event.kinds}
    scored = dict(zip(open_leads, ctx.score(list(open_leads.values()), forced), strict=True))
    survivors = sorted(set(merged_into.values()))
    erased_since_read = erased_since(
        ctx.redis, crm, account, [*leads, *(f.lead_id for f in won), *survivors], read_at
    )
    merges = _merges(
        {loser: winner for loser, winner in merged_into.items() if winner not in erased_since_read}
    )
    won = [fact for fact in won if fact.lead_id not in erased_since_read]
    superseded = _superseded(ctx, crm, account, [by_id[i] for i, s in scored.items() if s.fields is not None])
    to_write = [
        (s.lead.lead_id, s.fields)
        for i, s in scored.items()
        if s.fields is not None and i not in superseded and i not in erased_since_read
    ]
    try:
        written = {r.lead_id: r for r in adapter.write_many(to_write)} if to_write else {}
    except (RateLimited, CRMError) as exc:  # put off or retried: the scores already written are kept
        done = set(exc.written)  # now, since they will read as unchanged when the batch runs again
        _keep(ctx, crm, account, read_at, scored, [s for i, s in scored.items() if i in done],
              [lead for i, lead in leads.items() if i in done])  # fmt: skip
        raise
    # A newer hand-off's batch may have written while this write waited (the rate limiter, retries):
    # those leads are scored once more, after this, so the newest state is what the CRM shows last.
    overtaken = _superseded(ctx, crm, account, [by_id[i] for i, result in written.items() if result.ok])

    results, failed, fallbacks, latencies, kept, throttled = [], [], [], [], [], set()
    now = shared_now_utc(ctx.redis)
    for event in lead_events:
        lead_id, key = event.lead_id, event.lead_key
        s = scored.get(lead_id)
        if lead_id in closed:
            results.append(outcome(key, closed[lead_id].outcome or "read_only"))
            continue
        if s is None and lead_id in merged_into:
            results.append({**outcome(key, "merged"), "into": merged_into[lead_id]})
            continue
        if s is None:
            results.append(outcome(key, "lead_gone"))
            continue
        if lead_id in erased_since_read:
            results.append(outcome(key, "erased"))  # since it was read
            continue
        if lead_id in superseded:
            results.append(outcome(key, "superseded", s))  # a newer event's batch writes this lead
            continue
        if s.propensity is not None and s.propensity.retryable:
            fallbacks.append(event)
            if s.propensity.throttled:
                throttled.add(lead_id)
        if s.fields is None:
            ctx.telemetry("writes_total", crm=crm, outcome="unchanged")
            results.append(outcome(key, "unchanged", s))
            if s.never_kept and s.result is not None:
                kept.append(s)
            continue
        result = written[s.lead.lead_id]
        if result.ok:
            ctx.telemetry("writes_total", crm=crm, outcome="written")
            if event.accepted_at is not None and RESCORE not in event.kinds:
                latencies.append((now - event.accepted_at).total_seconds())
            results.append(outcome(key, "written", s))
            kept.append(s)
        elif result.gone:
            results.append(outcome(key, "lead_gone"))
        else:
            ctx.telemetry("writes_total", crm=crm, outcome="failed")
            failed.append((event, result))
            results.append({**outcome(key, "failed", s), "error": f"{result.code}: {result.message}"})

    results += deal_results + _erasure_results(erased, split_off)
    refused = {event.lead_id for event, _ in failed}  # the rest are settled, whoever queued them
    settled = [e.lead_id for e in lead_events + erased if e.lead_id not in refused]
    pending.backfilled(ctx.redis, crm, account, settled)
    kept_leads = [lead for i, lead in leads.items() if i not in erased_since_read]
    erased_late = _keep(ctx, crm, account, read_at, scored, kept, kept_leads, won, merges)
    failed = [(event, result) for event, result in failed if event.lead_id not in erased_late]
    fallbacks = [event for event in fallbacks if event.lead_id not in erased_late | overtaken]
    queue = _queue()
    if overtaken - erased_late:
        pending.requeue(queue, crm, account, [by_id[i] for i in sorted(overtaken - erased_late)])
    if failed and len(lead_events) == 1 and not deal_events:
        _fail_alone(failed[0][1], crm)
    refusals = [result for _, result in failed]
    alike = len({(r.code, r.message) for r in refusals}) == 1
    if alike and len(refusals) == len(to_write) > 1 and not (deal_events or split_off):
        raise WritesRefusedAlike(crm, refusals)  # every write the batch tried, in the same words
    if failed:  # a put-back the CRM refused is made by the job the lead goes on alone in
        ctx.redis.delete(*(put_back_key(event.lead_key) for event, _ in failed))
    for (
        event,
        result,
    ) in failed:  # each refused record goes on alone: retried, or dead-lettered with its reason
        log.warning(
            "isolating %s after %s: %s", event.lead_key, result.code, result.message,
            extra={"lead_id": event.lead_id, "event_id": ",".join(event.event_ids), "crm": crm},
        )  # fmt: skip
        _batch_of(queue, crm, account, [event], f"score {event.lead_key} alone after {result.code}")
    _rescore_later(queue, ctx.settings.fallback_rescore_s, crm, account, fallbacks, throttled)
    metrics.observe_many(ctx.redis, "scoring_latency_seconds", latencies, crm=crm)
    elapsed = time.monotonic() - started
    metrics.observe(ctx.redis, "batch_duration_seconds", elapsed, crm=crm)
    counts = dict.fromkeys(("written", "unchanged", "failed"), 0)  # and whichever other outcomes there were
    for result in results:
        counts[result["outcome"]] = counts.get(result["outcome"], 0) + 1
    log.info(
        "scored %d leads of %s:%s in %.2fs: %s",
        len(results), crm, account, elapsed, counts,
        extra={"crm": crm, "account_id": account, "leads": len(results), **counts},
    )  # fmt: skip
    return results


def _won_deals(adapter, crm: str, deal_events: list[LeadEvent]) -> tuple[list[LeadFact], list[dict]]:
    """Deals (HubSpot) or opportunities (Salesforce) whose stage changed: a won one is a "won"
    outcome for each of its leads (a deal's contacts, the Leads converted into an opportunity).
    Nothing is written to the CRM for them."""
    if not deal_events:
        return [], []
    won = adapter.won_deal_leads([deal_of(event.lead_id) for event in deal_events])
    facts, results = [], []
    for event in deal_events:
        deal = deal_of(event.lead_id)
        if deal not in won:
            results.append(outcome(event.lead_key, "no_won_deal"))
            continue
        closed_at, leads = won[deal]
        facts += [LeadFact(crm, adapter.account_id, lead, "won", closed_at) for lead in leads]
        results.append({**outcome(event.lead_key, "deal_won"), "leads": leads})
    return facts, results


def _keep(
    ctx, crm: str, account: str, read_at: float, scored: dict, kept: list, leads: list, won=(), merges=None
) -> set[str]:
    """Keep what the batch wrote and read, then look again: a lead erased since the batch read it,
    before or while this kept, has its rows and cached LLM answers erased again. Returns those leads."""
    ctx.keep(kept, leads, won, {(crm, account): merges} if merges else None)
    moved = {i for winner, losers in (merges or {}).items() for i in (winner, *losers)}
    read = {*scored, *(lead.lead_id for lead in leads), *(fact.lead_id for fact in won), *moved}
    traces = erased_since(ctx.redis, crm, account, sorted(read), read_at)
    if traces:
        ctx.erase(crm, account, sorted(traces), mark_erased=False)
    return traces


def _merges(merged_into: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """Each lead that remains, with the ones merged into it."""
    merges: dict[str, tuple[str, ...]] = {}
    for loser, winner in sorted(merged_into.items()):
        merges[winner] = (*merges.get(winner, ()), loser)
    return merges


def _superseded(ctx, crm: str, account: str, events: list[LeadEvent]) -> set[str]:
    """Leads of this batch that a newer event has since put in another batch: not ours to write."""
    if not events:
        return set()
    newest = pending.newest_handoffs(ctx.redis, crm, account, [e.lead_id for e in events])
    return {
        e.lead_id
        for e, handoff in zip(events, newest, strict=True)
        if handoff is not None and e.handoff is not None and handoff > e.handoff
    }


def _fail_alone(result, crm: str) -> None:
    """A lone record the CRM refused: raise, so RQ retries it — or, if retrying cannot help,
    so it lands in the failed registry now, with the CRM's own code as the reason."""
    job = get_current_job()
    if result.permanent and job is not None:
        job.retries_left = 0
    raise WriteRejected(crm, result)


def _rescore_later(
    queue: Queue, first_delay_s: int, crm: str, account: str, events: list[LeadEvent], throttled: set[str]
) -> None:
    """Leads scored with the fallback because the LLM failed are scored again, waiting twice as
    long each time and at most MAX_FALLBACK_RESCORES times, so an LLM that keeps failing on a lead
    costs a bounded number of CRM reads. A lead in `throttled` (the LLM asked to wait) waits its round's
    time again without spending the round, MAX_THROTTLED_RESCORES times at most. The lead's next real
    event starts the counts again."""
    if not first_delay_s:
        return
    by_round: dict[int, list[str]] = {}
    for event in events:
        if event.lead_id in throttled and event.throttled_rescores < MAX_THROTTLED_RESCORES:
            again = event.model_copy(update={"throttled_rescores": event.throttled_rescores + 1})
            # its last round's wait at most: a lead throttled in its fifth round waits 80 minutes, not 160
            by_round.setdefault(min(event.rescores, MAX_FALLBACK_RESCORES - 1), []).append(
                again.model_dump_json()
            )
            continue
        if event.rescores >= MAX_FALLBACK_RESCORES:
            log.warning(
                "%s still scored with the fallback after %d rescores; it waits for its next event",
                event.lead_key, event.rescores, extra={"lead_id": event.lead_id, "crm": crm},
            )  # fmt: skip
            continue
        again = event.model_copy(update={"rescores": event.rescores + 1})
        by_round.setdefault(event.rescores, []).append(again.model_dump_json())
    for done, batch in by_round.items():
        queue.enqueue_in(
            timedelta(seconds=first_delay_s * 2**done),
            rescore,
            crm,
            account,
            batch,
            retry=pending.BATCH_RETRY,
            failure_ttl=pending.FAILED_KEPT_S,
        )


def rescore(crm: str, account: str, events: list[str]) -> int:
    """Leads scored while the LLM was down go back to pending, so they get a real propensity."""
    now = shared_now_utc(_queue().connection)
    lead_events = [event.model_copy(update={"accepted_at": now}) for event in parse_events(events)]
    pending.requeue(_queue(), crm, account, lead_events)
    return len(lead_events)
