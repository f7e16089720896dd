"""The Salesforce emulator over real TLS, driven by the real simple-salesforce client (no mocks)."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import requests
from defusedxml import ElementTree as SafeET
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import SalesforceMalformedRequest, SalesforceResourceNotFound

from integration.emulators.salesforce import SalesforceEmulator
from integration.emulators.tls import LocalTLS, serve_tls_in_thread, system_ca_bundle

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "salesforce"
TOKEN = "sf-test-token"
INTEGRATION_USER = "0055g00000LsIntAAF"


def lead_record(lead_id: str, last_name: str, **fields) -> dict:
    return {
        "attributes": {"type": "Lead", "url": f"/services/data/v60.0/sobjects/Lead/{lead_id}"},
        "Id": lead_id,
        "FirstName": "Ada",
        "LastName": last_name,
        "Company": "Acme",
        "Email": f"{last_name.lower()}@example.com",
        "Status": "Open - Not Contacted",
        "LeadSource": "Web",
        "NumberOfEmployees": 120,
        "IsConverted": False,
        "CreatedDate": "2026-11-01T09:00:00.000+0000",
        "LastModifiedDate": "2026-11-01T09:00:00.000+0000",
        "LastModifiedById": "0055g00000RepUsAAJ",
        **fields,
    }


LEAD_A, LEAD_B, LEAD_C = "00Q5g00000AaaaaEAB", "00Q5g00000BbbbbEAB", "00Q5g00000CccccEAB"


@pytest.fixture(scope="module")
def tls():
    with LocalTLS() as local:
        yield local


@pytest.fixture
def salesforce(tls, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls.ca_bundle())
    emulator = SalesforceEmulator(token=TOKEN)
    emulator.add_lead(lead_record(LEAD_A, "Lovelace", NumberOfEmployees=500))
    emulator.add_lead(lead_record(LEAD_B, "Hopper", NumberOfEmployees=40, LeadSource="Referral"))
    emulator.add_lead(lead_record(LEAD_C, "Turing", NumberOfEmployees=12000, LeadSource="Referral"))
    server = serve_tls_in_thread(emulator.app(), tls)
    emulator.url = server.url
    yield emulator
    server.stop()


def client(emulator: SalesforceEmulator, token: str = TOKEN, **headers) -> Salesforce:
    session = requests.Session()
    session.headers.update(headers)
    return Salesforce(instance_url=emulator.url, session_id=token, version="60.0", session=session)


def composite(sf: Salesforce, records: list[dict], all_or_none: bool = False):
    body = {"allOrNone": all_or_none, "records": [{"attributes": {"type": "Lead"}, **r} for r in records]}
    return sf.restful("composite/sobjects", method="PATCH", json=body)


def test_tls_bundle_holds_system_roots_and_test_ca(tls):
    assert tls.server_context() is not None
    bundle = Path(tls.ca_bundle()).read_bytes()
    assert bundle.endswith(tls.ca_pem)
    system = system_ca_bundle()
    if system is not None:
        assert bundle.startswith(system.read_bytes()[:200])


def test_get_lead_all_fields_and_selected_fields(salesforce):
    sf = client(salesforce)
    assert salesforce.url.startswith("https://127.0.0.1:")
    lead = sf.Lead.get(LEAD_A)
    assert lead["LastName"] == "Lovelace" and lead["attributes"]["type"] == "Lead"
    assert lead["NumberOfEmployees"] == 500
    narrow = sf.Lead.get(LEAD_A + "?fields=Email,Company")
    assert set(narrow) == {"attributes", "Id", "Email", "Company"}


def test_unknown_or_deleted_lead_is_not_found(salesforce):
    sf = client(salesforce)
    with pytest.raises(SalesforceResourceNotFound) as missing:
        sf.Lead.get("00Q5g00000ZzzzzEAB")
    assert missing.value.content[0]["errorCode"] == "NOT_FOUND"
    salesforce.delete_lead(LEAD_B)
    with pytest.raises(SalesforceResourceNotFound):
        sf.Lead.get(LEAD_B)


def test_bad_token_is_invalid_session(salesforce):
    url = f"{salesforce.url}/services/data/v60.0/sobjects/Lead/{LEAD_A}"
    response = requests.get(url, headers={"Authorization": "Bearer nope"})
    assert response.status_code == 401
    assert response.json() == [{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]


def test_query_where_in_order_by_limit(salesforce):
    sf = client(salesforce)
    result = sf.query(
        f"select Id, LastName, NumberOfEmployees from Lead where Id in ('{LEAD_A}', '{LEAD_B}', '{LEAD_C}') "
        "order by NumberOfEmployees desc limit 2"
    )
    assert result["totalSize"] == 2 and result["done"] is True
    assert [r["LastName"] for r in result["records"]] == ["Turing", "Lovelace"]
    assert set(result["records"][0]) == {"attributes", "Id", "LastName", "NumberOfEmployees"}
    referral = sf.query("SELECT Id FROM Lead WHERE LeadSource = 'referral' ORDER BY Id")
    assert [r["Id"] for r in referral["records"]] == [LEAD_B, LEAD_C]


def test_query_where_conditions_joined_by_and_compare_datetimes_as_instants(salesforce):
    salesforce.leads[LEAD_B]["LastModifiedDate"] = "2026-11-12T14:33:50.000+0000"
    salesforce.leads[LEAD_C]["LastModifiedDate"] = "2026-11-12T16:33:50.000+0200"  # 14:33:50 UTC too
    sf = client(salesforce)
    since = sf.query(
        "SELECT Id FROM Lead WHERE LeadSource = 'referral' AND LastModifiedDate >= 2026-11-12T14:33:50Z"
    )
    assert [r["Id"] for r in since["records"]] == [LEAD_B, LEAD_C]
    before = sf.query(
        "SELECT Id FROM Lead WHERE LastModifiedDate < 2026-11-12T14:33:50Z AND IsConverted = false"
    )
    assert [r["Id"] for r in before["records"]] == [LEAD_A]
    with pytest.raises(SalesforceMalformedRequest) as not_joined:
        sf.query("SELECT Id FROM Lead WHERE IsConverted = false LeadSource = 'Web'")
    assert not_joined.value.content[0]["errorCode"] == "MALFORMED_QUERY"


def test_query_unknown_field_and_malformed(salesforce):
    sf = client(salesforce)
    with pytest.raises(SalesforceMalformedRequest) as bad_field:
        sf.query(f"SELECT Bogus__c FROM Lead WHERE Id = '{LEAD_A}'")
    error = bad_field.value.content[0]
    assert error["errorCode"] == "INVALID_FIELD"
    assert "ERROR at Row:1:Column:8" in error["message"]
    assert "No such column 'Bogus__c' on entity 'Lead'" in error["message"]
    with pytest.raises(SalesforceMalformedRequest) as malformed:
        sf.query("SELECT FROM WHERE")
    assert malformed.value.content[0]["errorCode"] == "MALFORMED_QUERY"


def test_query_selecting_a_field_twice_is_refused_whatever_its_case(salesforce):
    with pytest.raises(SalesforceMalformedRequest) as duplicate:
        client(salesforce).query(f"SELECT Id, LastName, lastname FROM Lead WHERE Id = '{LEAD_A}'")
    [error] = duplicate.value.content
    assert error == {"errorCode": "MALFORMED_QUERY", "message": "duplicate field selected: lastname"}


def test_query_tasks(salesforce):
    salesforce.tasks["00T5g00000TaskAEAR"] = {"Id": "00T5g00000TaskAEAR", "WhoId": LEAD_A, "Subject": "Call"}
    sf = client(salesforce)
    result = sf.query(f"SELECT Id, Subject, ActivityDate FROM Task WHERE WhoId = '{LEAD_A}'")
    assert result["records"][0]["Subject"] == "Call" and result["records"][0]["ActivityDate"] is None
    with pytest.raises(SalesforceMalformedRequest):
        sf.query("SELECT Nope FROM Task WHERE WhoId = 'x'")


def test_a_lead_query_answers_each_leads_tasks_by_relationship_subquery(salesforce):
    """As Salesforce does: a `Tasks` object per Lead, or null for a Lead with none."""
    salesforce.tasks["00T5g00000TaskAEAR"] = {"Id": "00T5g00000TaskAEAR", "WhoId": LEAD_A, "Subject": "Call"}
    sf = client(salesforce)
    leads = f"FROM Lead WHERE Id IN ('{LEAD_A}', '{LEAD_B}') ORDER BY LastName DESC"

    records = sf.query(f"SELECT Id, (SELECT Subject FROM Tasks ORDER BY CreatedDate DESC LIMIT 5) {leads}")

    [with_task, without] = records["records"]
    assert with_task["Tasks"]["totalSize"] == 1 and with_task["Tasks"]["done"]
    assert [task["Subject"] for task in with_task["Tasks"]["records"]] == ["Call"]
    assert (without["Id"], without["Tasks"]) == (LEAD_B, None)
    with pytest.raises(SalesforceMalformedRequest, match="Didn't understand relationship 'Calls'"):
        sf.query(f"SELECT Id, (SELECT Subject FROM Calls) {leads}")
    salesforce.revoke_read("Task")
    with pytest.raises(SalesforceMalformedRequest, match="Didn't understand relationship 'Tasks'"):
        sf.query(f"SELECT Id, (SELECT Subject FROM Tasks) {leads}")


def test_composite_update_with_rejected_record(salesforce):
    rule = ("FIELD_CUSTOM_VALIDATION_EXCEPTION", "Score cannot be written while Status is Closed")
    salesforce.reject[LEAD_B] = rule
    sf = client(salesforce)
    results = composite(
        sf,
        [
            {"id": LEAD_A, "Company": "Acme Rockets"},
            {"id": LEAD_B, "Company": "Nope"},
            {"id": LEAD_C, "Bogus__c": 1},
            {"id": "00Q5g00000GoneeEAB", "Company": "x"},
        ],
    )
    assert results[0] == {"id": LEAD_A, "success": True, "errors": []}
    assert [r["success"] for r in results] == [True, False, False, False]
    assert results[1]["errors"][0]["statusCode"] == "FIELD_CUSTOM_VALIDATION_EXCEPTION"
    assert results[2]["errors"][0] == {
        "statusCode": "INVALID_FIELD",
        "message": "No such column 'Bogus__c' on sobject of type Lead",
        "fields": [],
    }
    assert results[3]["errors"][0]["statusCode"] == "ENTITY_IS_DELETED"
    lead = salesforce.lead(LEAD_A)
    assert lead["Company"] == "Acme Rockets" and lead["LastModifiedById"] == INTEGRATION_USER
    assert lead["LastModifiedDate"].endswith("+0000") and lead["SystemModstamp"] == lead["LastModifiedDate"]
    assert salesforce.writes == [(LEAD_A, {"Company": "Acme Rockets"})]
    assert salesforce.lead(LEAD_B)["Company"] == "Acme"


def test_composite_all_or_none_rolls_back(salesforce):
    salesforce.add_lead(lead_record("00Q5g00000ConvdEAB", "Converted", IsConverted=True))
    sf = client(salesforce)
    records = [{"id": LEAD_A, "Company": "Changed"}, {"id": "00Q5g00000ConvdEAB", "Company": "x"}]
    results = composite(sf, records, all_or_none=True)
    assert results[0]["errors"][0]["statusCode"] == "ALL_OR_NONE_OPERATION_ROLLED_BACK"
    assert results[1]["errors"][0]["statusCode"] == "CANNOT_UPDATE_CONVERTED_LEAD"
    assert salesforce.lead(LEAD_A)["Company"] == "Acme" and salesforce.writes == []


def test_composite_over_200_records_is_refused(salesforce):
    sf = client(salesforce)
    with pytest.raises(SalesforceMalformedRequest) as refused:
        composite(sf, [{"id": LEAD_A, "Company": str(i)} for i in range(201)])
    assert refused.value.content[0]["errorCode"] == "EXCEEDED_ID_LIMIT"
    assert salesforce.writes == []


def test_call_options_recorded_and_limit_info_parsed(salesforce):
    salesforce.api_limit = 5000
    sf = client(salesforce, **{"Sforce-Call-Options": "client=leadscore"})
    sf.Lead.get(LEAD_A)
    sf.query(f"SELECT Id FROM Lead WHERE Id = '{LEAD_A}'")
    assert salesforce.calls[-1] == ("GET", "/services/data/v60.0/query/", "client=leadscore")
    assert sf.api_usage["api-usage"].used == salesforce.api_calls == 2
    assert sf.api_usage["api-usage"].total == 5000


def test_mdapi_create_read_duplicate_and_describe(salesforce):
    sf = client(salesforce)
    score = sf.mdapi.CustomField(
        fullName="Lead.Leadscore_Score__c", label="Leadscore Score", type="Number", precision=3, scale=0
    )
    tier = sf.mdapi.CustomField(
        fullName="Lead.Leadscore_Tier__c",
        label="Leadscore Tier",
        type="Picklist",
        valueSet=sf.mdapi.ValueSet(
            restricted=True,
            valueSetDefinition=sf.mdapi.ValueSetValuesDefinition(
                sorted=False,
                value=[sf.mdapi.CustomValue(fullName=t, label=t, default=False) for t in ("A", "B", "C")],
            ),
        ),
    )
    sf.mdapi.CustomField.create([score, tier])
    read = sf.mdapi.CustomField.read(["Lead.Leadscore_Score__c"])
    assert read.fullName == "Lead.Leadscore_Score__c" and read.type == "Number" and read.precision == 3
    absent = sf.mdapi.CustomField.read(["Lead.Nothing_Here__c"])
    assert absent.fullName is None
    with pytest.raises(Exception, match="DUPLICATE_DEVELOPER_NAME"):
        sf.mdapi.CustomField.create([score])

    fields = {f["name"]: f for f in sf.Lead.describe()["fields"]}
    assert fields["Leadscore_Score__c"]["type"] == "double" and fields["Leadscore_Score__c"]["custom"] is True
    assert [p["value"] for p in fields["Leadscore_Tier__c"]["picklistValues"]] == ["A", "B", "C"]
    assert fields["Email"]["custom"] is False and fields["Id"]["type"] == "id"

    results = composite(sf, [{"id": LEAD_A, "Leadscore_Score__c": 87, "Leadscore_Tier__c": "Z"}])
    assert results[0]["errors"][0]["statusCode"] == "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"
    composite(sf, [{"id": LEAD_A, "Leadscore_Score__c": 87, "Leadscore_Tier__c": "A"}])
    assert sf.Lead.get(LEAD_A)["Leadscore_Tier__c"] == "A"


def test_mdapi_update_replaces_a_field_and_the_describe_gives_its_help_text(salesforce):
    sf = client(salesforce)
    sf.mdapi.CustomField.create([
        sf.mdapi.CustomField(fullName="Lead.Leadscore_Reason__c", label="Lead Score Reason", type="Text",
                             length=255, description="Why, in one line")
    ])  # fmt: skip

    def described() -> dict:
        return {f["name"]: f for f in sf.Lead.describe()["fields"]}["Leadscore_Reason__c"]

    assert described()["inlineHelpText"] is None

    field = sf.mdapi.CustomField.read(["Lead.Leadscore_Reason__c"])
    field.inlineHelpText = "Why the lead has this score"
    sf.mdapi.CustomField.update([field])

    assert (described()["inlineHelpText"], described()["length"]) == ("Why the lead has this score", 255)
    read = sf.mdapi.CustomField.read(["Lead.Leadscore_Reason__c"])
    assert (read.description, read.inlineHelpText) == ("Why, in one line", "Why the lead has this score")
    absent = sf.mdapi.CustomField(fullName="Lead.Nothing_Here__c", label="Nothing", type="Text", length=10)
    with pytest.raises(Exception, match="INVALID_CROSS_REFERENCE_KEY"):
        sf.mdapi.CustomField.update([absent])


def test_mdapi_bad_session_is_a_soap_fault(salesforce):
    sf = client(salesforce, token="wrong")
    with pytest.raises(Exception, match="INVALID_SESSION_ID"):
        sf.mdapi.CustomField.read(["Lead.Leadscore_Score__c"])


def test_oauth_client_credentials(salesforce):
    url = f"{salesforce.url}/services/oauth2/token"
    granted = requests.post(
        url,
        data={
            "grant_type": "client_credentials",
            "client_id": "leadscore-client-id",
            "client_secret": "leadscore-client-secret",
        },
    )
    assert granted.status_code == 200
    body = granted.json()
    assert body["access_token"] == TOKEN and body["instance_url"] == salesforce.url
    assert body["id"].endswith(f"/{salesforce.org_id}/{INTEGRATION_USER}") and body["token_type"] == "Bearer"
    wrong = {"grant_type": "client_credentials", "client_id": "x", "client_secret": "y"}
    refused = requests.post(url, data=wrong)
    assert refused.status_code == 400
    assert refused.json() == {"error": "invalid_client", "error_description": "invalid client credentials"}


def test_echo_posts_outbound_message(salesforce):
    received: list[bytes] = []
    done = threading.Event()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()
            done.set()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.handle_request, daemon=True).start()
    salesforce.echo_writes_to(f"http://127.0.0.1:{server.server_address[1]}/webhooks/salesforce")
    composite(client(salesforce), [{"id": LEAD_A, "Company": "Echo"}, {"id": LEAD_B, "Company": "Echo"}])
    assert done.wait(5)
    server.server_close()
    ns = {"o": "http://soap.sforce.com/2005/09/outbound", "sf": "urn:sobject.enterprise.soap.sforce.com"}
    root = SafeET.fromstring(received[0])
    assert root.findtext(".//o:OrganizationId", namespaces=ns) == salesforce.org_id
    assert root.findtext(".//o:ActionId", namespaces=ns) == "04k5g000000LsOmAAK"
    notes = root.findall(".//o:Notification", namespaces=ns)
    assert [n.findtext("o:sObject/sf:Id", namespaces=ns) for n in notes] == [LEAD_A, LEAD_B]
    assert all(len(n.findtext("o:Id", namespaces=ns)) == 18 for n in notes)
    assert notes[0].findtext("o:sObject/sf:LastModifiedById", namespaces=ns) == INTEGRATION_USER
    deadline = time.monotonic() + 5  # the emulator notes the status once its echo's reply is read
    while not salesforce.echo_statuses and time.monotonic() < deadline:
        time.sleep(0.02)
    assert salesforce.echo_statuses == [200]


@pytest.mark.skipif(not list(FIXTURES.glob("lead__*.json")), reason="no Salesforce lead fixtures yet")
def test_load_fixtures(tls, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls.ca_bundle())
    emulator = SalesforceEmulator(token=TOKEN).load_fixtures(FIXTURES)
    assert emulator.leads and all("attributes" in r for r in emulator.leads.values())
    assert emulator.lead_fields["Id"]["type"] == "id"
    server = serve_tls_in_thread(emulator.app(), tls)
    emulator.url = server.url
    try:
        sf = client(emulator)
        lead_id = next(iter(emulator.leads))
        assert sf.Lead.get(lead_id)["Id"] == lead_id
        if "Leadscore_Score__c" in emulator.lead_fields:  # the fixtures' org already has the fields
            read = sf.mdapi.CustomField.read(["Lead.Leadscore_Score__c"])
            assert read.fullName == "Lead.Leadscore_Score__c"
            emulator.remove_lead_field("Leadscore_Score__c")
            assert sf.mdapi.CustomField.read(["Lead.Leadscore_Score__c"]).fullName is None
    finally:
        server.stop()
