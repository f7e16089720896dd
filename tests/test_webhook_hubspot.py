"""`POST /webhooks/hubspot`: each fixture delivery and each bad input, with exact outcomes."""

from __future__ import annotations

import json
import logging
import socket
import time
from contextlib import ExitStack

import pytest
from redis import Redis
from rq import Queue

from integration import metrics, pending
from integration.app import create_app
from integration.cli import main
from integration.emulators import free_port, start_redis
from integration.queue import version_risk
from integration.replay import hubspot_headers, load_delivery
from integration.settings import load_settings
from tests.conftest import (
    APP_SECRET,
    FIXTURES,
    PORTAL_ID,
    WEBHOOK_URL,
    _clear_caches,
    fixture_json,
    framed,
    pending_events,
)


def queued_events(queue: Queue) -> list[dict]:
    return pending_events(queue.connection, "hubspot", PORTAL_ID)


def summary(response) -> dict:
    return response.get_json()


@pytest.mark.parametrize(
    ("fixture", "expected", "leads"),
    [
        (
            "contact.creation__single",
            {"received": 1, "queued": 1, "ignored": 0, "unsupported": 0},
            ["74300000101"],
        ),
        (
            "contact.propertyChange__lead_status",
            {"received": 1, "queued": 1, "ignored": 0, "unsupported": 0},
            ["74300000103"],
        ),
        (
            "contact.propertyChange__several_for_one_contact",
            {"received": 3, "queued": 3, "ignored": 0, "unsupported": 0},
            ["74300000104"],
        ),
        (
            "contact.propertyChange__own_output_only",
            {"received": 2, "queued": 0, "ignored": 2, "unsupported": 0},
            [],
        ),
        (  # a rep typed over the score and tier: read, and leadscore's put back
            "contact.propertyChange__rep_edited_score",
            {"received": 2, "queued": 2, "ignored": 0, "unsupported": 0},
            ["74300000101"],
        ),
        (
            "contact.propertyChange__integration_echo",
            {"received": 3, "queued": 0, "ignored": 3, "unsupported": 0},
            [],
        ),
        (
            "contact.propertyChange__other_integration",
            {"received": 1, "queued": 1, "ignored": 0, "unsupported": 0},
            ["74300000106"],
        ),
        (
            "object.creation__contact",
            {"received": 1, "queued": 1, "ignored": 0, "unsupported": 0},
            ["74300000107"],
        ),
        (
            "object.propertyChange__contact",
            {"received": 1, "queued": 1, "ignored": 0, "unsupported": 0},
            ["74300000108"],
        ),
        (
            "object.propertyChange__deal",  # a stage change: the worker reads whether it is won
            {"received": 1, "queued": 1, "ignored": 0, "unsupported": 0},
            ["deal:18452000031"],
        ),
        (
            "deal.propertyChange__closed_won",
            {"received": 1, "queued": 1, "ignored": 0, "unsupported": 0},
            ["deal:93000000001"],  # its own key: deal and contact ids are separate spaces
        ),
        (
            "deal.propertyChange__amount",  # no outcome in it
            {"received": 1, "queued": 0, "ignored": 1, "unsupported": 0},
            [],
        ),
        (
            "contact.deletion__single",
            {"received": 1, "queued": 0, "ignored": 1, "unsupported": 0},
            [],
        ),
        (
            "contact.privacyDeletion__single",  # erased by the worker, not scored
            {"received": 1, "queued": 1, "ignored": 0, "unsupported": 0},
            ["74300000101"],
        ),
        (
            "contact.merge__two_contacts",  # the contact that remains, under the new id HubSpot gave it
            {"received": 1, "queued": 1, "ignored": 0, "unsupported": 0},
            ["74300000131"],
        ),
        (
            "mixed__creation_and_unknown",
            {"received": 2, "queued": 1, "ignored": 0, "unsupported": 1},
            ["74300000110"],
        ),
        (
            "contact.propertyChange__demo_changes",
            {"received": 7, "queued": 6, "ignored": 1, "unsupported": 0},
            ["74300000123", "74300000101", "74300000122", "74300000104", "74300000124"],
        ),
        (
            "contact.propertyChange__demo_rep_edits",  # two changes to one contact: one lead queued
            {"received": 4, "queued": 4, "ignored": 0, "unsupported": 0},
            ["74300000106", "74300000112", "74300000117"],
        ),
    ],
)
def test_fixture_delivery(post_delivery, queue, fixture, expected, leads):
    response = post_delivery(fixture)

    assert response.status_code == 200
    assert summary(response) == expected
    assert sorted(event["lead_id"] for event in queued_events(queue)) == sorted(leads)
    assert all(event["account_id"] == PORTAL_ID for event in queued_events(queue))


def test_contact_propertyChange__several_for_one_contact_is_one_job(post_delivery, queue):
    post_delivery("contact.propertyChange__several_for_one_contact")

    [event] = queued_events(queue)
    assert event["crm"] == "hubspot"
    assert len(event["event_ids"]) == 3
    assert event["kinds"] == ["property_change"]
    assert event["changed_fields"] == ["jobtitle", "numemployees", "hs_lead_status"]


def test_contact_creation__single_duplicate_delivery_enqueues_nothing_new(post_delivery, queue):
    first = post_delivery("contact.creation__single")
    pending.drain(queue.connection, "hubspot", PORTAL_ID)  # the collector takes the first in
    second = post_delivery("contact.creation__single")

    assert summary(first) == summary(second) == {"received": 1, "queued": 1, "ignored": 0, "unsupported": 0}
    assert [e["lead_id"] for e in queued_events(queue)] == ["74300000101"]
    assert pending.depth(queue.connection) == 1
    assert metrics.counter_value(queue.connection, "events_deduplicated_total", crm="hubspot") == 1


def test_a_privacy_deletion_waiting_to_be_erased_is_kept_when_a_late_change_of_the_contact_follows(
    post_delivery, queue
):
    """HubSpot does not promise order: a retried older change must not replace the erasure."""
    post_delivery("contact.privacyDeletion__single")
    pending.drain(queue.connection, "hubspot", PORTAL_ID)
    [change] = json.loads(load_delivery(FIXTURES / "hubspot" / "contact.creation__single.json"))

    post_delivery(
        json.dumps([{**change, "eventId": 77, "occurredAt": change["occurredAt"] - 60_000}]).encode()
    )

    [lead] = queued_events(queue)
    assert (lead["lead_id"], lead["kinds"]) == ("74300000101", ["erase", "creation"])


def test_a_change_of_a_property_named_forced_waiting_is_replaced_as_any_change_is(post_delivery, queue):
    """Only an erasure or a forced rescore among a waiting event's kinds keeps it: not a custom property
    that happens to be named so, whose events would pile up in it."""
    [change] = json.loads(load_delivery(FIXTURES / "hubspot" / "contact.creation__single.json"))
    post_delivery(json.dumps([{**change, "eventId": 71, "subscriptionType": "contact.propertyChange",
                               "propertyName": "forced", "propertyValue": "yes"}]).encode())  # fmt: skip
    pending.drain(queue.connection, "hubspot", PORTAL_ID)
    post_delivery(json.dumps([{**change, "eventId": 72}]).encode())

    [lead] = queued_events(queue)
    assert (lead["kinds"], lead["changed_fields"]) == (["creation"], [])


def test_contact_privacyDeletion__single_is_logged_once_queued(post_delivery, caplog):
    """Until a worker erases the contact, the deletion is only in Redis: the log is its record outside
    it, should Redis be lost meanwhile (README, Disaster recovery)."""
    with caplog.at_level(logging.INFO, logger="integration.queue"):
        post_delivery("contact.privacyDeletion__single")
        post_delivery("contact.creation__single")  # a change: not logged

    [event] = json.loads(load_delivery(FIXTURES / "hubspot" / "contact.privacyDeletion__single.json"))
    said = [r.getMessage() for r in caplog.records if r.name == "integration.queue"]
    assert said == [
        f"hubspot privacy deletion of {PORTAL_ID}:{event['objectId']} queued (event "
        f"{event['eventId']}@{event['occurredAt']})"
    ]


def test_mixed__creation_and_unknown_logs_the_unknown_event(post_delivery, caplog):
    with caplog.at_level(logging.WARNING, logger="integration.hubspot.webhook"):
        post_delivery("mixed__creation_and_unknown")

    assert "unsupported subscription type 'contact.sentimentChange'" in caplog.text


def test_contact_propertyChange__integration_echo_is_counted_not_logged_at_info(post_delivery, caplog):
    """An echo comes of every write: a line each at INFO was most of the web's log."""
    with caplog.at_level(logging.DEBUG, logger="integration.queue"):
        post_delivery("contact.propertyChange__integration_echo")

    said = [(r.levelno, r.getMessage()) for r in caplog.records if "not scored" in r.getMessage()]
    assert len(said) == 3 and {level for level, _ in said} == {logging.DEBUG}
    caplog.clear()
    company = [{**fixture_json("hubspot/object.creation__contact.json")[0], "objectTypeId": "0-2"}]
    with caplog.at_level(logging.DEBUG, logger="integration.queue"):  # a subscription set up wrong, say
        post_delivery(json.dumps(company).encode())
    [(level, message)] = [
        (r.levelno, r.getMessage()) for r in caplog.records if "not scored" in r.getMessage()
    ]
    assert level == logging.INFO and "object type 0-2 is not a contact" in message


# ---- bad input: signatures (401, nothing enqueued)


def signed_single(url: str = WEBHOOK_URL, **overrides) -> tuple[bytes, dict]:
    body = load_delivery(FIXTURES / "hubspot" / "contact.creation__single.json")
    return body, {**hubspot_headers(url, body, APP_SECRET), **overrides}


@pytest.mark.parametrize(
    ("dyno", "hops", "status"), [("web.1", None, 200), ("web.1", "0", 401), ("", None, 401)]
)
def test_on_a_heroku_dyno_the_https_url_hubspot_signed_is_read_through_herokus_router(
    env, monkeypatch, queue, dyno, hops, status
):
    """Heroku's router ends TLS and forwards plain HTTP with X-Forwarded-Proto: https."""
    monkeypatch.setenv("DYNO", dyno)
    monkeypatch.setenv("DATABASE_URL", "postgresql://leadscore@db.internal/leadscore")  # as Heroku sets it
    if hops is not None:
        monkeypatch.setenv("PROXY_FIX_HOPS", hops)
    _clear_caches()
    body, headers = signed_single("https://leadscore.example.com/webhooks/hubspot")

    answer = create_app().test_client().post(
        "/webhooks/hubspot", data=body, base_url="http://leadscore.example.com",
        headers={**headers, "X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"},
    )  # fmt: skip

    assert answer.status_code == status
    assert len(pending_events(queue.connection, "hubspot", PORTAL_ID)) == (1 if status == 200 else 0)


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            {"X-HubSpot-Signature-v3": ""},
            "missing X-HubSpot-Signature-v3 header: only HubSpot's v3-signed deliveries are accepted",
        ),
        (
            {"X-HubSpot-Request-Timestamp": ""},
            "missing X-HubSpot-Request-Timestamp header (epoch milliseconds)",
        ),
        (
            {"X-HubSpot-Signature-v3": "bm90IHRoZSBzaWduYXR1cmU="},
            "X-HubSpot-Signature-v3 does not match: check that HUBSPOT_APP_SECRET is this app's client "
            "secret and that http://localhost/webhooks/hubspot is the exact URL HubSpot posts to "
            "(set PUBLIC_BASE_URL behind a proxy)",
        ),
        (
            {"X-HubSpot-Signature-v3": "sïgnature"},
            "X-HubSpot-Signature-v3 does not match: check that HUBSPOT_APP_SECRET is this app's client "
            "secret and that http://localhost/webhooks/hubspot is the exact URL HubSpot posts to "
            "(set PUBLIC_BASE_URL behind a proxy)",
        ),
        (
            {"X-HubSpot-Request-Timestamp": "not-a-number"},
            "X-HubSpot-Request-Timestamp 'not-a-number' is not within 5 minutes of now: "
            "a replayed delivery or a wrong clock",
        ),
    ],
)
def test_bad_signature_headers_are_refused(client, queue, headers, message):
    body, signed = signed_single(**headers)
    response = client.post(WEBHOOK_URL, data=body, headers=signed)

    assert response.status_code == 401
    assert response.get_json() == {"error": message}
    assert pending.depth(queue.connection) == 0


@pytest.mark.parametrize("stamp", ["1" * 400, "9" * 5000])
def test_absurd_timestamps_are_refused_not_crashed(client, queue, stamp):
    body, headers = signed_single(**{"X-HubSpot-Request-Timestamp": stamp})

    response = client.post(WEBHOOK_URL, data=body, headers=headers)

    assert response.status_code == 401
    assert pending.depth(queue.connection) == 0


@pytest.mark.parametrize("offset_s", [-360, +360, 10**9])
def test_stale_or_future_signature_is_refused_even_when_correctly_signed(client, queue, offset_s):
    body = load_delivery(FIXTURES / "hubspot" / "contact.creation__single.json")
    when = int((time.time() + offset_s) * 1000)
    headers = hubspot_headers(WEBHOOK_URL, body, APP_SECRET, timestamp_ms=when)

    response = client.post(WEBHOOK_URL, data=body, headers=headers)

    assert response.status_code == 401
    assert response.get_json() == {
        "error": f"X-HubSpot-Request-Timestamp '{when}' is not within 5 minutes of now: "
        "a replayed delivery or a wrong clock"
    }
    assert pending.depth(queue.connection) == 0
    refused = metrics.counter_value(queue.connection, "deliveries_refused_total", crm="hubspot", status="401")
    assert refused == 1  # HubSpot sends no 4xx delivery again: a dashboard shows what was lost


def test_body_changed_after_signing_is_refused(client, queue):
    body, headers = signed_single()
    tampered = body.replace(b"74300000101", b"74300000102")

    response = client.post(WEBHOOK_URL, data=tampered, headers=headers)

    assert response.status_code == 401
    assert pending.depth(queue.connection) == 0


def test_wrong_secret_is_refused(client, queue):
    body = load_delivery(FIXTURES / "hubspot" / "contact.creation__single.json")
    headers = hubspot_headers(WEBHOOK_URL, body, "someone-elses-secret")

    assert client.post(WEBHOOK_URL, data=body, headers=headers).status_code == 401
    assert pending.depth(queue.connection) == 0


def test_signature_covers_the_public_url_behind_a_proxy(settings, queue):
    public = "https://leadscore.example.com/webhooks/hubspot?portal=48213377"
    app = create_app(settings.model_copy(update={"public_base_url": "https://leadscore.example.com"}))
    client = app.test_client()
    body, headers = signed_single(url=public)

    accepted = client.post("/webhooks/hubspot?portal=48213377", data=body, headers=headers)
    body, internal_headers = signed_single(url="http://localhost/webhooks/hubspot?portal=48213377")
    refused = client.post("/webhooks/hubspot?portal=48213377", data=body, headers=internal_headers)

    assert accepted.status_code == 200
    assert refused.status_code == 401
    assert pending.depth(queue.connection) == 1


def test_signature_covers_a_path_prefix_behind_a_proxy(settings, queue):
    app = create_app(settings.model_copy(update={"public_base_url": "https://example.com"}))
    body, headers = signed_single(url="https://example.com/leadscore/webhooks/hubspot")

    response = app.test_client().post(
        "/webhooks/hubspot", data=body, headers=headers, base_url="http://internal:8000/leadscore"
    )

    assert response.status_code == 200
    assert pending.depth(queue.connection) == 1


def test_signature_uses_hubspots_decoded_uri(client, queue):
    url = "http://localhost/webhooks/hubspot?source=a%3Ab%40c"
    body = load_delivery(FIXTURES / "hubspot" / "contact.creation__single.json")
    headers = hubspot_headers("http://localhost/webhooks/hubspot?source=a:b@c", body, APP_SECRET)

    assert client.post(url, data=body, headers=headers).status_code == 200


# ---- bad input: body shape (400, nothing enqueued)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            b'{"eventId": 1}',
            "expected a JSON array of HubSpot webhook events (objects with eventId, subscriptionType, "
            "portalId, objectId, …); at body: Input should be a valid array",
        ),
        (
            b"not json at all",
            "expected a JSON array of HubSpot webhook events (objects with eventId, subscriptionType, "
            "portalId, objectId, …); at body: Invalid JSON: expected ident at line 1 column 2",
        ),
        (b"[]", "expected a JSON array of 1 to 100 HubSpot webhook events, got []"),
        (
            b'[{"eventId": 1, "subscriptionType": "contact.creation"}]',
            "expected a JSON array of HubSpot webhook events (objects with eventId, subscriptionType, "
            "portalId, objectId, …); at 0.subscriptionId: Field required",
        ),
        (
            b'[{"eventId": 1, "objectId": 743}]',
            "expected a JSON array of HubSpot webhook events (objects with eventId, subscriptionType, "
            "portalId, objectId, …); at 0.subscriptionType: Field required",
        ),
        (
            b'["contact.creation"]',
            "expected a JSON array of HubSpot webhook events (objects with eventId, subscriptionType, "
            "portalId, objectId, …); at 0: Input should be an object",
        ),
    ],
)
def test_body_that_is_not_an_event_array_is_refused(post_delivery, queue, body, message):
    response = post_delivery(body)

    assert response.status_code == 400
    assert response.get_json() == {"error": message}
    assert pending.depth(queue.connection) == 0


def test_an_unknown_event_of_another_shape_is_acknowledged_beside_a_handled_one(post_delivery, queue):
    """Whatever a future event type carries, it is logged and acknowledged; the delivery's other
    events are queued, not refused with it."""
    created, unknown = json.loads(load_delivery(FIXTURES / "hubspot" / "mixed__creation_and_unknown.json"))
    del unknown["subscriptionId"]
    unknown.update(objectId="a string", propertyValue=5, attemptNumber=None)

    response = post_delivery(json.dumps([created, unknown]).encode())

    assert summary(response) == {"received": 2, "queued": 1, "ignored": 0, "unsupported": 1}
    assert [e["lead_id"] for e in queued_events(queue)] == [str(created["objectId"])]


@pytest.mark.parametrize(
    ("field", "value"),
    [("objectId", True), ("objectId", "74300000110"), ("objectId", 74300000110.0), ("objectId", 0),
     ("objectId", -5), ("portalId", True), ("eventId", "1547125269"), ("occurredAt", 1795251704110.5)],
)  # fmt: skip
def test_an_id_that_is_not_a_whole_number_above_zero_as_sent_is_refused(post_delivery, queue, field, value):
    """Refused alone: HubSpot sends no 4xx'd delivery again, so the events beside it are queued first."""
    [created, _] = json.loads(load_delivery(FIXTURES / "hubspot" / "mixed__creation_and_unknown.json"))

    response = post_delivery(json.dumps([{**created, field: value}, created]).encode())

    assert response.status_code == 400
    error = response.get_json()["error"]
    assert error.startswith(
        "expected a JSON array of HubSpot webhook events (objects with eventId, subscriptionType, "
        f"portalId, objectId, …); at 0.{field}: Input should be "
    )
    assert error.endswith("; the delivery's 1 other event was queued")
    assert [e["lead_id"] for e in queued_events(queue)] == [str(created["objectId"])]
    labels = {"crm": "hubspot", "reason": "malformed"}
    assert metrics.counter_value(queue.connection, "events_ignored_total", **labels) == 1


def test_mixed__creation_and_unknown_with_two_malformed_creations_queues_the_rest(post_delivery, queue):
    created, unknown = json.loads(load_delivery(FIXTURES / "hubspot" / "mixed__creation_and_unknown.json"))
    second = {**created, "eventId": created["eventId"] + 1, "objectId": created["objectId"] + 1}
    malformed = [{**created, "sourceId": 7}, {**created, "occurredAt": "yesterday"}]

    response = post_delivery(json.dumps([created, *malformed, unknown, second]).encode())

    assert (response.status_code, response.get_json()) == (400, {"error": (
        "expected a JSON array of HubSpot webhook events (objects with eventId, subscriptionType, "
        "portalId, objectId, …); at 1.sourceId: Input should be a valid string (and 1 more such events); "
        "the delivery's 2 other events were queued"
    )})  # fmt: skip
    assert [e["lead_id"] for e in queued_events(queue)] == [str(created["objectId"]), str(second["objectId"])]


@pytest.mark.parametrize("occurred_at", [10**17, -1])
def test_out_of_range_occurred_at_is_refused(post_delivery, queue, occurred_at):
    [event] = json.loads(load_delivery(FIXTURES / "hubspot" / "contact.creation__single.json"))

    response = post_delivery(json.dumps([{**event, "occurredAt": occurred_at}]).encode())

    assert response.status_code == 400
    assert "at 0.occurredAt: Input should be" in response.get_json()["error"]
    assert pending.depth(queue.connection) == 0


def test_same_event_id_at_another_time_is_a_new_event(post_delivery, queue):
    [event] = json.loads(load_delivery(FIXTURES / "hubspot" / "contact.creation__single.json"))
    later = {**event, "occurredAt": event["occurredAt"] + 1}

    post_delivery(json.dumps([event]).encode())
    response = post_delivery(json.dumps([later]).encode())

    assert summary(response)["queued"] == 1
    [lead] = queued_events(queue)  # two events for one contact: coalesced, neither a duplicate
    assert lead["event_ids"] == [f"{e['eventId']}@{e['occurredAt']}" for e in (event, later)]
    assert metrics.counter_value(queue.connection, "events_deduplicated_total", crm="hubspot") == 0


def test_more_than_100_events_is_refused(post_delivery, queue):
    [event] = json.loads(load_delivery(FIXTURES / "hubspot" / "contact.creation__single.json"))
    body = json.dumps([{**event, "eventId": i} for i in range(1, 102)]).encode()

    response = post_delivery(body)

    assert response.status_code == 400
    assert response.get_json() == {"error": "expected at most 100 events in one delivery, got 101"}
    assert pending.depth(queue.connection) == 0


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_body_over_the_size_limit_is_refused(settings, queue, framing):
    """Chunked too: there Werkzeug stops reading at the limit, and a body cut short once got a 401."""
    body, headers = signed_single()
    exactly = create_app(settings.model_copy(update={"max_body_bytes": len(body)})).test_client()
    assert exactly.post(WEBHOOK_URL, headers=headers, **framed(body, framing)).status_code == 200
    padded = body + b" " * 200
    client = create_app(settings.model_copy(update={"max_body_bytes": 200})).test_client()

    response = client.post(WEBHOOK_URL, headers=hubspot_headers(WEBHOOK_URL, padded, APP_SECRET),
                           **framed(padded, framing))  # fmt: skip

    assert response.status_code == 413  # as Salesforce's routes answer
    assert response.get_json() == {"error": "body exceeds the 200-byte limit (MAX_BODY_BYTES)"}
    assert pending.depth(queue.connection) == 1  # the first delivery's event alone


# ---- Redis unreachable (503: HubSpot retries), configuration missing


@pytest.fixture
def app_without_redis(settings):
    return create_app(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))


def test_redis_unreachable_answers_503_never_2xx(app_without_redis):
    body, headers = signed_single()

    response = app_without_redis.test_client().post(WEBHOOK_URL, data=body, headers=headers)

    assert response.status_code == 503
    assert response.get_json() == {
        "error": "the queue (Redis) is unavailable, nothing was accepted; retry later"
    }


def test_redis_that_takes_the_delivery_but_never_answers_gets_503_saying_it_may_have_been_taken(settings):
    """As a stalled Redis does (paused, swapping): it may apply the transaction once it wakes, so the
    answer must not say nothing was accepted; HubSpot's retry is recognised as a repeat."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        host, port = silent.getsockname()
        app = create_app(settings.model_copy(update={"redis_url": f"redis://{host}:{port}/0"}))
        body, headers = signed_single()

        response = app.test_client().post(WEBHOOK_URL, data=body, headers=headers)

    assert response.status_code == 503
    assert response.get_json() == {
        "error": "the queue (Redis) did not answer in time, so the delivery may or may not have been "
        "taken; retry it: a repeated event is recognised and dropped"
    }


def test_healthz_reports_redis(client, app_without_redis):
    healthy = client.get("/healthz")
    down = app_without_redis.test_client().get("/healthz")

    assert (healthy.status_code, healthy.get_json()) == (
        200,
        {"status": "ok", "redis": "ok", "redis_risks": []},
    )
    assert down.status_code == 503
    assert down.get_json()["redis"] == "unreachable (see the web log)"  # not Redis's host and port


def test_healthz_is_unhealthy_when_redis_answers_but_refuses_the_writes_a_webhook_needs(settings, caplog):
    with ExitStack() as stack:
        url = start_redis(stack, "--maxmemory-policy", "noeviction")
        Redis.from_url(url).config_set("maxmemory", "1")  # out of memory, as a full Redis is
        client = create_app(settings.model_copy(update={"redis_url": url})).test_client()
        health = client.get("/healthz")
        body, headers = signed_single()
        delivery = client.post("/webhooks/hubspot", data=body, headers=headers)

    assert (health.status_code, health.get_json()) == (
        503,
        {"status": "unavailable", "redis": "refusing writes (see the web log)"},
    )
    assert delivery.status_code == 503  # what the health check foretold
    assert "healthz: Redis refuses writes: command not allowed when used memory > 'maxmemory'" in caplog.text


def test_metrics_need_the_bearer_token_when_metrics_token_is_set(settings, crm):
    client = create_app(settings.model_copy(update={"metrics_token": "m-3tr1cs"})).test_client()

    def status(**headers) -> int:
        return client.get("/metrics", headers=headers).status_code

    assert status() == 401
    assert status(Authorization="Bearer wrong") == 401
    assert status(Authorization="Basic m-3tr1cs") == 401
    assert status(Authorization="Bearer m-3tr1cs") == 200
    assert client.get("/healthz").status_code == 200  # a platform's health check has no token


def test_healthz_and_the_worker_name_redis_settings_that_can_lose_acknowledged_events(
    settings, crm, monkeypatch, caplog
):
    with ExitStack() as stack:
        url = start_redis(stack, "--maxmemory", "100mb", "--maxmemory-policy", "allkeys-lru")  # and no AOF
        risky = create_app(settings.model_copy(update={"redis_url": url})).test_client().get("/healthz")
        monkeypatch.setenv("REDIS_URL", url)
        _clear_caches()
        assert main(["worker", "--burst"]) == 0
        Redis.from_url(url).acl_setuser("web", enabled=True, passwords=["+pw"], keys=["*"],
                                        commands=["+@all", "-info"])  # fmt: skip
        limited = url.replace("redis://", "redis://web:pw@")
        unknown = create_app(settings.model_copy(update={"redis_url": limited})).test_client().get("/healthz")

    risks = [
        "maxmemory-policy is allkeys-lru: when memory runs short Redis evicts queued events; set it to "
        "noeviction",
        "appendonly is off: a Redis restart loses the events acknowledged since its last snapshot; set "
        "appendonly yes",
    ]
    assert (risky.status_code, risky.get_json()["redis_risks"]) == (200, risks)
    worker_warned = [
        r.getMessage() for r in caplog.records if r.name == "leadscore.worker" and r.levelname == "WARNING"
    ]
    assert worker_warned == [f"Redis: {risk}" for risk in risks]
    assert (unknown.status_code, unknown.get_json()["redis_risks"]) == (200, [
        "its persistence and eviction settings are unknown (INFO refused: this user has no permissions to "
        "run the 'info' command)"
    ])  # fmt: skip


@pytest.mark.parametrize("version", ["6.0.16", "5.0.7"])
def test_a_redis_older_than_6_2_is_named_a_risk_to_jobs_a_killed_worker_took(version):
    assert version_risk(version) == (
        f"version {version} is older than 6.2: a worker killed just after taking a job off its queue loses "
        "the job; upgrade Redis"
    )


@pytest.mark.parametrize("version", ["6.2.0", "7.0.15", "", "unknown"])
def test_a_redis_of_6_2_or_later_or_of_no_version_said_is_no_such_risk(version):
    assert version_risk(version) is None


def test_missing_app_secret_answers_503_with_what_to_set(settings, queue):
    client = create_app(settings.model_copy(update={"hubspot_app_secret": ""})).test_client()
    body, headers = signed_single()

    response = client.post(WEBHOOK_URL, data=body, headers=headers)

    assert response.status_code == 503
    assert response.get_json()["error"].startswith("HUBSPOT_APP_SECRET is not set")
    assert pending.depth(queue.connection) == 0


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "HUBSPOT_APP_ID",
            "my-app",
            "HUBSPOT_APP_ID: Value error, HUBSPOT_APP_ID must be the numeric app id",
        ),
        ("REDIS_URL", "localhost:6379", "REDIS_URL: Value error, REDIS_URL must start with redis://"),
        ("LLM_TIMEOUT_S", "-1", "LLM_TIMEOUT_S: Input should be greater than 0"),
        ("HUBSPOT_API_BASE", "not a url", "HUBSPOT_API_BASE: Input should be a valid URL"),
        ("DATABASE_URL", "store.db", "DATABASE_URL: Value error, DATABASE_URL must be an SQLAlchemy URL"),
        (
            "SALESFORCE_DOMAIN",
            "https://acme.my.salesforce.com",
            "SALESFORCE_DOMAIN: Value error, SALESFORCE_DOMAIN is what comes before .salesforce.com: login, "
            "test, or a My Domain such as acme.my or acme--uat.sandbox.my, got 'https://acme.my.salesforce.com'",
        ),
        ("SALESFORCE_DOMAIN", "acme.my.salesforce.com", "SALESFORCE_DOMAIN is what comes before .salesforce"),
        (
            "HUBSPOT_OUTCOME_STAGES",
            '{"1034564913": "won"}',
            "HUBSPOT_OUTCOME_STAGES gives '1034564913' a kind other than 'opportunity' or 'customer' (or "
            "null, to count it no more)",
        ),
        ("HUBSPOT_OUTCOME_STAGES", "1034564913", "HUBSPOT_OUTCOME_STAGES must be a JSON object such as"),
    ],
)
def test_invalid_settings_say_which_variable_to_fix(monkeypatch, variable, value, message):
    from integration.settings import SettingsError

    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("value", "read"),
    [("", "login"), ("test", "test"), ("acme--uat.sandbox.my", "acme--uat.sandbox.my"),
     ("acme-dev-ed.develop.my", "acme-dev-ed.develop.my"), ("acme.scratch.my", "acme.scratch.my")],
)  # fmt: skip
def test_a_salesforce_domain_of_any_my_domain_form_is_taken_and_an_emptied_one_is_login(
    monkeypatch, value, read
):
    monkeypatch.setenv("SALESFORCE_DOMAIN", value)
    assert load_settings().salesforce_domain == read
