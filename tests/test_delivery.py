"""Delivery you can trust: coalescing, batching, skipping unchanged work, CRM limits, faults."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import AnyHttpUrl
from redis import Redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.retry import Retry as RedisRetry
from rq import Queue, Retry, SimpleWorker, Worker
from rq.exceptions import DequeueTimeout
from rq.job import Job
from rq.scheduler import RQScheduler
from simple_salesforce.exceptions import SalesforceAuthenticationFailed

from bench import harness
from integration import clock, metrics, pending, ratelimit, signing
from integration.app import create_app
from integration.cli import main
from integration.emulators import free_port, start_redis
from integration.errors import CRMError, CRMUnavailable, RateLimited
from integration.events import ERASE, RESCORE, IntakeRow, LeadEvent, pack_intake
from integration.hubspot.api import HubSpotCRM, halving_budget, shared_limiter
from integration.ratelimit import RateLimiter, SharedPause
from integration.replay import hubspot_headers, load_delivery
from integration.salesforce import api as salesforce_api
from integration.salesforce.api import SalesforceCRM
from integration.settings import get_settings
from tests.conftest import (
    APP_SECRET,
    FIXTURES,
    HUBSPOT_TOKEN,
    PORTAL_ID,
    SF_EVENTS_SECRET,
    SF_ORG_ID,
    WEBHOOK_URL,
    _clear_caches,
    finished_jobs,
    fixture_json,
    pending_events,
)
from tests.test_feedback_outcomes_holdout import table
from workers import batch, jobs, store
from workers.llm import LLM_PAUSE, answers_keys, cached_answer_key
from workers.worker import LeadscoreQueue

BURST = "contact.creation__demo_burst"
VP = "74300000101"


def scored(hubspot) -> dict[str, str]:
    return {i: c["properties"].get("leadscore_score") for i, c in hubspot.contacts.items()}


def change(contact_id: int, event_id: int, prop="hs_lead_status", value="CONNECTED") -> dict:
    event = fixture_json("hubspot/contact.propertyChange__lead_status.json")[0]
    return {
        **event,
        "objectId": contact_id,
        "eventId": event_id,
        "propertyName": prop,
        "propertyValue": value,
    }


def test_demo_burst_is_one_batch_read_and_one_batch_write(post_delivery, crm, run_worker, hubspot):
    calls_before = hubspot.api_calls()
    post_delivery(BURST)
    results = run_worker()

    assert len(results) == 24 and {r["outcome"] for r in results} == {"written"}
    made = [path for _, path in hubspot.calls[-(hubspot.api_calls() - calls_before) :]]
    assert made.count("/crm/v3/objects/contacts/batch/read") == 1
    assert made.count("/crm/v3/objects/contacts/batch/update") == 1
    assert hubspot.api_calls() - calls_before <= 7  # + associations and texts for contacts with activity


def test_many_events_for_one_lead_across_deliveries_score_it_once(
    post_delivery, crm, run_worker, hubspot, llm
):
    for n in range(5):
        post_delivery(json.dumps([change(int(VP), 900 + n, "jobtitle", "VP of Sales")]).encode())
    results = run_worker()

    assert [r["lead"].rsplit(":", 1)[1] for r in results] == [VP]
    assert len(llm.requests) == 1


def test_a_drained_events_mark_lives_until_the_next_window_stops_checking_it(
    post_delivery, crm, run_worker, redis
):
    """Marks are checked in their own window and the next: kept 4 to 8 days, as HubSpot retries for 3."""
    post_delivery("contact.creation__single")
    run_worker()
    now = clock.shared_now(redis)

    [key] = [k.decode() for k in redis.scan_iter("leadscore:seen:*")]
    assert key.endswith(f":{int(now // pending.SEEN_WINDOW_S)}")
    assert redis.expiretime(key) == (int(now // pending.SEEN_WINDOW_S) + 2) * pending.SEEN_WINDOW_S
    assert 4 * 86_400 <= redis.expiretime(key) - now <= 8 * 86_400


def test_while_the_llm_fails_a_scored_leads_last_answer_stands_in_for_the_prior(
    post_delivery, crm, run_worker, hubspot, llm
):
    """The neutral prior would move a VP's demo request from 89 to 79 and back once the LLM answers (a
    tier change each way, for other leads, for every workflow built on the tier). Its last answer
    stands in instead, so the score moves only as the rules do; the lead is still a fallback, asked
    again."""
    post_delivery("contact.creation__single")
    [first] = run_worker()
    llm.force(status=500)
    hubspot.contacts[VP]["properties"]["jobtitle"] = "VP, Sales"  # scored as before by the rules
    post_delivery(json.dumps([change(int(VP), 7001, "jobtitle", "VP, Sales")]).encode())
    [during] = run_worker()
    details = json.loads(hubspot.contacts[VP]["properties"]["leadscore_details"])
    llm.force()
    post_delivery(json.dumps([change(int(VP), 7002, "jobtitle", "VP, Sales")]).encode())
    [after] = run_worker()

    assert (first["score"], first["tier"]) == (89, "A")
    assert (during["score"], during["tier"], during["fallback"]) == (89, "A", True)
    assert details["fallback"] is True and details["propensity"]["previous"] is True
    assert (details["propensity"]["value"], details["propensity"]["confidence"]) == (0.86, 0.8)
    assert (after["score"], after["fallback"]) == (89, False)  # asked again at the next event


def test_a_new_lead_scored_while_the_llm_fails_gets_the_neutral_prior(post_delivery, crm, run_worker, llm):
    llm.force(status=500)
    post_delivery("contact.creation__single")
    [scored] = run_worker()

    assert scored["fallback"] is True and scored["score"] < 89


def test_redelivered_unchanged_lead_costs_no_llm_call_and_no_write(
    post_delivery, crm, run_worker, hubspot, llm
):
    post_delivery(BURST)
    run_worker()
    llm_before, writes_before = len(llm.requests), len(hubspot.writes)

    events = [change(int(i), 5000 + n) for n, i in enumerate(hubspot.contacts) if i.startswith("743000001")]
    post_delivery(json.dumps(events[:24]).encode())
    results = run_worker()

    assert {r["outcome"] for r in results} == {"unchanged"}
    assert (len(llm.requests) - llm_before, len(hubspot.writes) - writes_before) == (0, 0)


def test_reasons_reworded_since_a_lead_was_scored_are_written_at_its_next_event_from_the_llms_cache(
    post_delivery, crm, run_worker, hubspot, llm
):
    post_delivery("contact.creation__single")
    run_worker()
    properties = hubspot.contacts[VP]["properties"]
    details = json.loads(properties["leadscore_details"])
    properties["leadscore_details"] = json.dumps({**details, "reason_version": "reasons-1"})  # written before
    asked = len(llm.requests)

    post_delivery(json.dumps([change(int(VP), 6001)]).encode())  # nothing about the lead changed
    [result] = run_worker()

    assert result["outcome"] == "written" and len(llm.requests) == asked  # the LLM's answer, from its cache
    assert json.loads(properties["leadscore_details"])["reason_version"] == "reasons-4"


def test_llm_answers_are_cached_by_input_fingerprint(post_delivery, crm, run_worker, hubspot, llm):
    post_delivery("contact.creation__single")
    run_worker()
    hubspot.contacts[VP]["properties"]["leadscore_details"] = ""  # someone cleared our provenance

    post_delivery(json.dumps([change(int(VP), 777)]).encode())
    [result] = run_worker()

    assert result["outcome"] == "written"
    assert len(llm.requests) == 1  # the second score reused the first answer


def test_a_leads_list_of_cached_llm_answers_drops_the_ids_of_answers_expired(
    post_delivery, crm, run_worker, redis
):
    """Listed for an erasure to find, a lead's answers were never taken off the list: a lead changing
    weekly kept one id a change for good, after its answers had expired."""
    listed = answers_keys("hubspot", PORTAL_ID, VP)[0]
    redis.zadd(listed, {"expired": time.time() - 1, "still-cached": time.time() + 6 * 86_400})  # expiry times

    post_delivery("contact.creation__single")
    run_worker()

    [new] = [a for a in redis.zrange(listed, 0, -1) if a != b"still-cached"]
    assert redis.zrange(listed, 0, -1) == [b"still-cached", new]  # expiring in 6 days, then in 7
    assert redis.exists(cached_answer_key(new.decode())) and 6 * 86_400 < redis.ttl(listed) <= 7 * 86_400


def test_lone_lead_waits_only_the_linger(env, monkeypatch, post_delivery, crm, queue, redis):
    monkeypatch.setenv("BATCH_LINGER_S", "0.3")
    from integration.settings import get_settings
    from workers import jobs

    get_settings.cache_clear()
    jobs.context.cache_clear()
    post_delivery("contact.creation__single")
    [collect] = queue.get_jobs()

    started = time.monotonic()
    SimpleWorker([queue], connection=redis).work(burst=True, max_jobs=1)
    waited = time.monotonic() - started

    assert collect.func_name == "workers.batch.collect"
    assert 0.25 <= waited < 3.0  # the 0.3 s linger, not the 30 s sweep or a lost kick's 120 s
    assert pending.depth(redis) == 0 and [j.func_name for j in queue.get_jobs()] == [
        "workers.batch.score_batch"
    ]


@pytest.mark.parametrize("wrong_host", ["web", "worker"])
def test_a_host_clock_an_hour_off_does_not_hold_a_lone_lead(
    wrong_host, env, monkeypatch, post_delivery, crm, queue, redis
):
    """The web host stamps when it accepted a delivery and a worker on another host lingers from that
    stamp: both read Redis's clock, so a host an hour off (a resumed VM, NTP not synced) neither holds
    a lone lead for an hour nor answers from a clock of its own."""
    monkeypatch.setenv("BATCH_LINGER_S", "0.3")
    from integration.settings import get_settings
    from workers import jobs

    get_settings.cache_clear()
    jobs.context.cache_clear()
    true_time = time.time
    with monkeypatch.context() as skewed:
        if wrong_host == "web":
            skewed.setattr(time, "time", lambda: true_time() + 3600)
        post_delivery("contact.creation__single")
    accepted_at = redis.zscore(pending.ACCOUNTS, f"hubspot:{PORTAL_ID}")
    assert accepted_at == pytest.approx(clock.redis_now(redis), abs=5)

    if wrong_host == "worker":
        monkeypatch.setattr(time, "time", lambda: true_time() - 3600)
    other_work = threading.Timer(10, queue.enqueue, args=("os.getpid",))  # a lingering collector steps aside
    other_work.start()
    started = time.monotonic()
    SimpleWorker([queue], connection=redis).work(burst=True, max_jobs=1)
    waited = time.monotonic() - started
    other_work.cancel()

    assert 0.25 <= waited < 3.0
    assert [j.func_name for j in queue.get_jobs()] == ["workers.batch.score_batch"]


def test_the_shared_clock_is_this_hosts_own_only_until_redis_first_answers(caplog, monkeypatch):
    """A web host whose Redis is down answers 503 from its own Redis call; reading the time must not
    raise first, nor say so at every request, and Redis's clock is taken up as soon as it answers."""
    from redis import Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    true_time = time.time
    monkeypatch.setattr(time, "time", lambda: true_time() + 3600)  # this host's clock is an hour ahead
    monkeypatch.setattr(clock, "RETRY_S", 0.0)
    with ExitStack() as stack:
        port = free_port()
        client = Redis(port=port, retry=Retry(NoBackoff(), 0))
        assert clock.shared_now(client) == pytest.approx(true_time() + 3600, abs=1)
        assert clock.shared_now(client) == pytest.approx(true_time() + 3600, abs=1)
        said = [r.message for r in caplog.records if r.message.startswith("could not read Redis's clock")]
        assert len(said) == 1

        start_redis(stack, port=port)  # Redis comes up, a moment later
        assert clock.shared_now(client) == pytest.approx(true_time(), abs=1)


def test_a_stalled_redis_is_asked_the_time_by_one_caller_at_a_time_and_not_at_every_request(
    caplog, monkeypatch
):
    """A Redis that accepts and never answers: of ten web threads' first requests one waits on it, the
    others go on with this host's clock; and a slow failure does not make the next request due."""
    import socket

    from redis import Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    monkeypatch.setattr(clock, "RETRY_S", 0.1)  # shorter than one attempt's 0.3 s wait
    accepted = []
    with socket.create_server(("127.0.0.1", 0)) as stalled:

        def accept():
            while True:
                try:
                    accepted.append(stalled.accept()[0])
                except OSError:
                    return

        threading.Thread(target=accept, daemon=True).start()
        client = Redis(port=stalled.getsockname()[1], socket_timeout=0.3, retry=Retry(NoBackoff(), 0))
        callers = [threading.Thread(target=clock.shared_now, args=(client,)) for _ in range(10)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        clock.shared_now(client)
        clock.shared_now(client)

    assert len(accepted) == 1
    said = [r.message for r in caplog.records if r.message.startswith("could not read Redis's clock")]
    assert len(said) == 1


def test_the_shared_clock_runs_on_from_its_last_reading_while_redis_is_away(monkeypatch):
    """A failover or a blip must not put a host whose clock is off back on it."""
    from redis import Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    with ExitStack() as stack:
        client = Redis.from_url(start_redis(stack), retry=Retry(NoBackoff(), 0))
        assert clock.shared_now(client) == pytest.approx(time.time(), abs=1)
    true_time = time.time
    monkeypatch.setattr(time, "time", lambda: true_time() + 3600)
    monkeypatch.setattr(clock, "REFRESH_S", 0.0)  # a refresh is due, and fails: redis-server has stopped

    assert clock.shared_now(client) == pytest.approx(true_time(), abs=1)


def test_a_collector_steps_aside_between_full_batches_after_its_pass(env, monkeypatch, crm, queue, redis):
    monkeypatch.setenv("BATCH_SIZE", "10")
    monkeypatch.setattr(batch, "PASS_S", 0.0)  # as if it had been collecting for a while
    from integration.settings import get_settings
    from workers import jobs

    get_settings.cache_clear()
    jobs.context.cache_clear()
    app = create_app(get_settings())
    body = json.dumps([change(74300000100 + n, 7000 + n) for n in range(1, 25)]).encode()
    app.test_client().post(WEBHOOK_URL, data=body, headers=hubspot_headers(WEBHOOK_URL, body, APP_SECRET))

    SimpleWorker([queue], connection=redis).work(burst=True, max_jobs=1)

    score_batch, collect = queue.get_jobs()
    assert (score_batch.func_name, len(score_batch.args[2])) == ("workers.batch.score_batch", 10)
    assert collect.func_name == "workers.batch.collect"  # queued again, behind the batch
    assert pending.depth(redis) == 14


def test_an_entry_two_racing_collectors_both_read_is_queued_once(post_delivery, queue, redis):
    post_delivery("contact.creation__single")
    intake = pending.intake_key("hubspot", PORTAL_ID)
    taken = redis.xrange(intake)

    pending.move_to_pending(redis, "hubspot", PORTAL_ID, taken)
    pending.move_to_pending(redis, "hubspot", PORTAL_ID, taken)

    assert [e["lead_id"] for e in pending_events(redis, "hubspot", PORTAL_ID)] == ["74300000101"]
    assert redis.xlen(intake) == 0 and pending.depth(redis) == 1
    assert metrics.counter_value(redis, "events_deduplicated_total", crm="hubspot") == 1


def test_an_erasure_a_second_collector_moved_first_is_not_replaced_by_the_first_ones_change(
    redis, monkeypatch
):
    """A collect job can outlive its kick (120 s) behind a burst; the next delivery then kicks a
    second. If the second moves a change and an erasure of one lead while the first, which read the
    change alone, is between its reads and its commit, the first must read again, not write the
    change over the erasure."""

    def deliver(event_id: str, kind: str) -> None:
        now = time.time()
        row = IntakeRow(PORTAL_ID, "74300000101", event_id, kind, (), int(now * 1000))
        with redis.pipeline(transaction=True) as pipe:
            pending.add_intake(pipe, "hubspot", PORTAL_ID, pack_intake([row], now), 1, now)
            pipe.execute()

    deliver("change", "property_change")
    first_read = redis.xrange(pending.intake_key("hubspot", PORTAL_ID))  # the first collector reads
    deliver("erasure", ERASE)
    read_waiting, second = pending._keeping_erasures, {}

    def second_collector_moves_both(*args):
        waiting = read_waiting(*args)
        if not second:
            second["ran"] = True
            second["moved"] = pending.drain(redis, "hubspot", PORTAL_ID)
        return waiting

    monkeypatch.setattr(pending, "_keeping_erasures", second_collector_moves_both)
    pending.move_to_pending(redis, "hubspot", PORTAL_ID, first_read)

    [waiting] = pending_events(redis, "hubspot", PORTAL_ID)
    assert second["moved"] == 2 and waiting["kinds"] == ["property_change", ERASE]
    assert redis.xlen(pending.intake_key("hubspot", PORTAL_ID)) == 0
    assert metrics.counter_value(redis, "events_deduplicated_total", crm="hubspot") == 1


def test_an_account_whose_collector_was_lost_is_kicked_by_the_sweeper(
    post_delivery, crm, queue, redis, hubspot
):
    post_delivery("contact.creation__single")
    queue.empty()  # its collect job died with its worker...
    redis.delete(pending.kick_key("hubspot", PORTAL_ID))  # ...and its kick expired

    assert batch.sweep(queue) == 0  # too early to tell a lost kick from a busy collector
    redis.zadd(pending.ACCOUNTS, {f"hubspot:{PORTAL_ID}": time.time() - 60})
    assert batch.sweep(queue) == 1
    SimpleWorker([queue], connection=redis).work(burst=True)

    assert pending.depth(redis) == 0 and len(hubspot.writes) == 1


def test_a_delivery_whose_collector_redis_would_not_queue_is_acknowledged_and_swept_later(
    post_delivery, crm, queue, redis, hubspot, monkeypatch
):
    """The events are durably queued once the intake's transaction is done: a Redis that fails just after
    loses no event, and no kick is left without its job to hold the sweeper off."""

    def refused(*args, **kwargs):  # Redis gone between the kick and its job
        raise RedisConnectionError("Connection reset by peer")

    with monkeypatch.context() as patched:
        patched.setattr(Queue, "_enqueue_job", refused)
        assert post_delivery("contact.creation__single").status_code == 200

    assert queue.count == 0 and not redis.exists(pending.kick_key("hubspot", PORTAL_ID))
    redis.zadd(pending.ACCOUNTS, {f"hubspot:{PORTAL_ID}": time.time() - 60})  # the sweeper's 30 s on
    assert batch.sweep(queue) == 1
    SimpleWorker([queue], connection=redis).work(burst=True)

    assert pending.depth(redis) == 0 and len(hubspot.writes) == 1


def test_a_collector_whose_kick_a_later_collector_holds_leaves_the_account_to_it(
    env, post_delivery, crm, queue, redis
):
    """A collect job that waited in the queue past its kick's two minutes: the next delivery kicked
    another, which holds the kick now. The first leaves the account to it instead of doing its work."""
    post_delivery("contact.creation__single")
    [first] = queue.get_jobs()
    redis.set(pending.kick_key("hubspot", PORTAL_ID), "a-later-collector", ex=pending.KICK_TTL_S)

    SimpleWorker([queue], connection=redis).work(burst=True, max_jobs=1)

    assert first.get_status(refresh=True) == "finished" and first.return_value()["batches"] == 0
    assert redis.xlen(pending.intake_key("hubspot", PORTAL_ID)) == 1  # left for the other collector
    assert redis.get(pending.kick_key("hubspot", PORTAL_ID)) == b"a-later-collector"


def test_collector_steps_aside_when_other_work_is_queued(env, monkeypatch, post_delivery, crm, queue, redis):
    monkeypatch.setenv("BATCH_LINGER_S", "5")
    from integration.settings import get_settings
    from workers import jobs

    get_settings.cache_clear()
    jobs.context.cache_clear()
    post_delivery("contact.creation__single")
    queue.enqueue("workers.batch.rescore", "hubspot", PORTAL_ID, [])  # some other work waiting

    started = time.monotonic()
    SimpleWorker([queue], connection=redis).work(burst=True, max_jobs=1)

    assert time.monotonic() - started < 3.0  # did not sit out the 5 s linger
    assert pending.depth(redis) == 1
    assert [j.func_name for j in queue.get_jobs()] == ["workers.batch.rescore", "workers.batch.collect"]


def test_a_full_batch_goes_to_the_workers_at_once(env, monkeypatch, crm, queue, redis):
    monkeypatch.setenv("BATCH_LINGER_S", "5")
    monkeypatch.setenv("BATCH_SIZE", "10")
    from integration.settings import get_settings
    from workers import jobs

    get_settings.cache_clear()
    jobs.context.cache_clear()
    app = create_app(get_settings())
    body = json.dumps([change(74300000100 + n, 6000 + n) for n in range(1, 25)]).encode()
    app.test_client().post(WEBHOOK_URL, data=body, headers=hubspot_headers(WEBHOOK_URL, body, APP_SECRET))

    started = time.monotonic()
    SimpleWorker([queue], connection=redis).work(burst=True, max_jobs=1)  # the collector

    assert time.monotonic() - started < 3.0  # full batches never wait out the 5 s linger
    batches = [job for job in queue.get_jobs() if job.func_name == "workers.batch.score_batch"]
    assert [len(job.args[2]) for job in batches] == [10, 10]
    assert pending.depth(redis) == 4  # the rest lingers, with its collector queued again
    assert [j.func_name for j in queue.get_jobs()].count("workers.batch.collect") == 1


# ---- the CRM's limits


def test_429_storm_waits_and_finishes_with_nothing_dropped(post_delivery, crm, run_worker, hubspot):
    hubspot.storm(4)
    post_delivery(BURST)
    results = run_worker()

    assert hubspot.throttled == 4
    assert len(results) == 24 and {r["outcome"] for r in results} == {"written"}
    assert all(scored(hubspot)[c] for c in hubspot.contacts if c.startswith("743000001"))


def _many_contacts(hubspot, count: int) -> None:
    template = hubspot.contacts[VP]
    for n in range(count):
        contact_id = str(74400000000 + n)
        hubspot.add_contact({**template, "id": contact_id, "properties": {"hs_object_id": contact_id}})


def test_searches_keep_to_hubspots_own_limit_on_them(settings, hubspot, redis):
    """HubSpot answers a search past 4 a second 429 SECONDLY: a rescore or outcomes sync paging through a
    portal keeps under it, with every other process's searches."""
    hubspot.search_per_s = 4
    _many_contacts(hubspot, 1400)  # 8 pages of 200 with the fixtures' own
    adapter = HubSpotCRM(settings, portal_id=PORTAL_ID, limiter=shared_limiter(redis, settings, PORTAL_ID))
    started = time.monotonic()

    assert len(list(adapter.contact_ids())) == len(hubspot.contacts)
    assert hubspot.throttled == 0
    assert time.monotonic() - started >= 1.0  # the fifth search waited for the second to come round


def test_a_search_throttled_holds_back_searches_not_the_workers_other_calls(settings, hubspot, redis, caplog):
    """A 429 of the search limit says nothing of the portal's other limits: scoring goes on."""
    hubspot.search_per_s = 1
    _many_contacts(hubspot, 400)  # 3 pages
    adapter = HubSpotCRM(settings, portal_id=PORTAL_ID, limiter=shared_limiter(redis, settings, PORTAL_ID))
    pauses = []
    pause = adapter.limiter.paused.pause
    adapter.limiter.paused.pause = lambda seconds: pauses.append(seconds) or pause(seconds)

    assert len(list(adapter.contact_ids())) == len(hubspot.contacts)
    assert hubspot.throttled >= 1
    assert pauses == []  # a batch's reads and writes went on
    throttled = [r.getMessage() for r in caplog.records if "answered 429" in r.getMessage()]
    assert throttled and set(throttled) == {
        "HubSpot answered 429 (SECONDLY); every worker's searches pause 1.0s"
    }


def test_a_long_hubspot_pause_puts_its_batch_off_and_leaves_the_worker_to_the_salesforce_org(
    post_delivery, post_change_events, crm, sf_crm, run_worker, hubspot, salesforce, redis
):
    """Waiting out a pause HubSpot asked for inside the job would hold the worker, and the org's batches
    queued behind, as long (with N workers, N HubSpot batches hold them all)."""
    RateLimiter(redis, f"hubspot:{PORTAL_ID}", 100).pause(60)
    post_delivery("contact.creation__single")
    post_change_events("lead_change_event__create")
    started = time.monotonic()

    results = run_worker()

    assert time.monotonic() - started < 10
    assert {r["lead"].split(":")[0]: r["outcome"] for r in results} == {
        "hubspot": "deferred",
        "salesforce": "written",
    }
    assert "leadscore_details" not in hubspot.contact_properties(VP)


def test_contact_creation__demo_burst_with_one_contact_refused_writes_the_other_23(
    post_delivery, crm, run_worker, hubspot, queue
):
    """HubSpot refuses a whole batch update for one contact's validation rule: the batch is halved
    until that contact is found, so the other 23 get their scores."""
    hubspot.reject["74300000102"] = "Lead score cannot be set while the contact is in a sequence"
    post_delivery(BURST)
    results = run_worker()
    batch_updates = hubspot.calls.count(("POST", "/crm/v3/objects/contacts/batch/update"))

    failed = [r for r in results if r["outcome"] == "failed"]
    assert [r["lead"] for r in failed] == [f"hubspot:{PORTAL_ID}:74300000102"]
    assert "Lead score cannot be set" in failed[0]["error"]
    assert sum(r["outcome"] == "written" for r in results) == 23
    assert batch_updates == 12  # halves 24 -> 12 -> 6 -> 3 -> 2 -> 1: 11 to find it, 1 as it is tried alone
    [dead] = queue.failed_job_registry.get_job_ids()  # tried alone, refused again: dead-lettered
    assert "VALIDATION_ERROR" in queue.fetch_job(dead).latest_result().exc_string
    kept_until = queue.connection.zscore(queue.failed_job_registry.key, dead)
    assert kept_until == pytest.approx(time.time() + pending.FAILED_KEPT_S, abs=60)  # a month, not a year


def test_a_rule_refusing_all_contacts_but_one_costs_four_halving_budgets_not_two_calls_a_contact(
    crm, hubspot
):
    template = hubspot.contacts["74300000101"]
    contacts = [str(75100000000 + n) for n in range(60)]
    for contact_id in contacts:
        hubspot.add_contact({**copy.deepcopy(template), "id": contact_id})
    hubspot.reject.update(dict.fromkeys(contacts[1:], "Scores are set by ops only"))

    results = crm.write_many([(contact_id, {"score": "50"}) for contact_id in contacts])
    batch_updates = hubspot.calls.count(("POST", "/crm/v3/objects/contacts/batch/update"))

    assert [r.ok for r in results] == [True] + [False] * 59
    assert (
        batch_updates == 4 * halving_budget(60) + 3
    )  # then the 3 halves still open, once each; 119 unbounded


def test_contact_creation__demo_burst_with_two_contacts_refused_writes_the_other_22_in_the_batch(
    post_delivery, crm, run_worker, hubspot, queue
):
    """Halving stops at its budget only while no half has been written: refusals beside written
    contacts are the contacts' own, and are searched out as before."""
    hubspot.reject.update({"74300000102": "In a sequence", "74300000118": "In a sequence"})
    post_delivery(BURST)
    results = run_worker()

    refused = sorted(r["lead"].rsplit(":", 1)[1] for r in results if r["outcome"] == "failed")
    assert refused == ["74300000102", "74300000118"]
    assert sum(r["outcome"] == "written" for r in results) == 22
    assert queue.failed_job_registry.count == 2  # each tried alone, refused again, with its own reason


@pytest.mark.parametrize(
    ("crm_at_fault", "said"),
    [
        ("a leadscore property deleted", 'VALIDATION_ERROR (PROPERTY_DOESNT_EXIST): Property values were '
         'not valid: [{"isValid": false, "message": "Property \\"leadscore_reason\\" does not exist"'),
        ("a portal rule refusing every write",
         "VALIDATION_ERROR (VALIDATION_RULE): Scores are set by ops only"),
    ],
)  # fmt: skip
def test_contact_creation__demo_burst_refused_alike_fails_once_as_a_batch_not_once_a_contact(
    post_delivery, crm, run_worker, hubspot, queue, caplog, crm_at_fault, said
):
    if crm_at_fault == "a leadscore property deleted":
        del hubspot.properties["leadscore_reason"]
    else:
        hubspot.reject.update(dict.fromkeys(hubspot.contacts, "Scores are set by ops only"))
    post_delivery(BURST)
    assert run_worker() == []  # the batch failed
    batch_updates = hubspot.calls.count(("POST", "/crm/v3/objects/contacts/batch/update"))

    # a missing property refuses every contact at once; a rule is halved for its 12 calls, then the
    # three halves still open are tried once each (two calls a contact would be 47)
    assert batch_updates == (1 if crm_at_fault == "a leadscore property deleted" else halving_budget(24) + 3)
    assert queue.count == 0 and queue.failed_job_registry.count == 0
    [retry] = queue.scheduled_job_registry.get_job_ids()  # the batch, retried by RQ as any batch
    assert len(queue.fetch_job(retry).args[2]) == 24
    [failure] = [r.getMessage() for r in caplog.records if r.name == "rq.worker" and r.levelname == "ERROR"]
    alike = "hubspot refused all 24 writes of the batch alike, so the CRM's set-up is at fault, not a lead: "
    assert alike + said in failure


def test_a_daily_limit_reached_while_halving_a_batch_keeps_the_scores_already_written(
    env, post_delivery, crm, queue, redis, run_worker, hubspot
):
    """Halving a refused batch takes several calls: when HubSpot stops answering part way, the halves
    already written are kept in the store now, since they read as unchanged when the batch runs again."""
    hubspot.reject["74300000101"] = "Blocked by a validation rule"
    write = hubspot._write

    def write_then_daily_limit(*args):
        write(*args)
        hubspot.daily_limit_reached = True  # the portal's daily limit runs out part way

    hubspot._write = write_then_daily_limit
    post_delivery(BURST)
    run_worker()
    hubspot._write, hubspot.daily_limit_reached = write, False  # a new day
    redis.delete(f"leadscore:rate-pause:hubspot:{PORTAL_ID}")
    _run_put_off_batches(queue)
    run_worker()

    shown = {c for c in hubspot.contacts if hubspot.contact_properties(c).get("leadscore_score")}
    kept = {row["lead_id"] for row in table(env, store.scores)}
    assert len(shown) == 23 and kept == shown  # all but the refused contact, each kept once written


def test_a_token_refused_while_halving_a_batch_keeps_the_scores_already_written(
    env, post_delivery, crm, queue, redis, run_worker, hubspot
):
    hubspot.reject["74300000101"] = "Blocked by a validation rule"
    write = hubspot._write

    def write_then_token_rotated(*args):
        write(*args)
        hubspot.token = "rotated"  # the app's token is rotated part way

    hubspot._write = write_then_token_rotated
    post_delivery(BURST)
    run_worker()  # the batch fails (401); RQ retries it later
    hubspot._write, hubspot.token = write, HUBSPOT_TOKEN  # the operator sets the new token
    for job_id in queue.scheduled_job_registry.get_job_ids():  # the retry comes due
        queue.scheduled_job_registry.remove(job_id)
        queue.enqueue_job(queue.fetch_job(job_id))
    run_worker()

    shown = {c for c in hubspot.contacts if hubspot.contact_properties(c).get("leadscore_score")}
    kept = {row["lead_id"] for row in table(env, store.scores)}
    assert len(shown) == 23 and kept == shown


def test_a_deleted_leadscore_property_dead_letters_saying_to_run_setup(post_delivery, crm, run_worker,
                                                                       hubspot, queue):  # fmt: skip
    del hubspot.properties["leadscore_reason"]  # someone deleted it in HubSpot's settings
    post_delivery("contact.creation__single")

    assert run_worker() == []
    [dead] = queue.failed_job_registry.get_job_ids()  # no retry can help: dead-lettered, to requeue
    reason = queue.fetch_job(dead).latest_result().exc_string.rstrip()
    assert reason.endswith(
        "hubspot refused the write of 74300000101: VALIDATION_ERROR (PROPERTY_DOESNT_EXIST): Property values "
        'were not valid: [{"isValid": false, "message": "Property \\"leadscore_reason\\" does not exist", '
        '"error": "PROPERTY_DOESNT_EXIST", "name": "leadscore_reason"}]: `leadscore setup hubspot` creates '
        "leadscore's properties"
    )


def test_a_revoked_hubspot_token_fails_the_batch_naming_the_setting(post_delivery, crm, run_worker, hubspot,
                                                                     queue, caplog):  # fmt: skip
    hubspot.token = "revoked"
    post_delivery("contact.creation__single")

    assert run_worker() == []
    assert queue.scheduled_job_registry.count == 1  # retried by RQ: it scores once the token is set
    [failure] = [r.getMessage() for r in caplog.records if r.name == "rq.worker" and r.levelname == "ERROR"]
    assert failure.rstrip().endswith(
        f"HubSpot refused HUBSPOT_ACCESS_TOKEN for portal {PORTAL_ID} (401: revoked, expired or mistyped): "
        "set the app's current access token"
    )


def test_rate_limiter_is_shared_through_redis(redis):
    first = RateLimiter(redis, "test", limit=3, window_s=0.5)
    second = RateLimiter(redis, "test", limit=3, window_s=0.5)  # another worker

    waits = [first.acquire(), second.acquire(), first.acquire()]
    started = time.monotonic()
    second.acquire()

    assert waits == [0.0, 0.0, 0.0]
    assert 0.3 < time.monotonic() - started < 2.0  # about the 0.5 s window


def test_the_rate_limiter_keeps_one_window_for_hosts_whose_clocks_disagree(redis, monkeypatch):
    ahead = RateLimiter(redis, "skew", limit=3, window_s=0.5)  # a host an hour ahead of the other
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    assert [ahead.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    monkeypatch.setattr(time, "time", real)
    started = time.monotonic()

    RateLimiter(redis, "skew", limit=3, window_s=0.5, max_wait_s=5).acquire()

    assert 0.3 < time.monotonic() - started < 2.0  # the window the other host filled, not an hour


def test_a_short_pause_does_not_cut_a_long_one_short(redis):
    limiter = RateLimiter(redis, "paused", limit=3)
    limiter.pause(3600)  # HubSpot's daily limit
    limiter.pause(2)  # then a secondly 429 from a call already in flight

    assert redis.pttl(limiter.pause_key) > 3_500_000


def test_salesforce_stops_before_the_daily_api_budget(post_outbound, sf_crm, run_worker, salesforce, queue):
    salesforce.api_calls = int(salesforce.api_limit * 0.95)
    post_outbound("outbound_message__single")
    run_worker()

    assert salesforce.writes == []
    assert queue.scheduled_job_registry.count == 1


@pytest.mark.parametrize(("said", "put_off_s"), [("TotalRequests", 3600), ("ConcurrentPerOrgLongTxn", 60)])
def test_an_org_whose_api_limit_is_spent_puts_the_batch_off_without_spending_its_retries(
    post_outbound, sf_crm, run_worker, salesforce, queue, said, put_off_s
):
    salesforce.limit_exceeded = f"{said} Limit exceeded."  # spent by other apps: the first call is refused
    post_outbound("outbound_message__single")
    before = time.time()
    run_worker()

    assert salesforce.writes == []
    assert queue.failed_job_registry.count == 0
    [job_id] = queue.scheduled_job_registry.get_job_ids()
    at = queue.scheduled_job_registry.get_scheduled_time(job_id).timestamp()
    assert put_off_s - 5 < at - before < put_off_s + 30
    assert Job.fetch(job_id, connection=queue.connection).retries_left == pending.BATCH_RETRY.max


def test_a_worker_started_past_the_api_stop_scores_again_once_the_budget_resets(settings, salesforce, sf_crm):
    salesforce.api_calls = int(salesforce.api_limit * 0.95)
    sf_crm.prepare()  # in the worker's parent; every work horse starts from what it knows then
    salesforce.api_calls = 0  # a new day

    assert sf_crm.read_lead("00Q5g00000Ls001EAB").title == "VP of Sales"


@pytest.mark.parametrize("holdout_share", ["0", "0.1"])  # with a holdout, the start checks the org's field
def test_a_salesforce_org_failing_at_worker_start_does_not_stop_hubspot_scoring(
    env, monkeypatch, post_delivery, crm, hubspot, salesforce, caplog, holdout_share
):
    monkeypatch.setenv("HOLDOUT_SHARE", holdout_share)
    _clear_caches()
    salesforce.token = "a-later-token"  # SALESFORCE_ACCESS_TOKEN has expired
    post_delivery("contact.creation__single")

    assert main(["worker", "--burst"]) == 0
    assert "leadscore_details" in hubspot.contact_properties("74300000101")  # scored, shown or held out
    [refused] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert refused.startswith(f"Salesforce org {SF_ORG_ID[:15]} is not ready at start (Salesforce no longer ")
    assert refused.endswith("password); the worker starts, and its jobs try again")


def test_a_work_horse_scores_a_batch_over_one_redis_connection(
    env, post_delivery, crm, hubspot, redis, queue
):
    """RQ forks a work horse per job, whose clients connect afresh (a TLS handshake each on rediss://):
    RQ and leadscore share one client, and a batch's LLM calls read every worker's pause through one
    thread, not each its own connection."""

    def connections_opened_by_a_worker() -> int:
        _clear_caches()
        started = redis.info("stats")["total_connections_received"]
        assert main(["worker", "--burst"]) == 0
        return redis.info("stats")["total_connections_received"] - started

    idle = connections_opened_by_a_worker()  # its own, before it forks: its client, the scheduler's, checks
    post_delivery("contact.creation__demo_burst")
    working = connections_opened_by_a_worker()

    jobs = len(finished_jobs(redis, queue))
    assert jobs == 2 and working - idle == jobs  # a collect and a batch of 24 leads, one connection each


def test_a_portal_the_worker_could_not_learn_at_start_is_learned_by_its_jobs(
    env, post_delivery, crm, hubspot, redis, run_worker
):
    """HubSpot down as the worker started left another portal's contacts read and written with the token
    for the worker's whole life (the jobs here run without the start's check, as after such a start)."""
    events = json.loads(load_delivery(FIXTURES / "hubspot" / "contact.creation__single.json"))
    post_delivery(json.dumps([{**event, "portalId": 7777777} for event in events]).encode())
    _clear_caches()

    assert run_worker() == [{"lead": f"hubspot:7777777:{VP}", "outcome": "not_this_account"}]
    assert "leadscore_details" not in hubspot.contact_properties(VP)
    [kept] = redis.keys("leadscore:reached:hubspot:*")
    assert redis.get(kept) == PORTAL_ID.encode()  # the next jobs ask Redis, not HubSpot


def test_a_delivery_from_a_portal_the_token_does_not_reach_is_not_scored_with_it(
    env, post_delivery, crm, hubspot, sf_crm, redis, queue, capfd
):
    """An app installed in two portals sends both portals' events; a contact id they share is two
    people, and HUBSPOT_ACCESS_TOKEN reaches one."""
    events = json.loads(load_delivery(FIXTURES / "hubspot" / "contact.creation__single.json"))
    post_delivery(json.dumps([{**event, "portalId": 7777777} for event in events]).encode())
    _clear_caches()

    assert main(["worker", "--burst"]) == 0
    assert "leadscore_details" not in hubspot.contact_properties(VP)  # portal 48213377's contact untouched
    [job] = [job for job in finished_jobs(redis, queue) if job.func_name.endswith("score_batch")]
    assert job.return_value() == [{"lead": f"hubspot:7777777:{VP}", "outcome": "not_this_account"}]
    assert (
        f"1 events of hubspot account 7777777 reached this deployment, whose credentials reach {PORTAL_ID}: "
        "not scored (leadscore serves one HubSpot portal and one Salesforce org"
    ) in capfd.readouterr().err
    post_delivery("contact.creation__single")  # the portal the token reaches: scored as ever
    assert main(["worker", "--burst"]) == 0
    assert "leadscore_details" in hubspot.contact_properties(VP)


def test_an_org_the_salesforce_credentials_do_not_reach_is_refused_at_start_and_not_scored(
    env, monkeypatch, crm, hubspot, salesforce, sf_crm, redis, queue, caplog
):
    other = "00D7x000001AbCdEAK"
    monkeypatch.setenv("SALESFORCE_ORG_IDS", f"{SF_ORG_ID},{other}")
    _clear_caches()
    body = json.dumps({**fixture_json("salesforce/lead_change_event__create.json"), "organizationId": other})
    signed = {"Content-Type": "application/json", **signing.sign_headers(SF_EVENTS_SECRET, body.encode())}
    web = create_app(get_settings()).test_client()  # the web takes the org: SALESFORCE_ORG_IDS names it
    assert web.post("/webhooks/salesforce/events", data=body, headers=signed).status_code == 200

    assert main(["worker", "--burst"]) == 0
    [job] = [job for job in finished_jobs(redis, queue) if job.func_name.endswith("score_batch")]
    [lead] = job.return_value()
    assert lead["outcome"] == "not_this_account" and lead["lead"].startswith(f"salesforce:{other}")
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [
        f"SALESFORCE_ORG_IDS names org {other[:15]}, but the Salesforce credentials reach org "
        f"{SF_ORG_ID[:15]}: {other[:15]}'s events are not scored (leadscore serves one org; run another "
        "deployment, with its credentials, for it)"
    ]
    assert not any(lead.get("Leadscore_Score__c") for lead in salesforce.leads.values())


def test_a_worker_without_salesforce_credentials_says_what_to_set(env, monkeypatch, capsys):
    monkeypatch.delenv("SALESFORCE_ACCESS_TOKEN")
    _clear_caches()

    assert main(["worker", "--burst"]) == 2
    assert capsys.readouterr().err.startswith("leadscore: Salesforce credentials missing: set ")


SOAP_LOGIN_GONE = (
    "SALESFORCE_API_VERSION is 66.0, but username-password login uses Salesforce's SOAP login(), which API "
    "65.0 and later do not offer (it is retired in Summer '27): set SALESFORCE_CONSUMER_KEY and "
    "SALESFORCE_CONSUMER_SECRET of an External Client App instead, or an API version of 64.0 or lower"
)


def test_password_login_with_an_api_version_without_soap_login_says_what_to_set(
    env, monkeypatch, capsys, caplog, post_delivery, crm, hubspot
):
    """The org is refused as any org that cannot sign in: the worker starts, and HubSpot goes on."""
    monkeypatch.delenv("SALESFORCE_ACCESS_TOKEN")
    monkeypatch.setenv("SALESFORCE_USERNAME", "leadscore@acme.example")
    monkeypatch.setenv("SALESFORCE_PASSWORD", "password")
    monkeypatch.setenv("SALESFORCE_API_VERSION", "66.0")
    _clear_caches()
    post_delivery("contact.creation__single")

    assert main(["setup", "salesforce"]) == 2
    assert capsys.readouterr().err == f"leadscore: {SOAP_LOGIN_GONE}\n"
    assert main(["worker", "--burst"]) == 0
    assert "leadscore_details" in hubspot.contact_properties("74300000101")
    [refused] = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert refused == (
        f"Salesforce org {SF_ORG_ID[:15]} is not ready at start ({SOAP_LOGIN_GONE}); the worker starts, and "
        "its jobs try again"
    )


def test_a_username_left_beside_client_credentials_is_not_taken_for_password_login(
    env, monkeypatch, salesforce
):
    monkeypatch.delenv("SALESFORCE_ACCESS_TOKEN")
    monkeypatch.setenv("SALESFORCE_USERNAME", "leadscore@acme.example")
    monkeypatch.setenv("SALESFORCE_PASSWORD", "password")
    monkeypatch.setenv("SALESFORCE_CONSUMER_KEY", salesforce.client_id)
    monkeypatch.setenv("SALESFORCE_CONSUMER_SECRET", salesforce.client_secret)
    monkeypatch.setenv("SALESFORCE_API_VERSION", "66.0")
    _clear_caches()

    assert main(["setup", "salesforce"]) == 0


# ---- the CRM down


def test_a_crm_that_is_down_or_unreachable_is_crm_unavailable(settings, crm, hubspot, sf_crm, salesforce):
    nowhere = AnyHttpUrl(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    hubspot.unavailable_objects.add("contacts")  # 503
    salesforce.unavailable = True  # 503

    with pytest.raises(CRMUnavailable, match="HubSpot batch read failed: 503"):
        crm.read_leads([VP])
    with pytest.raises(CRMUnavailable, match="Connection refused"):
        HubSpotCRM(settings.model_copy(update={"hubspot_api_base": nowhere})).read_leads([VP])
    with pytest.raises(CRMUnavailable, match="SERVER_UNAVAILABLE"):
        sf_crm.read_leads(["00Q5g00000Ls001EAB"])
    with pytest.raises(CRMUnavailable, match="Connection refused|Max retries"):
        SalesforceCRM(settings.model_copy(update={"salesforce_instance_url": nowhere})).read_leads(["x" * 15])
    client_credentials = {"salesforce_consumer_key": "k", "salesforce_consumer_secret": "s"}
    logging_in = settings.model_copy(update={"salesforce_access_token": "", **client_credentials})
    with pytest.raises(CRMUnavailable, match="Salesforce login failed: 503 "):  # a new token, mid-maintenance
        SalesforceCRM(logging_in)
    with pytest.raises(CRMUnavailable, match="Salesforce login failed: .*Connection refused"):
        SalesforceCRM(logging_in.model_copy(update={"salesforce_instance_url": nowhere}))
    hubspot.token = "revoked"
    with pytest.raises(CRMError) as refused:  # leadscore's to fix: RQ retries it, then it fails
        crm.read_leads([VP])
    assert not isinstance(refused.value, CRMUnavailable)


@pytest.mark.parametrize(
    ("code", "message", "kind", "said"),
    [
        (503, "<html>\n Down for maintenance </html>", CRMUnavailable,
         "Salesforce login failed: 503 <html> Down for maintenance </html>"),
        ("sf:SERVER_UNAVAILABLE", "The server is down", CRMUnavailable,
         "Salesforce login failed: SERVER_UNAVAILABLE The server is down"),
        ("sf:LOGIN_RATE_EXCEEDED", "Login rate exceeded", RateLimited,
         "Salesforce login refused: LOGIN_RATE_EXCEEDED Login rate exceeded"),
        ("sf:INVALID_LOGIN", "Invalid username, password, security token; or user locked out.", CRMError,
         "Salesforce refused the login (INVALID_LOGIN: Invalid username, password, security token; or user "
         "locked out.): check SALESFORCE_USERNAME, SALESFORCE_PASSWORD and SALESFORCE_SECURITY_TOKEN, and "
         "SALESFORCE_DOMAIN (test for a sandbox)"),
    ],
    ids=["maintenance_page", "server_unavailable", "too_many_logins", "wrong_password"],
)  # fmt: skip
def test_a_password_login_that_fails_is_waited_for_or_said_to_fix_as_the_org_answered(
    settings, monkeypatch, code, message, kind, said
):
    """simple-salesforce reports every SOAP login failure as a 401: read as a refusal, an org in its
    maintenance window spent a batch's RQ retries and failed it, where its other calls wait."""

    def login(*args):
        raise SalesforceAuthenticationFailed(code, message)

    monkeypatch.setattr(salesforce_api, "_new_session", login)
    with pytest.raises(kind) as caught:
        SalesforceCRM(settings)

    assert type(caught.value) is kind and str(caught.value) == said


def test_a_crm_that_fails_at_the_write_puts_the_batch_off_as_an_outage(
    post_delivery, post_change_events, crm, sf_crm, run_worker, hubspot, salesforce, queue
):
    """Read and scored, then the write answers 503: the batch waits for the CRM, spending no RQ retry."""
    hubspot.unavailable_objects.add("writes")
    salesforce.unavailable_writes = True
    post_delivery("contact.creation__single")
    post_change_events("lead_change_event__create")

    results = run_worker()

    assert sorted(r["outcome"] for r in results) == ["deferred", "deferred"]
    put_off = [queue.fetch_job(i) for i in queue.scheduled_job_registry.get_job_ids()]
    assert sorted(job.meta[batch.OUTAGE_META]["waits"] for job in put_off) == [1, 1]
    assert queue.failed_job_registry.count == 0 and hubspot.writes == salesforce.writes == []


@pytest.mark.parametrize(
    ("failing", "said"),
    [("notes", "notes read failed: 503"), ("associations", "associations read failed: 503")],
)
def test_a_lead_whose_notes_hubspot_fails_to_read_waits_rather_than_scores_without_them(
    crm, hubspot, failing, said
):
    hubspot.unavailable_objects.add(failing)  # 503, after urllib3's retries
    with pytest.raises(CRMUnavailable, match=f"HubSpot {said}"):
        crm.read_leads([VP])
    hubspot.forbidden_objects.add("notes")  # a missing scope is another matter: scored without them
    hubspot.unavailable_objects.clear()

    assert crm.read_leads([VP])[VP].title == "VP of Sales"


def _crm_down(monkeypatch) -> None:
    def unavailable(self, ids):
        raise CRMUnavailable("HubSpot batch read failed: 503 SERVICE UNAVAILABLE")

    monkeypatch.setattr(HubSpotCRM, "read_leads", unavailable)


def _run_put_off_batches(queue) -> list[float]:
    """Queue every put-off job now, as the scheduler does when its time comes; how long each was put off
    (to the second below: RQ schedules in whole seconds)."""
    registry, waits = queue.scheduled_job_registry, []
    for job in [queue.fetch_job(i) for i in registry.get_job_ids()]:
        waits.append((registry.get_scheduled_time(job) - job.created_at).total_seconds())
        registry.remove(job)
        queue.enqueue_job(job)
    return waits


def test_a_crm_outage_longer_than_the_retries_puts_the_batch_off_until_the_crm_answers(
    post_delivery, crm, queue, run_worker, hubspot, monkeypatch, caplog
):
    monkeypatch.setattr(pending, "BATCH_RETRY", Retry(max=5, interval=0))  # spent at once, were they used
    _crm_down(monkeypatch)
    post_delivery(BURST)
    outcomes, waits = [run_worker()], []
    for _ in range(8):  # 9 attempts: more than the RQ retries allow
        waits += _run_put_off_batches(queue)
        outcomes.append(run_worker())
    monkeypatch.undo()  # HubSpot answers again
    waits += _run_put_off_batches(queue)
    scored = run_worker()

    assert waits == pytest.approx([30, 60, 120, 240, 480, 960, 1920, 3600, 3600], abs=1)  # capped at 1 h
    assert all({r["outcome"] for r in run} == {"deferred"} and len(run) == 24 for run in outcomes)
    assert len(scored) == 24 and {r["outcome"] for r in scored} == {"written"}
    assert queue.failed_job_registry.count == 0 and queue.scheduled_job_registry.count == 0
    put_offs = [r.getMessage() for r in caplog.records if "put off" in r.getMessage()]
    assert put_offs[0].endswith(f"batch of 24 leads of hubspot:{PORTAL_ID} put off 30s (attempt 1, the CRM "
                                "unavailable for 0s)")  # fmt: skip
    assert "put off 3600s (attempt 9, " in put_offs[-1]


def test_a_rate_limit_in_the_middle_of_an_outage_keeps_the_outage_clock(
    post_delivery, crm, queue, run_worker, monkeypatch
):
    def throttled(self, ids):
        raise RateLimited("HubSpot portal 48213377: daily API limit reached", retry_after_s=5)

    _crm_down(monkeypatch)
    post_delivery("contact.creation__single")
    run_worker()
    [down] = [queue.fetch_job(i).meta for i in queue.scheduled_job_registry.get_job_ids()]
    monkeypatch.setattr(HubSpotCRM, "read_leads", throttled)
    _run_put_off_batches(queue)
    run_worker()

    [still] = [queue.fetch_job(i).meta for i in queue.scheduled_job_registry.get_job_ids()]
    outage = {"since": pytest.approx(time.time(), abs=30), "waits": 1}
    assert still[batch.OUTAGE_META] == down[batch.OUTAGE_META] == outage


def test_a_crm_down_past_the_bound_fails_the_batch_saying_how_to_requeue_it(
    post_delivery, crm, queue, run_worker, hubspot, monkeypatch, caplog
):
    monkeypatch.setattr(batch, "OUTAGE_GIVE_UP_S", 0.5)
    _crm_down(monkeypatch)
    post_delivery("contact.creation__single")
    run_worker()
    time.sleep(0.6)
    _run_put_off_batches(queue)
    run_worker()

    [dead] = queue.failed_job_registry.get_job_ids()  # straight there: no RQ retry, nothing put off
    assert queue.scheduled_job_registry.count == 0
    kept_until = queue.connection.zscore(queue.failed_job_registry.key, dead)
    assert kept_until == pytest.approx(time.time() + pending.FAILED_KEPT_S, abs=60)
    reason = queue.fetch_job(dead).latest_result().exc_string
    assert "CRMUnavailable: HubSpot batch read failed: 503" in reason
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    [gave_up] = [r.getMessage() for r in errors if r.name == batch.log.name]
    assert gave_up.startswith(f"hubspot:{PORTAL_ID}: the CRM has been unavailable for 0.0 h (")
    assert gave_up.endswith(f"once the CRM answers, `leadscore requeue {dead}` (or `rq requeue --queue "
                            f"{queue.name} {dead}`) scores it")  # fmt: skip

    assert main(["requeue", dead]) == 0  # still down: the requeued batch waits afresh
    assert [r["outcome"] for r in run_worker()] == ["deferred"] and queue.failed_job_registry.count == 0
    monkeypatch.undo()
    _run_put_off_batches(queue)
    assert [r["outcome"] for r in run_worker()] == ["written"]


# ---- the LLM


def test_llm_down_scores_with_fallback_then_rescores_when_back(
    env, monkeypatch, post_delivery, crm, queue, redis, run_worker, hubspot, llm
):
    _fallback_rescore_every(monkeypatch, 1)
    llm.force(status=500)
    post_delivery("contact.creation__single")
    [first] = run_worker()
    llm.force()  # the LLM is back

    time.sleep(1.1)
    scheduler = RQScheduler([queue], connection=redis)
    scheduler.acquire_locks()
    scheduler.enqueue_scheduled_jobs()
    scheduler.release_locks()
    [second] = run_worker()

    assert (first["fallback"], first["score"]) == (True, 79)
    assert (second["outcome"], second["fallback"], second["score"]) == ("written", False, 89)


def _each_rescore_run_at_once(queue, run_worker, most: int) -> tuple[list[list[dict]], list[int]]:
    """Run the worker, then each rescore it schedules as soon as it is scheduled, `most` runs at most:
    each run's results, and the minutes each rescore was put off by."""
    runs, waits = [run_worker()], []
    registry = queue.scheduled_job_registry
    while registry.count and len(runs) < most:
        [job] = [queue.fetch_job(i) for i in registry.get_job_ids()]
        waits.append(round((registry.get_scheduled_time(job) - datetime.now(UTC)).total_seconds() / 60))
        registry.remove(job)
        queue.enqueue_job(job)  # its time has come
        runs.append(run_worker())
    return runs, waits


def _fallback_errors(hubspot) -> set[str]:
    """The LLM errors the contacts' written details keep."""
    return {
        json.loads(props["leadscore_details"])["propensity"]["error"]
        for props in map(hubspot.contact_properties, hubspot.contacts)
        if "leadscore_details" in props
    }


def _fallback_rescore_every(monkeypatch, seconds: int) -> None:
    from integration.settings import get_settings
    from workers import jobs

    monkeypatch.setenv("FALLBACK_RESCORE_S", str(seconds))
    get_settings.cache_clear()
    jobs.context.cache_clear()


def test_an_llm_that_keeps_failing_on_a_lead_rescores_it_five_times_waiting_twice_as_long_each_time(
    env, monkeypatch, post_delivery, crm, queue, run_worker, hubspot, llm
):
    _fallback_rescore_every(monkeypatch, 60)
    llm.force(status=500)
    post_delivery("contact.creation__single")
    runs, waits = _each_rescore_run_at_once(queue, run_worker, most=10)

    assert waits == [1, 2, 4, 8, 16]  # minutes
    outcomes = [[(r["outcome"], r["fallback"]) for r in run] for run in runs]
    assert outcomes == [[("written", True)]] + [[("unchanged", True)]] * 5


@pytest.mark.parametrize("status", [400, 422])
def test_an_llm_that_refuses_the_request_itself_is_not_asked_again_by_a_rescore(
    env, monkeypatch, post_delivery, crm, queue, run_worker, hubspot, llm, status
):
    _fallback_rescore_every(monkeypatch, 60)
    llm.force(status=status)  # e.g. the prompt is too long for the model: the same request fails again
    post_delivery("contact.creation__single")

    [first] = run_worker()

    assert (first["outcome"], first["fallback"]) == ("written", True)
    assert queue.scheduled_job_registry.count == 0


def test_an_llm_429_pauses_every_worker_as_long_as_it_asks_and_its_leads_spend_no_rescore_round(
    env, monkeypatch, post_delivery, crm, queue, redis, run_worker, hubspot, llm
):
    monkeypatch.setenv("LLM_BATCH_DEADLINE_S", "2")  # shorter than the pause: not waited out
    _fallback_rescore_every(monkeypatch, 60)
    llm.force(status=429)
    llm.retry_after_ms, llm.retry_after = "6000", "6"  # Azure OpenAI's 429
    post_delivery(BURST)  # 24 leads, 16 asked at once
    results = run_worker()

    assert 1 <= len(llm.requests) <= 16  # none asked again, none started after the first 429 came back
    assert 3_000 < redis.pttl(SharedPause(redis, LLM_PAUSE).key) <= 6_000  # less what the worker took since
    assert [(r["outcome"], r["fallback"]) for r in results] == [("written", True)] * 24
    errors = _fallback_errors(hubspot)
    assert errors == {"LLM answered HTTP 429: code rate_limit_exceeded",
                      "LLM rate-limited (429): not asked in this batch"}  # fmt: skip
    [job] = [queue.fetch_job(i) for i in queue.scheduled_job_registry.get_job_ids()]  # the rescore of all 24
    rounds = {(e.rescores, e.throttled_rescores) for e in map(LeadEvent.model_validate_json, job.args[2])}
    assert (len(job.args[2]), rounds) == (24, {(0, 1)})

    asked = len(llm.requests)
    post_delivery(json.dumps([change(int(VP), 7001)]).encode())  # the next batch, within the pause
    [paused] = run_worker()
    assert (len(llm.requests), paused["fallback"]) == (asked, True)


def test_a_batch_waits_out_an_llm_pause_that_ends_before_its_deadline_then_asks(
    env, post_delivery, crm, queue, redis, run_worker, hubspot, llm
):
    SharedPause(redis, LLM_PAUSE).pause(2)  # another worker's 429
    asked_in_the_pause = []
    threading.Timer(1.5, lambda: asked_in_the_pause.append(len(llm.requests))).start()
    post_delivery(BURST)
    started = time.monotonic()
    results = run_worker()

    assert asked_in_the_pause == [0]
    assert time.monotonic() - started >= 1.9
    assert [(r["outcome"], r["fallback"]) for r in results] == [("written", False)] * 24
    assert len(llm.requests) == 24


def test_an_llm_that_keeps_asking_to_wait_rescores_a_lead_twelve_times_before_spending_its_rounds(
    env, monkeypatch, post_delivery, crm, queue, run_worker, hubspot, llm
):
    _fallback_rescore_every(monkeypatch, 60)
    llm.force(status=429)
    llm.retry_after = "120"  # every rescore below finds the LLM paused
    post_delivery("contact.creation__single")
    runs, waits = _each_rescore_run_at_once(queue, run_worker, most=30)

    assert len(llm.requests) == 1
    assert waits == [1] * batch.MAX_THROTTLED_RESCORES + [1, 2, 4, 8, 16]  # minutes
    outcomes = [[(r["outcome"], r["fallback"]) for r in run] for run in runs]
    written, unchanged = [("written", True)], [("unchanged", True)]  # the 2nd's error: "not asked"
    assert outcomes == [written] * 2 + [unchanged] * (batch.MAX_THROTTLED_RESCORES + 4)


@pytest.mark.parametrize(
    ("retry_after_ms", "retry_after", "seconds"),
    [
        ("6000", "7", 6),
        (None, "7", 7),
        ("250", None, 1),
        (None, "86400", 120),
        (None, "Wed, 21 Oct 2026 07:28:00 GMT", 10),
        (None, None, 10),
    ],
    ids=["azure", "seconds", "at_least_a_second", "at_most_two_minutes", "a_date", "unsaid"],
)
def test_an_llm_429_pauses_the_llm_as_long_as_it_asks_within_bounds(
    env, redis, llm, retry_after_ms, retry_after, seconds
):
    from workers.llm import PROBE_LEAD, PropensityReasoner

    llm.force(status=429)
    llm.retry_after_ms, llm.retry_after = retry_after_ms, retry_after
    [result] = PropensityReasoner(get_settings()).assess_many([PROBE_LEAD], datetime.now(UTC), redis)

    assert (result.fallback, result.throttled) == (True, True)
    assert seconds * 1000 - 500 < redis.pttl(SharedPause(redis, LLM_PAUSE).key) <= seconds * 1000


@pytest.mark.parametrize(
    "status", [401, 402, 403, 404]
)  # a key rotated, credits spent, access blocked, retired
def test_an_llm_refusing_a_setting_mid_run_has_its_leads_rescored_and_they_recover_once_it_is_fixed(
    env, monkeypatch, post_delivery, crm, queue, run_worker, hubspot, llm, status
):
    _fallback_rescore_every(monkeypatch, 60)
    llm.force(status=status)
    post_delivery("contact.creation__single")
    [refused] = run_worker()
    llm.force()  # fixed
    [job] = [queue.fetch_job(i) for i in queue.scheduled_job_registry.get_job_ids()]
    queue.scheduled_job_registry.remove(job)
    queue.enqueue_job(job)  # its time has come
    [recovered] = run_worker()

    assert (refused["outcome"], refused["fallback"], refused["score"]) == ("written", True, 79)
    assert (recovered["outcome"], recovered["fallback"], recovered["score"]) == ("written", False, 89)


def test_leads_the_llm_has_not_answered_by_the_batch_deadline_fall_back(
    env, monkeypatch, post_delivery, crm, queue, run_worker, hubspot, llm
):
    monkeypatch.setenv("LLM_BATCH_DEADLINE_S", "1")
    _fallback_rescore_every(monkeypatch, 60)
    llm.latency_s = 4  # within LLM_TIMEOUT_S, past the deadline
    post_delivery("contact.creation__single")
    [result] = run_worker()

    details = json.loads(hubspot.contact_properties("74300000101")["leadscore_details"])
    assert (result["outcome"], result["fallback"]) == ("written", True)
    assert details["propensity"]["error"] == "LLM gave no answer within the batch's 1s"
    assert queue.scheduled_job_registry.count == 1


def test_a_lead_throttled_in_its_fifth_rescore_waits_that_rounds_time_not_twice_it(queue):
    """FALLBACK_RESCORE_S's rounds end at 16 times it (80 minutes at the default)."""
    event = LeadEvent(crm="hubspot", account_id=PORTAL_ID, lead_id="74300000101", event_ids=("e",),
                      kinds=("creation",), occurred_at=datetime.now(UTC), rescores=5)  # fmt: skip

    batch._rescore_later(queue, 60, "hubspot", PORTAL_ID, [event], throttled={"74300000101"})

    [job_id] = queue.scheduled_job_registry.get_job_ids()
    due = queue.scheduled_job_registry.get_scheduled_time(job_id).timestamp()
    assert 60 * 16 - 10 < due - time.time() <= 60 * 16


def test_an_llm_that_keeps_timing_out_is_asked_no_more_in_that_batch(
    env, monkeypatch, post_delivery, crm, queue, run_worker, hubspot, llm
):
    """A local server with one slot works on through each abandoned call: asking the batch's other
    leads would only queue them behind, and the next batch's too."""
    monkeypatch.setenv("LLM_TIMEOUT_S", "0.3")
    monkeypatch.setenv("LLM_CONCURRENCY", "1")
    _fallback_rescore_every(monkeypatch, 60)
    llm.latency_s = 1
    post_delivery(BURST)  # 24 leads
    results = run_worker()

    assert len(llm.requests) == 3
    assert [(r["outcome"], r["fallback"]) for r in results] == [("written", True)] * 24
    errors = _fallback_errors(hubspot)
    assert errors == {"LLM timed out", "LLM timed out 3 times: not asked in this batch"}
    assert queue.scheduled_job_registry.count == 1  # all 24 rescored later, as any timed-out lead


REFUSED_MAX_TOKENS = "LLM answered HTTP 400: code unsupported_parameter, param max_tokens"
MAX_TOKENS_SAID = (
    "Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' "
    "instead."
)


@pytest.mark.parametrize(
    ("status", "reasoning_model", "refusal"),
    [
        (400, False, "LLM answered HTTP 400 (Invalid request.)"),
        (401, False, "LLM answered HTTP 401 (Invalid request.)"),
        (404, False, "LLM answered HTTP 404 (Invalid request.)"),
        (None, True, f"{REFUSED_MAX_TOKENS} ({MAX_TOKENS_SAID})"),
        (500, False, None),
        (429, False, None),
        (None, False, None),
    ],
    ids=["400", "401", "404", "reasoning_model", "500", "429", "answered"],
)
def test_a_worker_says_at_start_when_the_llm_refuses_its_request_in_the_providers_words(
    env, monkeypatch, llm, caplog, status, reasoning_model, refusal
):
    llm.force(status=status)  # a 500 may pass
    llm.reasoning_model = reasoning_model  # it takes no `max_tokens`
    assert main(["worker", "--burst"]) == 0

    refusals = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "LLM" in r.getMessage()]
    assert len(llm.requests) == (2 if status == 500 else 1)  # one made-up lead; a 5xx is asked again
    assert refusals == (
        [f"the LLM (gpt-4o-mini at {llm.url}/v1) refuses leadscore's request: {refusal}. Every lead is "
         "scored on the rules alone until LLM_MODEL, LLM_BASE_URL, LLM_API_KEY or LLM_EXTRA_PARAMS is fixed"]
        if refusal else []
    )  # fmt: skip


def test_a_lead_the_llm_refuses_keeps_the_providers_error_code_and_is_counted_under_the_status_alone(
    env, post_delivery, crm, queue, run_worker, hubspot, llm
):
    llm.reasoning_model = True
    post_delivery("contact.creation__single")
    [result] = run_worker()

    details = json.loads(hubspot.contact_properties("74300000101")["leadscore_details"])
    assert (result["outcome"], result["fallback"]) == ("written", True)
    assert details["propensity"]["error"] == REFUSED_MAX_TOKENS
    counted = metrics.counter_value(queue.connection, "llm_fallbacks_total", reason="LLM answered HTTP 400")
    assert counted == 1


SECRET_AND_EMAIL = "Incorrect API key provided: sk-proj-abcdefghijklmnopqrstuvwxyz. Ask ops@example.com. "
MASKED = "Incorrect API key provided: [redacted]. Ask [email]. "
VLLM_NOT_FOUND = {"object": "error", "message": "The model `gpt-4o-mini` does not exist.",
                  "type": "NotFoundError", "param": None, "code": 404}  # fmt: skip


def test_a_gateway_quoting_back_a_header_it_was_sent_has_it_masked(env, monkeypatch, llm):
    """Masking by shape misses a key of no known shape (an Azure or gateway key: 32 hex characters)."""
    from workers.llm import PROBE_LEAD, PropensityReasoner
    from workers.propensity import build_messages

    key = "0123456789abcdef0123456789abcdef"
    monkeypatch.setenv("LLM_EXTRA_HEADERS", json.dumps({"x-gateway-key": key}))
    get_settings.cache_clear()
    body = {"error": {"message": f"Invalid subscription key; header x-gateway-key: {key} refused"}}
    llm.force(status=401, raw=("application/json", json.dumps(body).encode()))
    asked = build_messages(PROBE_LEAD, datetime.now(UTC))
    result = PropensityReasoner(get_settings()).assess(PROBE_LEAD, asked)

    assert result.said == "Invalid subscription key; header x-gateway-key: [redacted] refused"


def test_a_429_for_a_quota_used_up_is_a_refusal_until_fixed_not_a_wait(
    env, monkeypatch, post_delivery, crm, queue, redis, run_worker, hubspot, llm
):
    """OpenAI answers a plan or credit used up with a 429 no wait ends: pausing every worker and
    rescoring past the rounds would only ask again and again. It is rescored as a rotated key is."""
    body = {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    _fallback_rescore_every(monkeypatch, 60)
    llm.force(status=429, raw=("application/json", json.dumps(body).encode()))
    post_delivery("contact.creation__single")
    [result] = run_worker()

    assert (result["outcome"], result["fallback"]) == ("written", True)
    assert _fallback_errors(hubspot) == {"LLM answered HTTP 429: code insufficient_quota"}
    assert redis.pttl(SharedPause(redis, LLM_PAUSE).key) == -2  # no pause: nothing to wait for
    [job] = [queue.fetch_job(i) for i in queue.scheduled_job_registry.get_job_ids()]
    assert [json.loads(e)["rescores"] for e in job.args[2]] == [1]  # a round spent, as for a refusal


@pytest.mark.parametrize(
    ("status", "content_type", "body", "error", "said"),
    [
        (404, "application/json", b'{"error": "model \\"llama3.1\\" not found, try pulling it first"}',
         "LLM answered HTTP 404", 'model "llama3.1" not found, try pulling it first'),
        (404, "application/json", json.dumps(VLLM_NOT_FOUND).encode(),
         "LLM answered HTTP 404: code 404", "The model `gpt-4o-mini` does not exist."),
        (404, "application/json", b'{"detail": "Not Found"}',
         "LLM answered HTTP 404", '{"detail": "Not Found"}'),
        (403, "text/plain", b"Forbidden:\n  no route\n", "LLM answered HTTP 403", "Forbidden: no route"),
        (401, "application/json",
         json.dumps({"error": {"message": SECRET_AND_EMAIL + "x" * 300, "code": "invalid_api_key"}}).encode(),
         "LLM answered HTTP 401: code invalid_api_key", (MASKED + "x" * 300)[:200]),
        (400, "application/json", b"", "LLM answered HTTP 400", ""),
        (429, "application/json",  # OpenAI's: a count and a request id, different at each call
         json.dumps({"error": {"message": "Rate limit reached for gpt-4o-mini in organization org-Ab12 on "
                               "tokens per min (TPM): Limit 200000, Used 199871. <a href='x'>see</a>",
                               "code": "rate_limit_exceeded", "param": "<b>x</b>"}}).encode(),
         "LLM answered HTTP 429: code rate_limit_exceeded",
         "Rate limit reached for gpt-4o-mini in organization org-Ab12 on tokens per min (TPM): Limit 200000, "
         "Used 199871. <a href='x'>see</a>"),
    ],
    ids=["ollama", "vllm", "no_message", "plain_text", "secret_and_long", "empty", "openai_429"],
)  # fmt: skip
def test_what_a_provider_said_refusing_a_call_is_logged_masked_and_clipped_but_never_kept_with_the_lead(
    env, llm, status, content_type, body, error, said
):
    """The lead keeps a stable error, which reps may read: the provider's words (a request id, a count,
    an org id, its markup) would reach them, and rewrite the lead at every rescore."""
    from workers.llm import PROBE_LEAD, PropensityReasoner
    from workers.propensity import build_messages

    llm.force(status=status, raw=(content_type, body))
    asked = build_messages(PROBE_LEAD, datetime.now(UTC))
    result = PropensityReasoner(get_settings()).assess(PROBE_LEAD, asked)

    assert (result.fallback, result.error, result.said) == (True, error, said)


def test_a_reasoning_model_is_asked_with_llm_extra_params_through_a_gateway_given_llm_extra_headers(
    env, monkeypatch, post_delivery, crm, run_worker, llm, caplog
):
    caplog.set_level(logging.DEBUG)
    llm.reasoning_model = True  # it refuses `max_tokens` and `temperature` 0
    params = {
        "max_tokens": None,
        "max_completion_tokens": 2000,
        "temperature": None,
        "reasoning_effort": "low",
    }
    monkeypatch.setenv("LLM_EXTRA_PARAMS", json.dumps(params))
    monkeypatch.setenv(
        "LLM_EXTRA_HEADERS", json.dumps({"cf-aig-authorization": "Bearer gw-s3cret", "X-Title": "ls"})
    )
    _clear_caches()
    assert jobs.context().reasoner.check() is None  # the worker's start check: answered
    post_delivery("contact.creation__single")
    [result] = run_worker()

    assert (result["outcome"], result["fallback"]) == ("written", False)
    sent = {
        "response_format": {"type": "json_object"},
        "max_completion_tokens": 2000,
        "reasoning_effort": "low",
    }
    asked = [{k: v for k, v in r.items() if k not in ("model", "messages")} for r in llm.requests]
    assert asked == [sent, sent]  # the start check's, the lead's
    headers = [(h["cf-aig-authorization"], h["x-title"], h["authorization"]) for h in llm.headers]
    assert headers == [("Bearer gw-s3cret", "ls", f"Bearer {env['LLM_API_KEY']}")] * 2
    assert [r.getMessage() for r in caplog.records if "s3cret" in r.getMessage()] == []


def test_an_llm_answer_is_cached_by_the_request_llm_extra_params_make(
    env, monkeypatch, post_delivery, crm, run_worker, hubspot, llm
):
    asked_with = []
    for n, params in enumerate(["", '{"max_tokens": 600}', '{"max_tokens": 600}']):
        monkeypatch.setenv("LLM_EXTRA_PARAMS", params)
        _clear_caches()
        hubspot.contacts[VP]["properties"]["leadscore_details"] = ""  # so the lead is scored again
        post_delivery(json.dumps([change(int(VP), 900 + n)]).encode())
        [result] = run_worker()
        asked_with.append((result["outcome"], result["fallback"], len(llm.requests)))

    assert [r["max_tokens"] for r in llm.requests] == [300, 600]  # the third, asked as the second: cached
    assert asked_with == [("written", False, 1), ("written", False, 2), ("written", False, 2)]


@pytest.mark.parametrize("elsewhere", ["", "http://127.0.0.1:9/v1"])
def test_an_openai_base_url_set_for_another_tool_does_not_redirect_the_llm(env, monkeypatch, elsewhere):
    from integration.settings import get_settings
    from workers.llm import PropensityReasoner

    monkeypatch.delenv("LLM_BASE_URL")
    monkeypatch.setenv("OPENAI_BASE_URL", elsewhere)  # the openai client reads it when given no base URL
    get_settings.cache_clear()

    assert str(PropensityReasoner(get_settings()).client.base_url) == "https://api.openai.com/v1/"


@pytest.mark.parametrize(
    ("choice", "error"),
    [
        ({"finish_reason": "length",
          "message": {"role": "assistant", "content": '{"propensity": 0.7, "conf'}},
         "LLM reply unusable: reply cut off (length)"),
        ({"finish_reason": "stop",
          "message": {"role": "assistant", "content": None, "refusal": "I can't help."}},
         "LLM reply unusable: the LLM refused: \"I can't help.\""),
        ({"finish_reason": "content_filter", "message": {"role": "assistant", "content": ""}},
         "LLM reply unusable: reply cut off (content_filter)"),
    ],
    ids=["cut_off_at_max_tokens", "refusal", "filtered"],
)  # fmt: skip
def test_an_llm_reply_asking_again_would_repeat_falls_back_without_a_rescore(
    env, monkeypatch, post_delivery, crm, queue, run_worker, hubspot, llm, choice, error
):
    _fallback_rescore_every(monkeypatch, 60)
    reply = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "stub",
             "choices": [{"index": 0, **choice}]}  # fmt: skip
    llm.force(raw=("application/json", json.dumps(reply).encode()))
    post_delivery("contact.creation__single")
    [result] = run_worker()

    details = json.loads(hubspot.contact_properties("74300000101")["leadscore_details"])
    assert (result["outcome"], result["fallback"]) == ("written", True)
    assert details["propensity"]["error"] == error
    assert queue.scheduled_job_registry.count == 0
    events = json.loads(load_delivery(FIXTURES / "hubspot" / "contact.creation__single.json"))
    post_delivery(json.dumps([{**e, "eventId": e["eventId"] + 1} for e in events]).encode())  # a rescore
    [again] = run_worker()
    assert len(llm.requests) == 1  # the same request would get the same reply: kept, not asked again
    assert (again["outcome"], again["fallback"]) == ("unchanged", True)
    counted = {name: metrics.counter_value(queue.connection, name, **labels) for name, labels in (
        ("llm_calls_total", {"outcome": "fallback"}), ("llm_cache_hits_total", {}),
        ("llm_fallbacks_total", {"reason": "LLM reply unusable"}))}  # fmt: skip
    assert counted == {"llm_calls_total": 1, "llm_cache_hits_total": 1, "llm_fallbacks_total": 2}


@pytest.mark.parametrize("content", [None, "", "<think>A pricing form is strong intent, but"],
                         ids=["null", "empty", "thinking_only"])  # fmt: skip
def test_a_reply_cut_off_before_a_word_of_the_answer_is_not_kept_and_is_said_once_a_batch(
    env, monkeypatch, post_delivery, crm, queue, run_worker, hubspot, llm, caplog, content
):
    from workers.llm import TOKEN_LIMIT_SPENT

    _fallback_rescore_every(monkeypatch, 60)
    reply = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "o4-mini",
             "choices": [{"index": 0, "finish_reason": "length",
                          "message": {"role": "assistant", "content": content}}],
             "usage": {"completion_tokens": 300,
                       "completion_tokens_details": {"reasoning_tokens": 300}}}  # fmt: skip
    llm.force(raw=("application/json", json.dumps(reply).encode()))
    assert jobs.context().reasoner.check() == TOKEN_LIMIT_SPENT  # the worker says so at start too
    post_delivery(BURST)  # 24 leads
    results = run_worker()

    assert [(r["outcome"], r["fallback"]) for r in results] == [("written", True)] * 24
    errors = _fallback_errors(hubspot)
    assert errors == {TOKEN_LIMIT_SPENT}
    said = [r.getMessage() for r in caplog.records if r.name == "workers.llm" and r.levelname != "INFO"]
    assert said == [
        "the LLM spent its whole token limit before answering 24 of 24 leads (a reasoning model thinks at "
        "length): they are scored on the rules alone until max_completion_tokens (or max_tokens) is raised "
        "in LLM_EXTRA_PARAMS"
    ]
    assert queue.scheduled_job_registry.count == 0  # asked again, it would be cut off again
    asked = len(llm.requests)
    llm.force()  # the limit raised
    post_delivery(json.dumps([change(int(VP), 7001)]).encode())
    [again] = run_worker()
    assert (again["outcome"], again["fallback"], len(llm.requests)) == ("written", False, asked + 1)


def test_a_rescore_leaves_a_waiting_event_of_the_lead_as_it_is(post_delivery, redis):
    post_delivery("contact.propertyChange__lead_status")
    [waiting] = pending_events(redis, "hubspot", PORTAL_ID)
    rescore = LeadEvent.model_validate({**waiting, "event_ids": ["an-earlier-one"], "rescores": 3})
    with redis.pipeline(transaction=True) as pipe:
        pending.record(pipe, [rescore], keep_waiting=True)
        pipe.execute()

    assert pending_events(redis, "hubspot", PORTAL_ID) == [waiting]  # its real event: the count starts again


def test_an_llm_left_unconfigured_is_not_a_reason_to_rescore(
    env, monkeypatch, post_delivery, crm, queue, run_worker, hubspot, llm
):
    monkeypatch.delenv("LLM_API_KEY")
    _fallback_rescore_every(monkeypatch, 60)
    post_delivery("contact.creation__single")
    [scored] = run_worker()

    assert (scored["outcome"], scored["fallback"], scored["score"]) == ("written", True, 79)
    assert queue.scheduled_job_registry.count == 0
    assert llm.requests == []


# ---- a worker SIGKILLed


# A `leadscore worker` (workers.worker.build, as `cmd_worker` builds it) that SIGKILLs itself at one
# instant of taking a job: `{instant}` is the worker method it dies in instead of running.
_DYING_WORKER = """
import os, signal, sys
from redis import Redis
from integration import pending
from workers.worker import build
redis = Redis.from_url(sys.argv[1])
worker = build(pending.worker_queues(sys.argv[2], redis), redis, 15)
setattr(worker, "{instant}", lambda *args: os.kill(os.getpid(), signal.SIGKILL))
worker.work(burst=True)
"""


def _a_batch_taken_by_a_worker_that_dies(settings, queue, redis, instant: str, seen_parked_at=None):
    with redis.pipeline(transaction=True) as pipe:
        now = datetime.now(UTC)
        pending.record(pipe, [LeadEvent(
            crm="hubspot", account_id=PORTAL_ID, lead_id=VP, event_ids=("kill",), kinds=("property_change",),
            occurred_at=now, accepted_at=now,
        )])  # fmt: skip
        pipe.execute()
    job = pending.take_batch(queue, "hubspot", PORTAL_ID, 1)
    if seen_parked_at:  # RQ's maintenance once saw this job id parked (a retried job keeps its id)
        redis.set(queue.intermediate_queue.get_first_seen_key(job.id), seen_parked_at)
    script = _DYING_WORKER.format(instant=instant)
    worker = subprocess.run(
        [sys.executable, "-c", script, settings.redis_url, settings.queue_name],
        capture_output=True, text=True, timeout=60, cwd=FIXTURES.parent,
    )  # fmt: skip
    assert worker.returncode == -signal.SIGKILL, worker.stderr
    assert queue.count == 0  # the worker took it
    return job


def _retried_and_scored(job, queue, redis, run_worker, hubspot) -> None:
    job.refresh()
    assert (job.get_status(), job.retries_left) == ("scheduled", pending.BATCH_RETRY.max - 1)
    queue.scheduled_job_registry.requeue(job)  # its retry's wait (5 s) is over
    [result] = run_worker()
    assert result["outcome"] == "written"
    assert [(contact, bool(values["leadscore_score"])) for contact, values in hubspot.writes] == [(VP, True)]


def test_a_batch_whose_worker_is_killed_before_its_work_horse_starts_is_retried(
    settings, crm, queue, redis, run_worker, hubspot
):
    job = _a_batch_taken_by_a_worker_that_dies(
        settings, queue, redis, "fork_work_horse", seen_parked_at=time.time() - 3600
    )
    assert job.id in queue.started_job_registry.get_job_ids(cleanup=False)  # filed as running…
    assert queue.intermediate_queue.get_job_ids() == []  # …and so no longer parked…
    assert not redis.exists(queue.intermediate_queue.get_first_seen_key(job.id))  # …nor seen parked

    queue.started_job_registry.cleanup(timestamp=time.time() + 120)  # a maintenance past its heartbeat

    _retried_and_scored(job, queue, redis, run_worker, hubspot)


def test_a_batch_whose_worker_is_killed_after_taking_it_before_filing_it_as_running_is_retried(
    settings, crm, queue, redis, run_worker, hubspot
):
    job = _a_batch_taken_by_a_worker_that_dies(settings, queue, redis, "prepare_execution")
    live = queue.intermediate_queue
    assert live.get_job_ids() == [job.id]  # parked where maintenance looks

    live.cleanup(SimpleWorker([queue], connection=redis), queue)  # a maintenance sees it first…
    redis.set(live.get_first_seen_key(job.id), time.time() - 120)  # …and again two minutes later
    live.cleanup(SimpleWorker([queue], connection=redis), queue)

    assert live.get_job_ids() == []
    _retried_and_scored(job, queue, redis, run_worker, hubspot)


def test_a_waiting_worker_takes_a_job_queued_on_either_queue_and_parks_it_until_it_runs(queue, redis):
    names = [q.name for q in pending.worker_queues(queue.name, redis)]
    live, backfill = [LeadscoreQueue(name, connection=redis) for name in names]
    for target in (live, backfill):
        threading.Timer(0.2, target.enqueue, args=("builtins.len", "x")).start()  # while it waits

        job, taken_from = LeadscoreQueue.dequeue_any([live, backfill], 10, connection=redis)

        assert (taken_from.name, target.intermediate_queue.get_job_ids()) == (target.name, [job.id])
    with pytest.raises(DequeueTimeout):
        LeadscoreQueue.dequeue_any([live, backfill], 1, connection=redis)


# ---- a worker stopped (SIGTERM, a deploy)

_STOPPED_WORKER = """
import os, signal, sys
from redis import Redis
from integration import pending
from workers.worker import build
redis = Redis.from_url(sys.argv[1])
worker = build(pending.worker_queues(sys.argv[2], redis), redis, 15)
lmove = redis.lmove
def lmove_then_stop(*args):
    job_id = lmove(*args)
    if job_id is not None:
        os.kill(os.getpid(), signal.SIGTERM)
    return job_id
redis.lmove = lmove_then_stop
worker.work(burst=True)
"""


def test_a_worker_stopped_just_after_taking_a_job_runs_it_then_stops(settings, queue, redis):
    first, second = queue.enqueue("builtins.len", "ab"), queue.enqueue("builtins.len", "abc")

    worker = subprocess.run(
        [sys.executable, "-c", _STOPPED_WORKER, settings.redis_url, settings.queue_name],
        capture_output=True, text=True, timeout=60, cwd=FIXTURES.parent,
    )  # fmt: skip

    assert worker.returncode == 0, worker.stderr
    assert (first.get_status(refresh=True), first.return_value()) == ("finished", 2)
    assert queue.get_job_ids() == [second.id]  # it stopped after the job it had taken
    assert queue.intermediate_queue.get_job_ids() == []


def test_a_platform_stopping_every_process_of_a_busy_worker_lets_the_job_finish(settings, queue, redis):
    """Heroku signals every process of a dyno, systemd every process of the unit, and may do so
    twice: the work horse must not die mid-job, and the worker stops after it."""
    running, waiting = queue.enqueue("time.sleep", 3, retry=Retry(max=2)), queue.enqueue("builtins.len", "ab")
    script = _STOPPED_WORKER.split("lmove = redis.lmove")[0] + "worker.work(burst=True)\n"
    worker = subprocess.Popen(
        [sys.executable, "-c", script, settings.redis_url, settings.queue_name],
        stderr=subprocess.PIPE, text=True, cwd=FIXTURES.parent, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30  # filed as started before the fork: wait for the work horse too
        while not (running.get_status(refresh=True) == "started" and harness.descendants(worker.pid)):
            assert time.monotonic() < deadline, "the job never ran in a work horse"
            time.sleep(0.05)
        time.sleep(0.3)  # the horse sets its signals first thing after the fork
        harness.signal_tree(worker, signal.SIGTERM)
        time.sleep(1.5)  # RQ takes a second SIGTERM after a second as a cold stop
        harness.signal_tree(worker, signal.SIGTERM)
        assert worker.wait(timeout=15) == 0, worker.stderr.read()
    finally:
        worker.kill()

    assert running.get_status(refresh=True) == "finished"
    assert running.retries_left == 2
    assert queue.get_job_ids() == [waiting.id]  # it stopped after the job in hand


def test_a_waiting_worker_stops_within_a_second_or_two_of_a_sigterm(settings, queue, redis):
    script = _STOPPED_WORKER.replace("worker.work(burst=True)", "worker.work()")
    worker = subprocess.Popen(
        [sys.executable, "-c", script, settings.redis_url, settings.queue_name],
        stderr=subprocess.PIPE, text=True, cwd=FIXTURES.parent,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not Worker.all(connection=redis) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # waiting on the live queue
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=5) == 0, worker.stderr.read()
    finally:
        worker.kill()


def test_on_a_redis_without_lmove_a_worker_takes_jobs_as_rq_does_live_queue_first(queue, redis):
    names = [q.name for q in pending.worker_queues(queue.name, redis)]
    live, backfill = [LeadscoreQueue(name, connection=redis) for name in names]
    setattr(redis, "__rq_redis_server_version", (6, 0, 16))  # where RQ keeps what INFO said
    backfill.enqueue("builtins.len", "x")
    first = live.enqueue("builtins.len", "x")

    job, taken_from = LeadscoreQueue.dequeue_any([live, backfill], 10, connection=redis)

    assert (job.id, taken_from.name) == (first.id, live.name)
    assert live.intermediate_queue.get_job_ids() == []  # BLPOP parks nothing


# ---- Redis down at the webhook


def test_redis_down_answers_503_and_up_again_accepts_without_restart(settings, tmp_path):
    with ExitStack() as stack:
        url = start_redis(stack, "--appendonly", "yes", "--dir", str(tmp_path))
        port = url.rsplit(":", 1)[1].split("/")[0]
        client = create_app(settings.model_copy(update={"redis_url": url})).test_client()
        body = (FIXTURES / "hubspot" / "contact.creation__single.json").read_bytes()
        compact = json.dumps(json.loads(body)).encode()

        def post():
            return client.post(
                WEBHOOK_URL, data=compact, headers=hubspot_headers(WEBHOOK_URL, compact, APP_SECRET)
            )

        subprocess.run(["redis-cli", "-p", port, "shutdown", "nosave"], capture_output=True, timeout=10)
        down = post()
        stack.enter_context(_redis_on(port, tmp_path))
        up = post()

    assert down.status_code == 503
    assert up.status_code == 200 and up.get_json()["queued"] == 1


def test_redis_down_still_acknowledges_a_delivery_with_nothing_to_queue(settings):
    with ExitStack() as stack:
        url = start_redis(stack)
        client = create_app(settings.model_copy(update={"redis_url": url})).test_client()
        port = url.rsplit(":", 1)[1].split("/")[0]
        subprocess.run(["redis-cli", "-p", port, "shutdown", "nosave"], capture_output=True, timeout=10)
        body = load_delivery(FIXTURES / "hubspot" / "contact.propertyChange__own_output_only.json")
        response = client.post(WEBHOOK_URL, data=body, headers=hubspot_headers(WEBHOOK_URL, body, APP_SECRET))

    assert response.status_code == 200
    assert response.get_json() == {"received": 2, "queued": 0, "ignored": 2, "unsupported": 0}


class _redis_on:
    def __init__(self, port: str, workdir):
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                port,
                "--bind",
                "127.0.0.1",
                "--dir",
                str(workdir),
                "--appendonly",
                "yes",
            ],
            stdout=subprocess.DEVNULL,
        )
        for _ in range(100):
            if (
                subprocess.run(["redis-cli", "-p", port, "ping"], capture_output=True).stdout.strip()
                == b"PONG"
            ):
                break
            time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=10)


# ---- operations


def test_failed_and_requeue_commands(post_delivery, crm, run_worker, hubspot, queue, capsys):
    hubspot.reject["74300000101"] = "Blocked by a validation rule"
    post_delivery("contact.creation__single")
    run_worker()  # refused alone: dead-lettered at once

    assert main(["failed"]) == 0
    listing = capsys.readouterr().out
    hubspot.reject.clear()
    [job_id] = queue.failed_job_registry.get_job_ids()
    assert main(["requeue", job_id]) == 0
    [result] = run_worker()

    assert f"hubspot:{PORTAL_ID} {VP}" in listing and "VALIDATION_ERROR" in listing
    assert result["outcome"] == "written"
    assert queue.failed_job_registry.count == 0


def test_metrics_count_the_pipeline(post_delivery, crm, run_worker, client):
    post_delivery(BURST)
    post_delivery(BURST)  # redelivered: deduplicated
    post_delivery("contact.propertyChange__own_output_only")
    run_worker()

    families = {
        f.name: f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))
    }

    def value(name: str, **labels) -> float:
        return sum(
            s.value
            for s in families[name].samples
            if s.name.endswith(("_total", name)) and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("leadscore_events_received", crm="hubspot") == 50
    assert value("leadscore_events_deduplicated", crm="hubspot") == 24
    assert value("leadscore_events_ignored", crm="hubspot") == 2
    assert value("leadscore_events_enqueued", crm="hubspot") == 48  # the collector drops the repeats
    assert value("leadscore_writes", crm="hubspot", outcome="written") == 24
    assert value("leadscore_llm_calls", outcome="ok") == 24
    assert value("leadscore_crm_calls", crm="hubspot", operation="batch_update") == 1
    assert families["leadscore_scoring_latency_seconds"].samples
    assert value("leadscore_queue_depth", queue="pending") == 0


def test_metrics_show_the_jobs_in_the_failed_registry(post_delivery, crm, run_worker, hubspot, queue, client):
    def failed_jobs() -> dict[str, float]:
        text = client.get("/metrics").get_data(as_text=True)
        [family] = [f for f in text_string_to_metric_families(text) if f.name == "leadscore_failed_jobs"]
        return {sample.labels["queue"]: sample.value for sample in family.samples}

    backfill = f"{queue.name}-backfill"
    assert failed_jobs() == {queue.name: 0, backfill: 0}
    del hubspot.properties["leadscore_reason"]  # every write is refused for good: dead-lettered
    post_delivery("contact.creation__single")
    run_worker()

    assert queue.failed_job_registry.count == 1 and failed_jobs() == {queue.name: 1, backfill: 0}


def test_logs_are_json_without_emails_or_phones(post_delivery, crm, run_worker, capfd):
    from integration import logs

    logs.configure("INFO")
    post_delivery(BURST)
    run_worker()
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]

    assert lines and all({"timestamp", "level", "logger", "message"} <= set(line) for line in lines)
    text = json.dumps(lines)
    assert "@brightloop.io" not in text and "555 0143" not in text
    assert any(line.get("job_id") for line in lines)


def test_an_older_batch_never_overwrites_a_newer_events_score(settings, crm, queue, redis, hubspot):
    client = create_app(settings).test_client()
    for event_id in (8001, 8002):  # each event is batched (as a collector does) before the next comes
        body = json.dumps([change(int(VP), event_id)]).encode()
        client.post(WEBHOOK_URL, data=body, headers=hubspot_headers(WEBHOOK_URL, body, APP_SECRET))
        pending.drain(redis, "hubspot", PORTAL_ID)
        pending.take_batch(queue, "hubspot", PORTAL_ID, 1)
        time.sleep(0.01)

    SimpleWorker([queue], connection=redis).work(burst=True)
    finished = [queue.fetch_job(i) for i in queue.finished_job_registry.get_job_ids()]
    older, newer = sorted(
        (job for job in finished if job.func_name == "workers.batch.score_batch"), key=lambda j: j.enqueued_at
    )

    assert [r["outcome"] for r in older.return_value()] == ["superseded"]
    assert [r["outcome"] for r in newer.return_value()] == ["written"]
    assert len(hubspot.writes) == 1


def test_a_batch_whose_write_waited_while_a_newer_batch_wrote_has_its_lead_scored_once_more(
    post_delivery, crm, queue, redis, run_worker, hubspot, monkeypatch
):
    """Batch A passes its superseded check, then its write waits (the rate limiter, a retry); batch
    C, handed the lead's next change meanwhile, writes first. A's older score then lands last, so
    the lead is scored once more after it, and the CRM ends on the newest state."""
    post_delivery("contact.creation__single")
    write, overtook = HubSpotCRM.write_many, []

    def write_after_a_newer_batch(adapter, items):
        if not overtook:
            overtook.append("C")
            hubspot.contacts[VP]["properties"]["hs_lead_status"] = "UNQUALIFIED"  # a rep's change...
            event = LeadEvent(crm="hubspot", account_id=PORTAL_ID, lead_id=VP, event_ids=("newer",),
                              kinds=("property_change",), occurred_at=datetime.now(UTC),
                              accepted_at=datetime.now(UTC))  # fmt: skip
            with redis.pipeline(transaction=True) as pipe:
                pending.record(pipe, [event])
                pipe.execute()
            newer = pending.take_batch(queue, "hubspot", PORTAL_ID, 1)  # ...handed to batch C
            queue.remove(newer)
            overtook.append(batch._score_batch(jobs.context(), *newer.args))  # C writes while A's waits
        return write(adapter, items)

    monkeypatch.setattr(HubSpotCRM, "write_many", write_after_a_newer_batch)
    run_worker()

    [_, [newer_result]] = overtook
    assert newer_result["outcome"] == "written"
    assert hubspot.contact_properties(VP)["leadscore_tier"] == "D"  # the newest state: unqualified
    assert [contact for contact, _ in hubspot.writes] == [VP, VP, VP]  # C, then A's older score, then again


def _hand_off(queue, redis, accepted_at: datetime, lead_id: str = VP) -> tuple[Job, int]:
    """One event of the lead, handed to a batch of its own: the job and the lead's hand-off mark."""
    event = LeadEvent(
        crm="hubspot", account_id=PORTAL_ID, lead_id=lead_id, event_ids=(f"{accepted_at}",),
        kinds=("property_change",), occurred_at=accepted_at, accepted_at=accepted_at,
    )  # fmt: skip
    with redis.pipeline(transaction=True) as pipe:
        pending.record(pipe, [event])
        pipe.execute()
    job = pending.take_batch(queue, "hubspot", PORTAL_ID, 1)
    marks, _, _ = pending.handoff_keys("hubspot", PORTAL_ID)
    return job, int(redis.hget(marks, lead_id))


def test_a_later_hand_off_supersedes_an_earlier_one_whatever_the_web_hosts_clocks_say(crm, queue, redis,
                                                                                       hubspot):  # fmt: skip
    def hand_off(accepted_at: datetime):
        return _hand_off(queue, redis, accepted_at)

    now = datetime.now(UTC)
    older, first_mark = hand_off(now + timedelta(seconds=3))  # web host A, its clock 3 s fast
    newer, second_mark = hand_off(now + timedelta(seconds=1))  # web host B, right, and a real 2 s later
    SimpleWorker([queue], connection=redis).work(burst=True)

    assert first_mark < second_mark  # the mark rose, though the newer event's stamp is the older
    assert [r["outcome"] for r in queue.fetch_job(older.id).return_value()] == ["superseded"]
    assert [r["outcome"] for r in queue.fetch_job(newer.id).return_value()] == ["written"]
    assert len(hubspot.writes) == 1


def test_a_batch_handed_off_by_an_older_release_is_still_superseded(crm, queue, redis, hubspot):
    """Older releases kept the marks in another hash: batches they queued are told apart after an upgrade."""
    now = datetime.now(UTC)
    older, _ = _hand_off(queue, redis, now)
    newer, _ = _hand_off(queue, redis, now + timedelta(seconds=1))
    marks, marked_at, marks_before = pending.handoff_keys("hubspot", PORTAL_ID)
    redis.rename(marks, marks_before)  # as the release before kept them
    redis.delete(marked_at)
    SimpleWorker([queue], connection=redis).work(burst=True)

    assert [r["outcome"] for r in queue.fetch_job(older.id).return_value()] == ["superseded"]
    assert [r["outcome"] for r in queue.fetch_job(newer.id).return_value()] == ["written"]
    assert len(hubspot.writes) == 1


def test_a_rescore_leaves_a_lead_to_a_batch_an_older_release_handed_it_to(queue, redis):
    """A webhook's batch queued before the upgrade is not superseded by a rescore queued after it."""
    _, _, marks_before = pending.handoff_keys("hubspot", PORTAL_ID)
    redis.hset(marks_before, VP, 1)  # the webhook's batch, as the release before marked it
    redis.set(pending.HANDOFFS, 1)
    now = datetime.now(UTC)
    rescore = LeadEvent(
        crm="hubspot", account_id=PORTAL_ID, lead_id=VP, event_ids=("rescore",), kinds=(RESCORE,),
        occurred_at=now, accepted_at=now,
    )  # fmt: skip
    with redis.pipeline(transaction=True) as pipe:
        pending.record(pipe, [rescore])
        pipe.execute()

    pending.take_batch(queue, "hubspot", PORTAL_ID, 1)

    assert pending.newest_handoffs(redis, "hubspot", PORTAL_ID, [VP]) == [1]


def test_a_hand_off_forgets_marks_older_than_any_batch_still_waiting(crm, queue, redis):
    """A lead handed off once keeps no mark for good: the account's next hand-off trims it."""
    marks, marked_at, _ = pending.handoff_keys("hubspot", PORTAL_ID)
    lapsed, waiting = "74300000201", "74300000202"
    redis.hset(marks, mapping={lapsed: 1, waiting: 2})
    handed_at = time.time() - pending.HANDOFF_TTL_S
    redis.zadd(marked_at, {lapsed: handed_at - 60, waiting: handed_at + 60})

    _hand_off(queue, redis, datetime.now(UTC))

    assert (
        sorted(redis.hkeys(marks))
        == sorted(redis.zrange(marked_at, 0, -1))
        == [w.encode() for w in (VP, waiting)]
    )
    assert 0 < redis.ttl(marked_at) <= pending.HANDOFF_TTL_S


def _put_off_until(queue) -> float:
    """When the one batch put off (not failed) is due, in epoch seconds."""
    assert queue.failed_job_registry.count == 0
    [deferred] = queue.scheduled_job_registry.get_job_ids()
    return queue.scheduled_job_registry.get_scheduled_time(deferred).timestamp()


def test_daily_limit_defers_the_batch_instead_of_failing_it(post_delivery, crm, run_worker, hubspot, queue):
    hubspot.daily_limit_reached = True
    post_delivery("contact.creation__single")
    [result] = run_worker()

    assert result["outcome"] == "deferred"
    due = _put_off_until(queue)
    assert 3000 < due - time.time() <= 3600


def test_a_portal_moving_between_data_centres_puts_the_batch_off_as_long_as_hubspot_says(
    post_delivery, crm, run_worker, hubspot, queue, redis
):
    """477 "Migration in Progress" comes with a Retry-After of up to a day: no retry is spent on it,
    and no worker spends a call to learn it again."""
    hubspot.migrating_retry_after_s = 7200
    post_delivery("contact.creation__single")
    before = len(hubspot._authenticated)
    [result] = run_worker()

    assert result["outcome"] == "deferred"
    due = _put_off_until(queue)
    assert 7100 < due - time.time() <= 7200
    assert 7100_000 < redis.pttl(RateLimiter(redis, f"hubspot:{PORTAL_ID}", 100).pause_key) <= 7200_000
    assert len(hubspot._authenticated[before:]) == 1  # the one that learned of the move (here, which portal)


def test_a_portal_move_said_to_end_at_once_still_puts_the_batch_off_a_minute(
    post_delivery, crm, run_worker, hubspot, queue
):
    """Retry-After: 0 on a 477 would requeue the batch at once, again and again, while the move lasts."""
    hubspot.migrating_retry_after_s = 0
    post_delivery("contact.creation__single")
    [result] = run_worker()

    due = _put_off_until(queue)
    assert result["outcome"] == "deferred" and 50 < due - time.time() <= 60


def test_a_call_hubspot_answers_locked_is_made_again_after_the_lock_s_2_seconds(
    post_delivery, crm, run_worker, hubspot, queue
):
    hubspot.locked_calls = 1
    post_delivery("contact.creation__single")
    [result] = run_worker()

    assert result["outcome"] == "written"
    assert hubspot.locked_calls == 0 and queue.failed_job_registry.count == 0


def test_a_pause_that_cannot_be_shared_holds_its_caller_seconds_not_the_hour_asked(monkeypatch):
    """Redis unreachable: a daily limit's hour, or a portal move's day, asleep in a work horse would
    outlast its job's timeout; the batch is put off for that instead."""
    slept = []
    monkeypatch.setattr(ratelimit.time, "sleep", slept.append)
    unreachable = Redis(port=free_port(), socket_connect_timeout=0.2, retry=RedisRetry(NoBackoff(), 0))

    RateLimiter(unreachable, f"hubspot:{PORTAL_ID}", 100).pause(3600)

    assert slept == [ratelimit.MAX_UNSHARED_PAUSE_S] == [2.0]


def test_a_batch_put_off_for_an_outage_is_still_guarded_and_its_repeats_still_dropped():
    """While a batch waits out a CRM outage, the marks that tell a newer hand-off of its leads, and
    the CRM's redeliveries of its events, must outlive the wait."""
    assert batch.OUTAGE_GIVE_UP_S < pending.HANDOFF_TTL_S and batch.OUTAGE_GIVE_UP_S < pending.SEEN_WINDOW_S
