"""The HubSpot emulator's batch, association and rate-limit endpoints, driven by the real SDK over HTTP."""

from __future__ import annotations

import json
import time

import pytest
from hubspot import HubSpot
from hubspot.crm.associations.v4 import ApiException as AssociationsApiException
from hubspot.crm.associations.v4 import (
    BatchInputPublicFetchAssociationsBatchRequest,
    BatchResponsePublicAssociationMultiWithLabel,
    BatchResponsePublicAssociationMultiWithLabelWithErrors,
    PublicFetchAssociationsBatchRequest,
)
from hubspot.crm.contacts import (
    ApiException,
    BatchInputSimplePublicObjectBatchInput,
    BatchReadInputSimplePublicObjectId,
    BatchResponseSimplePublicObject,
    BatchResponseSimplePublicObjectWithErrors,
    PublicObjectSearchRequest,
    SimplePublicObjectBatchInput,
    SimplePublicObjectId,
    SimplePublicObjectInput,
)

from integration.hubspot.api import GROUP, PROPERTY_DEFINITIONS

from .conftest import HUBSPOT_TOKEN

MAYA = "74300000101"  # one note
BOTH_NOTES = "74300000121"  # two notes
EMAILED = "74300000104"  # one email, no notes
BARE = "74300000122"  # no associations
MISSING = "74399999999"
TEN_SECONDLY = ("TEN_SECONDLY_ROLLING", "You have reached your ten_secondly_rolling limit.")
TIER_B = {"leadscore_tier": "B"}
NO_ASSOCIATIONS = ("OBJECT_NOT_FOUND", "crm.associations.NO_ASSOCIATIONS_FOUND")


@pytest.fixture
def emulator(hubspot):
    """The conftest's HubSpot emulator, seeded from fixtures and served over HTTP."""
    return hubspot


@pytest.fixture
def client(emulator):
    return HubSpot(access_token=HUBSPOT_TOKEN, host=emulator.url)


@pytest.fixture
def leadscore_properties(client):
    """leadscore's group and properties, created through the SDK as `ensure_properties` does."""
    client.crm.properties.groups_api.create("contacts", GROUP)
    for definition in PROPERTY_DEFINITIONS:
        client.crm.properties.core_api.create("contacts", definition)


def read(client, ids, properties=("email",)):
    return client.crm.contacts.batch_api.read(
        BatchReadInputSimplePublicObjectId(
            properties=list(properties), inputs=[SimplePublicObjectId(id=i) for i in ids]
        )
    )


def update(client, items: dict[str, dict]):
    return client.crm.contacts.batch_api.update(
        BatchInputSimplePublicObjectBatchInput(
            inputs=[SimplePublicObjectBatchInput(id=i, properties=p) for i, p in items.items()]
        )
    )


def associations(client, to_type, ids):
    return client.crm.associations.v4.batch_api.get_page(
        "contacts",
        to_type,
        BatchInputPublicFetchAssociationsBatchRequest(
            inputs=[PublicFetchAssociationsBatchRequest(id=i) for i in ids]
        ),
    )


# ---- batch read


def test_batch_read_all_found_answers_200_with_requested_properties(client):
    reply = read(client, [MAYA, EMAILED])
    assert isinstance(reply, BatchResponseSimplePublicObject)
    assert [r.id for r in reply.results] == [MAYA, EMAILED]
    assert set(reply.results[0].properties) == {"email", "createdate", "hs_object_id", "lastmodifieddate"}


def test_batch_read_with_missing_ids_answers_207_with_their_ids(client):
    reply = read(client, [MAYA, MISSING, "1"])
    assert isinstance(reply, BatchResponseSimplePublicObjectWithErrors)
    assert [r.id for r in reply.results] == [MAYA]
    assert reply.num_errors == 1
    error = reply.errors[0]
    assert error.category == "OBJECT_NOT_FOUND"
    assert error.context == {"ids": [MISSING, "1"]}
    assert error.message.startswith("Could not get some CONTACT objects")


def test_batch_read_over_100_inputs_is_refused(client):
    with pytest.raises(ApiException) as caught:
        read(client, [str(74300000000 + n) for n in range(101)])
    assert caught.value.status == 400
    assert json.loads(caught.value.body)["category"] == "VALIDATION_ERROR"


# ---- batch update


def test_batch_update_all_valid_answers_200_and_records_writes(client, emulator, leadscore_properties):
    reply = update(client, {MAYA: {"leadscore_score": "81", "leadscore_tier": "A"}})
    assert isinstance(reply, BatchResponseSimplePublicObject)
    assert reply.results[0].properties["leadscore_tier"] == "A"
    assert emulator.writes == [(MAYA, {"leadscore_score": "81", "leadscore_tier": "A"})]
    assert emulator.contact_properties(MAYA)["leadscore_score"] == "81"


def test_one_invalid_input_refuses_the_whole_batch_update_and_nothing_is_written(
    client, emulator, leadscore_properties
):
    """As HubSpot's v3 batch update does: 400 `Property values were not valid`, for every input."""
    with pytest.raises(ApiException) as caught:
        update(
            client, {MAYA: {"leadscore_tier": "E"}, EMAILED: {"leadscore_score": "40", "leadscore_tier": "C"}}
        )

    assert caught.value.status == 400
    body = json.loads(caught.value.body)
    assert (body["category"], body["errors"]) == (
        "VALIDATION_ERROR",
        [
            {
                "code": "INVALID_OPTION",
                "in": "leadscore_tier",
                "message": "E was not one of the allowed options",
            }
        ],
    )
    assert body["message"].startswith("Property values were not valid: [")
    assert emulator.writes == []
    assert "leadscore_score" not in emulator.contact_properties(EMAILED)


def test_a_batch_update_naming_a_deleted_contact_writes_the_rest_and_names_it(
    client, emulator, leadscore_properties
):
    before = emulator.contact_properties(EMAILED)["lastmodifieddate"]
    reply = update(
        client, {EMAILED: {"leadscore_score": "40", "leadscore_tier": "C"}, MISSING: {"leadscore_tier": "A"}}
    )

    assert isinstance(reply, BatchResponseSimplePublicObjectWithErrors)
    assert [r.id for r in reply.results] == [EMAILED]
    assert emulator.writes == [(EMAILED, {"leadscore_score": "40", "leadscore_tier": "C"})]
    assert emulator.contact_properties(EMAILED)["lastmodifieddate"] != before
    (error,) = reply.errors
    assert (error.category, error.context) == ("OBJECT_NOT_FOUND", {"ids": [MISSING]})


def test_invalid_values_are_named_one_by_one(client, emulator, leadscore_properties):
    with pytest.raises(ApiException) as caught:
        update(client, {BARE: {"no_such_property": "x", "leadscore_score": "many"}})

    assert [(e["code"], e["in"]) for e in json.loads(caught.value.body)["errors"]] == [
        ("PROPERTY_DOESNT_EXIST", "no_such_property"),
        ("INVALID_DECIMAL", "leadscore_score"),
    ]


def test_rejected_contacts_fail_like_a_validation_rule(client, emulator, leadscore_properties):
    emulator.reject[MAYA] = "Tier may not change while a deal is open."
    with pytest.raises(ApiException) as caught:
        update(client, {MAYA: {"leadscore_tier": "A"}, EMAILED: {"leadscore_tier": "B"}})
    body = json.loads(caught.value.body)
    assert (caught.value.status, body["category"], body["message"]) == (
        400,
        "VALIDATION_ERROR",
        "Tier may not change while a deal is open.",
    )
    with pytest.raises(ApiException) as caught:  # the single-object PATCH is refused too
        client.crm.contacts.basic_api.update(MAYA, SimplePublicObjectInput(properties=TIER_B))
    assert caught.value.status == 400
    assert emulator.writes == []


def test_batch_update_over_100_inputs_is_refused(client, emulator, leadscore_properties):
    with pytest.raises(ApiException) as caught:
        update(client, {str(74300000000 + n): {"leadscore_tier": "A"} for n in range(101)})
    assert caught.value.status == 400
    assert emulator.writes == []


# ---- search


def test_search_sorts_as_asked_and_stops_paging_at_10000_results(client):
    newest_first = client.crm.contacts.search_api.do_search(PublicObjectSearchRequest(
        sorts=[{"propertyName": "hs_object_id", "direction": "DESCENDING"}], properties=["email"], limit=3,
    ))  # fmt: skip
    assert [c.id for c in newest_first.results] == ["74300000124", "74300000123", "74300000122"]
    assert newest_first.paging.next.after == "3"

    with pytest.raises(ApiException) as caught:
        client.crm.contacts.search_api.do_search(PublicObjectSearchRequest(limit=200, after="9900"))
    assert (caught.value.status, json.loads(caught.value.body)["category"]) == (400, "VALIDATION_ERROR")


# ---- v4 associations


def test_association_read_lists_notes_as_v4_does(client):
    reply = associations(client, "notes", [MAYA, BOTH_NOTES])
    assert isinstance(reply, BatchResponsePublicAssociationMultiWithLabel)
    linked = {r._from.id: [t.to_object_id for t in r.to] for r in reply.results}
    assert linked == {MAYA: ["91000000001"], BOTH_NOTES: ["91000000006", "91000000007"]}
    spec = reply.results[0].to[0].association_types[0]
    assert (spec.category, spec.type_id, spec.label) == ("HUBSPOT_DEFINED", 202, None)


def test_association_read_reports_contacts_without_any(client):
    reply = associations(client, "notes", [MAYA, EMAILED, BARE])
    assert isinstance(reply, BatchResponsePublicAssociationMultiWithLabelWithErrors)
    assert [r._from.id for r in reply.results] == [MAYA]
    assert reply.num_errors == 2
    error = reply.errors[0]
    assert (error.category, error.sub_category) == NO_ASSOCIATIONS
    assert error.message == f"No notes is associated with contact {EMAILED}."
    assert error.context == {"fromObjectId": [EMAILED], "toObjectType": ["NOTE"]}
    emails = associations(client, "emails", [EMAILED])
    assert emails.results[0].to[0].to_object_id == "92000000001"
    assert emails.results[0].to[0].association_types[0].type_id == 198


# ---- rate limiting and call accounting


def assert_rate_limited(caught, policy: str, message: str, limit: str) -> None:
    assert caught.value.status == 429
    body = json.loads(caught.value.body)
    assert body["errorType"] == "RATE_LIMIT"
    assert (body["policyName"], body["message"], body["groupName"]) == (policy, message, "publicapi")
    assert body["correlationId"]
    assert caught.value.headers["X-HubSpot-RateLimit-Max"] == limit
    assert caught.value.headers["X-HubSpot-RateLimit-Remaining"] == "0"
    assert caught.value.headers["X-HubSpot-RateLimit-Interval-Milliseconds"] == "10000"


def test_rolling_rate_limit_answers_429_with_headers(client, emulator):
    emulator.rate_limit = 3
    remaining = []
    for _ in range(3):
        reply = client.crm.contacts.basic_api.get_by_id_with_http_info(MAYA)
        remaining.append(reply[2]["X-HubSpot-RateLimit-Remaining"])
        assert reply[2]["X-HubSpot-RateLimit-Max"] == "3"
    assert remaining == ["2", "1", "0"]
    with pytest.raises(ApiException) as caught:
        client.crm.contacts.basic_api.get_by_id(MAYA)
    assert_rate_limited(caught, *TEN_SECONDLY, "3")
    assert emulator.throttled == 1


def test_storm_throttles_the_next_calls_only(client, emulator):
    emulator.storm(2)
    for _ in range(2):
        with pytest.raises(ApiException) as caught:
            read(client, [MAYA])
        assert_rate_limited(caught, *TEN_SECONDLY, "100")
    assert read(client, [MAYA]).results[0].id == MAYA
    assert emulator.throttled == 2


def test_daily_limit(client, emulator):
    emulator.daily_limit_reached = True
    with pytest.raises(AssociationsApiException) as caught:
        associations(client, "notes", [MAYA])
    assert_rate_limited(caught, "DAILY", "You have reached your daily limit.", "100")
    assert caught.value.headers["X-HubSpot-RateLimit-Daily-Remaining"] == "0"
    emulator.daily_limit_reached = False
    assert associations(client, "notes", [MAYA]).results


def test_api_calls_leave_out_setup_and_unauthenticated_calls(client, emulator, leadscore_properties):
    setup_calls = len(emulator.calls)
    read(client, [MAYA])
    update(client, {MAYA: {"leadscore_tier": "A"}})
    with pytest.raises(ApiException):
        HubSpot(access_token="wrong", host=emulator.url).crm.contacts.basic_api.get_by_id(MAYA)
    assert emulator.api_calls() == 2
    assert len(emulator.calls) == setup_calls + 3
    assert ("POST", "/crm/v3/objects/contacts/batch/update") in emulator.calls


def test_latency_applies_to_every_call(client, emulator):
    emulator.latency_s = 0.05
    started = time.monotonic()
    client.crm.contacts.basic_api.get_by_id(MAYA)
    assert time.monotonic() - started >= 0.05
