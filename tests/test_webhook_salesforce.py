"""`POST /webhooks/salesforce` (Outbound Messages) and `/webhooks/salesforce/events`: each fixture
and each bad input, with exact outcomes."""

from __future__ import annotations

import json
import time
from xml.etree import ElementTree

import pytest

from integration import metrics, pending, signing
from integration.app import create_app
from integration.emulators import free_port
from integration.salesforce import full_id, is_record_id
from tests.conftest import (
    FIXTURES,
    SF_EVENTS_SECRET,
    SF_ORG_ID,
    SF_WEBHOOK_TOKEN,
    fixture_json,
    framed,
    pending_events,
)

ACK = (
    b'<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope '
    b'xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><notificationsResponse '
    b'xmlns="http://soap.sforce.com/2005/09/outbound"><Ack>true</Ack></notificationsResponse>'
    b"</soapenv:Body></soapenv:Envelope>"
)


def queued(queue) -> list[str]:
    return sorted(e["lead_id"] for e in pending_events(queue.connection, "salesforce", SF_ORG_ID))


def fault(response) -> tuple[str, str]:
    """(faultcode, faultstring) of a SOAP fault answer."""
    assert response.content_type == "text/xml; charset=utf-8"
    root = ElementTree.fromstring(response.data)
    found = root.find(".//{http://schemas.xmlsoap.org/soap/envelope/}Fault")
    return found.findtext("faultcode"), found.findtext("faultstring")


# ---- Outbound Messages: fixtures


@pytest.mark.parametrize(
    ("fixture", "leads"),
    [
        ("outbound_message__single", ["00Q5g00000Ls001EAB"]),
        ("outbound_message__demo_burst", [f"00Q5g00000Ls{n:03d}EAB" for n in range(1, 13)]),
        ("outbound_message__several_for_one_lead", ["00Q5g00000Ls002EAB"]),
        ("outbound_message__integration_user", ["00Q5g00000Ls003EAB"]),  # the record as sent, not as changed
        ("outbound_message__contact_object", []),
        ("outbound_message__deleted_lead", ["00Q5g00000Ls999EAB"]),
        ("outbound_message__converted_lead", ["00Q5g00000Ls011EAB"]),
        ("outbound_message__opportunity_won", ["deal:0065g00000Ls011AAB"]),  # is it won? the worker reads
    ],
)
def test_outbound_message_fixture_is_acknowledged(post_outbound, queue, fixture, leads):
    response = post_outbound(fixture)

    assert (response.status_code, response.data) == (200, ACK)
    assert queued(queue) == sorted(leads)


def test_outbound_message__several_for_one_lead_is_one_job(post_outbound, queue):
    post_outbound("outbound_message__several_for_one_lead")

    [event] = pending_events(queue.connection, "salesforce", SF_ORG_ID)
    assert (event["crm"], event["account_id"]) == ("salesforce", SF_ORG_ID)
    assert len(event["event_ids"]) == 3


def test_outbound_message__single_redelivered_enqueues_nothing_new(post_outbound, queue):
    first = post_outbound("outbound_message__single")
    pending.drain(queue.connection, "salesforce", SF_ORG_ID)  # the collector takes the first in
    second = post_outbound("outbound_message__single")

    assert first.data == second.data == ACK
    assert queued(queue) == ["00Q5g00000Ls001EAB"]
    assert metrics.counter_value(queue.connection, "events_deduplicated_total", crm="salesforce") == 1


def test_outbound_message__contact_object_is_logged(post_outbound, caplog):
    with caplog.at_level("INFO", logger="integration.queue"):
        post_outbound("outbound_message__contact_object")

    [record] = [r for r in caplog.records if "Contact records are not scored" in r.getMessage()]
    assert record.levelname == "WARNING"  # unsupported: a Flow sending what leadscore cannot use


def test_outbound_message_token_in_query_string(post_outbound, queue):
    response = post_outbound(
        "outbound_message__single", path=f"/webhooks/salesforce?token={SF_WEBHOOK_TOKEN}"
    )

    assert response.data == ACK
    assert pending.depth(queue.connection) == 1


# ---- Outbound Messages: bad input


@pytest.mark.parametrize(
    ("token", "status", "message"),
    [
        (
            None,
            401,
            "missing token: use the Outbound Message endpoint URL /webhooks/salesforce/<token> "
            "(or ?token=<token>) with SALESFORCE_WEBHOOK_TOKEN",
        ),
        (
            "not-the-token",
            401,
            "wrong token in the Outbound Message URL: compare it with SALESFORCE_WEBHOOK_TOKEN",
        ),
    ],
)
def test_outbound_message_with_wrong_or_missing_token_is_refused(
    post_outbound, queue, token, status, message
):
    response = post_outbound("outbound_message__single", token=token)

    assert response.status_code == status
    assert fault(response) == ("soapenv:Client", message)
    assert pending.depth(queue.connection) == 0


@pytest.mark.parametrize(
    "org_id", ["00D5g000004XyZaEAKZZZ", "00D5g000004XyZaZZZ", "00D5g000004XyZa:x|" + "A" * 5000]
)
def test_outbound_message_with_an_org_id_that_is_not_one_is_refused(post_outbound, queue, org_id):
    body = (FIXTURES / "salesforce" / "outbound_message__single.xml").read_bytes()
    response = post_outbound(body.replace(b"00D5g000004XyZaEAK", org_id.encode()))

    assert response.status_code == 400
    assert fault(response) == (
        "soapenv:Client",
        f"OrganizationId {org_id[:40]!r} is not a Salesforce org id (00D…, 15 characters, or 18 ending "
        "in the 15's case checksum)",
    )
    assert pending.depth(queue.connection) == 0


def test_a_record_id_with_a_trailing_newline_or_another_ids_checksum_is_not_one():
    assert is_record_id("00Q5g00000Ls001EAB") and is_record_id("00Q5g00000Ls001")
    assert not is_record_id("00Q5g00000Ls001EAB\n") and not is_record_id("00Q5g00000Ls001ZZZ")


def test_an_orgs_and_a_leads_15_character_ids_are_keyed_as_their_18_character_forms(
    post_outbound, post_change_events, queue
):
    """An Outbound Message gives 18-character ids and a relay may give 15: one lead of one account
    either way, so it is deduplicated, batched and scored once."""
    post_outbound("outbound_message__single")
    change = fixture_json("salesforce/lead_change_event__create.json")
    change["organizationId"] = SF_ORG_ID[:15]
    header = change["events"][0]["ChangeEventHeader"]
    header["recordIds"] = [record_id[:15] for record_id in header["recordIds"]]

    assert post_change_events(change).status_code == 200

    accounts = [member.decode() for member in queue.connection.zrange(pending.ACCOUNTS, 0, -1)]
    assert accounts == [f"salesforce:{SF_ORG_ID}"]
    [lead] = pending_events(queue.connection, "salesforce", SF_ORG_ID)
    assert (lead["lead_id"], len(lead["event_ids"])) == ("00Q5g00000Ls001EAB", 2)


def test_outbound_message__unknown_org_is_forbidden(post_outbound, queue):
    response = post_outbound("outbound_message__unknown_org")

    assert response.status_code == 403
    assert fault(response) == (
        "soapenv:Client",
        "OrganizationId '00D5g000009ZZZZEA4' is not in SALESFORCE_ORG_IDS",
    )
    assert pending.depth(queue.connection) == 0


@pytest.mark.parametrize(
    ("fixture", "message"),
    [
        ("outbound_message__malformed", "malformed XML: "),
        (
            "outbound_message__billion_laughs",
            "XML with a DTD or entity declarations is refused (DTDForbidden)",
        ),
        (
            "outbound_message__external_entity",
            "XML with a DTD or entity declarations is refused (DTDForbidden)",
        ),
        ("outbound_message__no_notifications", "the Outbound Message holds no <Notification> elements"),
        (
            "outbound_message__no_notifications_element",
            "expected a SOAP Envelope whose Body holds an Outbound Message <notifications>",
        ),
    ],
)
def test_bad_outbound_message_is_refused_and_harmless(post_outbound, queue, client, fixture, message):
    started = time.monotonic()
    response = post_outbound(fixture)

    assert response.status_code == 400
    code, text = fault(response)
    assert (code, text[: len(message)]) == ("soapenv:Client", message)
    assert pending.depth(queue.connection) == 0
    assert time.monotonic() - started < 2  # no entity expansion happened
    assert post_outbound("outbound_message__single").data == ACK  # the process is unharmed


def test_outbound_message_with_redis_down_is_a_server_fault(settings):
    app = create_app(settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"}))
    body = (FIXTURES / "salesforce" / "outbound_message__single.xml").read_bytes()

    response = app.test_client().post(f"/webhooks/salesforce/{SF_WEBHOOK_TOKEN}", data=body)

    assert response.status_code == 503
    assert fault(response) == (
        "soapenv:Server",
        "the queue (Redis) is unavailable, nothing was accepted; retry later",
    )


def test_outbound_messages_unconfigured_answer_a_server_fault(settings):
    app = create_app(settings.model_copy(update={"salesforce_webhook_token": ""}))
    body = (FIXTURES / "salesforce" / "outbound_message__single.xml").read_bytes()

    response = app.test_client().post("/webhooks/salesforce/anything", data=body)

    assert response.status_code == 503
    assert fault(response)[1].startswith("SALESFORCE_WEBHOOK_TOKEN and SALESFORCE_ORG_IDS must both be set")


# ---- change events: fixtures


@pytest.mark.parametrize(
    ("fixture", "summary", "leads"),
    [
        ("lead_change_event__create", (1, 1, 0, 0), ["00Q5g00000Ls001EAB"]),
        ("lead_change_event__status_update", (1, 1, 0, 0), ["00Q5g00000Ls004EAB"]),
        ("lead_change_event__several_for_one_lead", (3, 3, 0, 0), ["00Q5g00000Ls005EAB"]),
        ("lead_change_event__own_fields_only", (1, 0, 1, 0), []),
        ("lead_change_event__integration_user", (1, 0, 1, 0), []),
        ("lead_change_event__leadscore_client", (1, 0, 1, 0), []),
        ("lead_change_event__delete", (1, 1, 0, 0), ["00Q5g00000Ls008EAB"]),  # a merge's? the worker looks
        ("lead_change_event__merge", (2, 2, 0, 0), ["00Q5g00000Ls001EAB", "00Q5g00000Ls009EAB"]),
        ("lead_change_event__contact_entity", (1, 0, 0, 1), []),  # an sObject leadscore does not score
        ("opportunity_change_event__closed_won", (1, 1, 0, 0), ["deal:0065g00000Ls011AAB"]),
        ("opportunity_change_event__amount_update", (1, 0, 1, 0), []),  # its stage did not change
        (
            "lead_change_event__bulk_update",
            (3, 3, 0, 0),
            ["00Q5g00000Ls009EAB", "00Q5g00000Ls010EAB", "00Q5g00000Ls011EAB"],
        ),
    ],
)
def test_change_event_fixture(post_change_events, queue, fixture, summary, leads):
    response = post_change_events(fixture)

    body = response.get_json()
    assert response.status_code == 200
    assert (body["received"], body["queued"], body["ignored"], body["unsupported"]) == summary
    assert queued(queue) == sorted(leads)


def test_change_event__create_redelivered_enqueues_nothing_new(post_change_events, queue):
    post_change_events("lead_change_event__create")
    pending.drain(queue.connection, "salesforce", SF_ORG_ID)
    second = post_change_events("lead_change_event__create").get_json()

    assert second["queued"] == 1  # the web queues it; the collector finds it was seen
    assert queued(queue) == ["00Q5g00000Ls001EAB"]
    assert metrics.counter_value(queue.connection, "events_deduplicated_total", crm="salesforce") == 1


# ---- change events: bad input


def test_change_event_signature_is_the_documented_hmac_of_timestamp_dot_body():
    """A known answer, computed once outside leadscore: the README's scheme is what an Apex or relay
    author implements, so signing and verifying must not drift together."""
    body = b'{"events": []}'
    expected = "642434cbc738898a5b7806687d6d2e8c0f507d2428112e2a894cff84133d7b9a"

    assert signing.compute("whsec-known-answer", "1795251603", body) == expected
    assert signing.sign_headers("whsec-known-answer", body, timestamp=1795251603) == {
        "X-Leadscore-Timestamp": "1795251603",
        "X-Leadscore-Signature": f"v1={expected}",
    }


def test_change_event_with_bad_signature_is_refused(post_change_events, queue):
    response = post_change_events("lead_change_event__create", secret="not-the-secret")

    assert response.status_code == 401
    assert response.get_json() == {
        "error": "X-Leadscore-Signature does not match: sign '<timestamp>.<raw body>' with HMAC-SHA256 and "
        "the shared SALESFORCE_EVENTS_SECRET, hex-encoded"
    }
    assert pending.depth(queue.connection) == 0


@pytest.mark.parametrize("age_s", [301, -301])
def test_change_event_with_stale_timestamp_is_refused(client, queue, age_s):
    body = json.dumps(fixture_json("salesforce/lead_change_event__create.json")).encode()
    stamp = int(time.time()) - age_s
    headers = signing.sign_headers(SF_EVENTS_SECRET, body, timestamp=stamp)

    response = client.post("/webhooks/salesforce/events", data=body, headers=headers)

    assert response.status_code == 401
    assert response.get_json() == {
        "error": f"X-Leadscore-Timestamp {stamp} is not within 5 minutes of now: a replay or a wrong clock"
    }
    assert pending.depth(queue.connection) == 0


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({signing.SIGNATURE_HEADER: ""}, "missing X-Leadscore-Signature header (v1=<hex HMAC-SHA256>)"),
        ({signing.TIMESTAMP_HEADER: ""}, "missing X-Leadscore-Timestamp header (Unix seconds)"),
        ({signing.SIGNATURE_HEADER: "v0=abc"}, "X-Leadscore-Signature has no v1= signature"),
    ],
)
def test_change_event_with_missing_signature_parts_is_refused(post_change_events, queue, headers, message):
    response = post_change_events("lead_change_event__create", headers=headers)

    assert (response.status_code, response.get_json()) == (401, {"error": message})
    assert pending.depth(queue.connection) == 0


def test_change_event_signature_accepts_a_rotated_secret_alongside(client, queue):
    body = json.dumps(fixture_json("salesforce/lead_change_event__create.json")).encode()
    headers = signing.sign_headers(SF_EVENTS_SECRET, body)
    stamp = headers[signing.TIMESTAMP_HEADER]
    old = signing.compute("the-old-secret", stamp, body)
    headers[signing.SIGNATURE_HEADER] = f"v1={old}, {headers[signing.SIGNATURE_HEADER]}"

    assert client.post("/webhooks/salesforce/events", data=body, headers=headers).status_code == 200
    assert pending.depth(queue.connection) == 1


def test_change_event_from_unknown_org_is_forbidden(post_change_events, queue):
    value = {
        **fixture_json("salesforce/lead_change_event__create.json"),
        "organizationId": "00D5g000009ZZZZEA4",
    }

    response = post_change_events(value)

    assert response.status_code == 403
    assert pending.depth(queue.connection) == 0


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ([{"ChangeEventHeader": {}}], "at body: Input should be an object"),
        (
            {"organizationId": SF_ORG_ID, "events": []},
            "at events: List should have at least 1 item after validation, not 0",
        ),
        ({"organizationId": SF_ORG_ID, "events": [{}]}, "at events.0.ChangeEventHeader: Field required"),
    ],
)
def test_change_event_body_of_the_wrong_shape_is_refused(post_change_events, queue, value, where):
    response = post_change_events(value)

    assert response.status_code == 400
    assert response.get_json()["error"].endswith(where)
    assert pending.depth(queue.connection) == 0


def test_lead_change_event__status_update_in_a_trigger_batch_of_2000_is_queued_and_2001_refused(
    post_change_events, queue
):
    """A change-event trigger is handed up to 2,000 events, and a refusal fails its whole callout."""
    value = fixture_json("salesforce/lead_change_event__status_update.json")
    [event] = value["events"]
    ids = [full_id(f"00Q5g00000{n:05d}") for n in range(2001)]
    header = event["ChangeEventHeader"]
    value["events"] = [
        {"ChangeEventHeader": {**header, "recordIds": [lead_id], "sequenceNumber": n}}
        for n, lead_id in enumerate(ids)
    ]
    too_many = post_change_events(value)
    value["events"].pop()
    body = post_change_events(value).get_json()

    assert too_many.status_code == 400
    assert too_many.get_json()["error"].endswith("at events: List should have at most 2000 items after "
                                                 "validation, not 2001")  # fmt: skip
    assert (body["received"], body["queued"]) == (2000, 2000)
    assert queued(queue) == sorted(ids[:2000])


# ---- review findings, each pinned


def _one_event(**header) -> dict:
    value = fixture_json("salesforce/lead_change_event__status_update.json")
    value["events"][0]["ChangeEventHeader"].update(header)
    return value


def test_gap_update_without_changed_fields_is_rescored(post_change_events, queue):
    body = post_change_events(_one_event(changeType="GAP_UPDATE", changedFields=[])).get_json()

    assert (body["queued"], body["ignored"]) == (1, 0)


def test_wildcard_record_ids_are_unsupported_not_queued(post_change_events, queue):
    body = post_change_events(_one_event(recordIds=["00Q*"])).get_json()

    assert (body["queued"], body["unsupported"]) == (0, 1)
    assert pending.depth(queue.connection) == 0


@pytest.mark.parametrize(
    ("origin", "enqueued"),
    [
        ("com/salesforce/api/rest/60.0;client=leadscore", 0),
        ("com/salesforce/api/rest/60.0;client=leadscore/", 0),
        ("com/salesforce/api/rest/60.0;client=leadscore-backfill", 1),
        ("com/salesforce/api/soap/60.0;client=SfdcInternalAPI/", 1),
    ],
)
def test_change_origin_client_is_matched_exactly(post_change_events, origin, enqueued):
    assert post_change_events(_one_event(changeOrigin=origin)).get_json()["queued"] == enqueued


def test_integration_user_given_as_15_characters_still_matches(settings, queue):
    app = create_app(settings.model_copy(update={"salesforce_integration_user_id": "0055g00000LsInt"}))
    body = json.dumps(fixture_json("salesforce/lead_change_event__integration_user.json")).encode()
    headers = {"Content-Type": "application/json", **signing.sign_headers(SF_EVENTS_SECRET, body)}

    response = app.test_client().post("/webhooks/salesforce/events", data=body, headers=headers)

    assert response.get_json()["ignored"] == 1 and pending.depth(queue.connection) == 0


@pytest.mark.parametrize("stamp", ["\u00b2", "9" * 5000, "1" * 400])
def test_odd_timestamps_are_refused_not_crashed(client, queue, stamp):
    body = json.dumps(fixture_json("salesforce/lead_change_event__create.json")).encode()
    headers = {signing.TIMESTAMP_HEADER: stamp.encode("latin-1", "ignore").decode("latin-1") or "x",
               signing.SIGNATURE_HEADER: "v1=00"}  # fmt: skip

    response = client.post("/webhooks/salesforce/events", data=body, headers=headers)

    assert response.status_code == 401
    assert pending.depth(queue.connection) == 0


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_outbound_message_over_the_size_limit_is_a_soap_fault(settings, queue, framing):
    """Chunked too: Werkzeug stops reading such a body at the limit, and a message cut after its
    first notifications was once acknowledged."""
    url = f"/webhooks/salesforce/{SF_WEBHOOK_TOKEN}"
    body = (FIXTURES / "salesforce" / "outbound_message__single.xml").read_bytes()
    exactly = create_app(settings.model_copy(update={"max_body_bytes": len(body)})).test_client()
    assert exactly.post(url, **framed(body, framing)).status_code == 200
    padded = body + b"\n" * 500
    app = create_app(settings.model_copy(update={"max_body_bytes": len(body)}))

    response = app.test_client().post(url, **framed(padded, framing))

    assert response.status_code == 413
    assert fault(response) == ("soapenv:Client", f"body exceeds the {len(body)}-byte limit (MAX_BODY_BYTES)")


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_change_events_over_the_size_limit_are_refused(settings, queue, framing):
    body = json.dumps(fixture_json("salesforce/lead_change_event__create.json")).encode()
    url = "/webhooks/salesforce/events"
    app = create_app(settings.model_copy(update={"max_body_bytes": len(body)}))
    assert app.test_client().post(url, headers=signing.sign_headers(SF_EVENTS_SECRET, body),
                                  **framed(body, framing)).status_code == 200  # fmt: skip
    padded = body + b" " * 500

    response = app.test_client().post(url, headers=signing.sign_headers(SF_EVENTS_SECRET, padded),
                                      **framed(padded, framing))  # fmt: skip

    assert response.status_code == 413
    assert response.get_json() == {"error": f"body exceeds the {len(body)}-byte limit (MAX_BODY_BYTES)"}
