"""An emulator of the Salesforce REST and Metadata endpoints leadscore uses, seeded from fixtures.

Behaves like Salesforce where it matters to the integration: bearer auth and the
client-credentials token endpoint, `Sforce-Limit-Info` on every REST response, sObject
reads with `fields`, a small SOQL subset answered in pages (`nextRecordsUrl`), sObject
Collections updates with per-record SaveResults (validation rules, converted or deleted
leads, unknown fields, restricted picklists, allOrNone rollback),
`createMetadata`/`readMetadata`/`updateMetadata` of CustomFields over SOAP as
`simple_salesforce`'s `mdapi` (zeep) speaks it (the describe gives each field's
`inlineHelpText`), and (optionally) the Outbound Message Salesforce sends back after the
integration's own write.

Serve it over TLS (`integration.emulators.tls`): simple-salesforce only builds https:// URLs.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import hmac
import json
import random
import re
import string
import threading
import time
import uuid
from datetime import UTC, datetime
from operator import ge, gt, le, lt
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import requests
from defusedxml import ElementTree as SafeET
from flask import Flask, Response, jsonify, request

from integration.salesforce import full_id, is_record_id

SOAPENV = "http://schemas.xmlsoap.org/soap/envelope/"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
MD = "http://soap.sforce.com/2006/04/metadata"
OUTBOUND = "http://soap.sforce.com/2005/09/outbound"
ENTERPRISE = "urn:sobject.enterprise.soap.sforce.com"
OUTBOUND_ACTION_ID = "04k5g000000LsOmAAK"
MAX_COLLECTION = 200
ECHO_FIELDS = (
    "Company", "Email", "FirstName", "IsConverted", "LastModifiedById", "LastModifiedDate", "LastName",
    "LeadSource", "Status", "Title",
)  # fmt: skip
ROLLED_BACK = (
    "Record rolled back because not all records were valid and the request was using AllOrNone header"
)

# Standard Lead fields every org has, whatever the fixtures hold.
BASE_LEAD_FIELDS = (
    "Id",
    "IsConverted",
    "CreatedDate",
    "LastModifiedDate",
    "LastModifiedById",
    "SystemModstamp",
)
READ_ONLY_FIELDS = frozenset({
    "Id", "IsDeleted", "IsConverted", "ConvertedDate", "ConvertedAccountId", "ConvertedContactId",
    "ConvertedOpportunityId", "CreatedDate", "CreatedById", "LastModifiedDate", "LastModifiedById",
    "SystemModstamp", "LastActivityDate", "LastViewedDate", "LastReferencedDate", "MasterRecordId",
    "PhotoUrl", "Name",
})  # fmt: skip
OPPORTUNITY_FIELDS = frozenset({
    "Id", "Name", "StageName", "IsClosed", "IsWon", "Amount", "CloseDate", "AccountId", "OwnerId",
    "CreatedDate", "LastModifiedDate",
})  # fmt: skip
TASK_FIELDS = frozenset({
    "Id", "Subject", "Status", "Priority", "WhoId", "WhatId", "OwnerId", "ActivityDate", "Description",
    "Type", "TaskSubtype", "IsClosed", "IsDeleted", "CallType", "CallDurationInSeconds",
    "CompletedDateTime", "CreatedDate", "CreatedById", "LastModifiedDate", "LastModifiedById",
    "SystemModstamp", "AccountId", "IsHighPriority",
})  # fmt: skip
METADATA_TYPES = {"Number": "double", "Text": "string", "TextArea": "textarea", "LongTextArea": "textarea",
                  "Picklist": "picklist", "DateTime": "datetime", "Date": "date", "Checkbox": "boolean",
                  "Email": "email", "Url": "url", "Phone": "phone"}  # fmt: skip
DESCRIBE_TO_METADATA = {
    "double": "Number", "int": "Number", "string": "Text", "textarea": "LongTextArea", "picklist": "Picklist",
    "datetime": "DateTime", "date": "Date", "boolean": "Checkbox",
}  # fmt: skip

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}")
_ID_CHARS = string.ascii_letters + string.digits


def _now() -> str:
    """Salesforce's REST datetime format, e.g. 2026-11-21T10:00:00.000+0000."""
    now = datetime.now(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}+0000"


def sf_id(prefix: str) -> str:
    """A fresh 18-character Salesforce id with the given 3- or 5-character key prefix."""
    return full_id(prefix.ljust(10, "0") + "".join(random.choices(_ID_CHARS, k=5)))  # like 04l5g00000Ls010


def _xml_value(value) -> str:
    """A JSON value as SOAP writes it: lowercase booleans, datetimes in Z form."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str) and _DATETIME.match(value) and value.endswith("+0000"):
        return value[:-5] + "Z"
    return str(value)


def _save_error(code: str, message: str, fields: list[str] | None = None) -> dict:
    return {"statusCode": code, "message": message, "fields": fields or []}


def _errors(status: int, code: str, message: str):
    return jsonify([{"message": message, "errorCode": code}]), status


# A new org's standard Lead picklists that leadscore's rules read.
DEFAULT_PICKLISTS = {
    "LeadSource": ("Web", "Phone Inquiry", "Partner Referral", "Purchased List", "Other"),
    "Status": ("Open - Not Contacted", "Working - Contacted", "Closed - Converted", "Closed - Not Converted"),
    "Rating": ("Hot", "Warm", "Cold"),
}


def _picklist_value(value: str) -> dict:
    return {"active": True, "defaultValue": False, "label": value, "validFor": None, "value": value}


def _field_type(name: str, value) -> str:
    if name == "Id":
        return "id"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str) and _DATE.match(value):
        return "date"
    if isinstance(value, str) and _DATETIME.match(value):
        return "datetime"
    return "string"


def _label(name: str) -> str:
    base = name[:-3] if name.endswith("__c") else name
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", base).replace("_", " ").strip()


class SoqlError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


_SOQL = re.compile(
    r"^\s*SELECT\s+(?P<fields>.+?)\s+FROM\s+(?P<entity>\w+)"
    r"(?:\s+WHERE\s+(?P<where>.+?))?"
    r"(?:\s+ORDER\s+BY\s+(?P<order_field>[\w.]+)(?:\s+(?P<direction>ASC|DESC))?)?"
    r"(?:\s+LIMIT\s+(?P<limit>\d+))?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_CONDITION = re.compile(
    r"(?P<field>[\w.]+)\s*(?:(?P<op>=|!=|<=|>=|<|>)\s*(?P<value>'(?:[^'\\]|\\.)*'|[\w.:+-]+)"
    r"|(?P<in>IN)\s*\((?P<values>[^)]*)\))\s*",
    re.IGNORECASE,
)
_AND = re.compile(r"AND\s+", re.IGNORECASE)
_SUBQUERY = re.compile(r"\(\s*(SELECT\b[^()]*)\)", re.IGNORECASE)
_SET_ASIDE = re.compile(r"__subquery(\d+)")
# (parent object, relationship name lowercased) -> the name as Salesforce spells it, the child object
# and its lookup field to the parent
CHILD_RELATIONSHIPS = {("Lead", "tasks"): ("Tasks", "Task", "WhoId")}
_LITERAL = re.compile(r"\s*('(?:[^'\\]|\\.)*'|[\w.+-]+)\s*(,|$)")
_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})")


def _literal(token: str):
    if token.startswith("'"):
        return re.sub(r"\\(.)", r"\1", token[1:-1])
    if _DATETIME.fullmatch(token):
        return datetime.fromisoformat(token)
    lowered = token.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "null":
        return None
    try:
        return int(token) if re.fullmatch(r"-?\d+", token) else float(token)
    except ValueError:
        raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{token}'") from None


def _literal_list(text: str) -> list:
    values, pos = [], 0
    while pos < len(text):
        match = _LITERAL.match(text, pos)
        if not match:
            raise SoqlError("MALFORMED_QUERY", f"unexpected token: '{text[pos:].strip()}'")
        values.append(_literal(match.group(1)))
        pos = match.end()
    if not values:
        raise SoqlError("MALFORMED_QUERY", "unexpected token: ')'")
    return values


def _same(stored, wanted) -> bool:
    if wanted is None or stored is None:
        return stored is wanted
    if isinstance(wanted, str) and isinstance(stored, str) and is_record_id(wanted) and is_record_id(stored):
        return stored[:15] == wanted[:15]  # ids: 15 characters, case-sensitive, or 18 with a checksum
    if isinstance(wanted, str):
        return str(stored).casefold() == wanted.casefold()  # SOQL string comparison ignores case
    return stored == wanted


def _compared(stored, operator: str, wanted) -> bool:
    """One WHERE condition: =, !=, IN or an order; datetimes compare as instants, as SOQL's do."""
    if operator == "IN":
        return any(_same(stored, w) for w in wanted)
    if operator in ("=", "!="):
        return _same(stored, wanted) == (operator == "=")
    if stored is None or wanted is None:
        return False
    if isinstance(wanted, datetime):
        stored = datetime.fromisoformat(stored)
    return {"<": lt, "<=": le, ">": gt, ">=": ge}[operator](stored, wanted)


def _sort_key(value):
    if isinstance(value, str):
        return (1, 0, value.casefold())
    if isinstance(value, bool | int | float):
        return (1, float(value), "")
    return (0, 0, "")  # nulls first ascending, last descending, as Salesforce sorts by default


# ---- XML helpers (responses are built as text, like Salesforce's; requests parsed with defusedxml)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _tree(element) -> dict:
    """An element as {"type": xsi:type, "items": [(name, text | subtree), ...]}."""
    items = []
    for child in element:
        items.append((_local(child.tag), _tree(child) if len(child) else (child.text or "")))
    xsi_type = element.get(f"{{{XSI}}}type")
    return {"type": xsi_type.rsplit(":", 1)[-1] if xsi_type else None, "items": items}


def _xml_items(items: list) -> str:
    out = []
    for name, value in items:
        if isinstance(value, dict):
            attr = f' xsi:type="{value["type"]}"' if value.get("type") else ""
            out.append(f"<{name}{attr}>{_xml_items(value['items'])}</{name}>")
        else:
            out.append(f"<{name}>{escape(str(value))}</{name}>")
    return "".join(out)


def _first(items: list, name: str):
    return next((value for key, value in items if key == name), None)


def _soap(body: str, status: int = 200) -> Response:
    envelope = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soapenv:Envelope xmlns:soapenv="{SOAPENV}" xmlns="{MD}" xmlns:xsi="{XSI}">'
        f"<soapenv:Body>{body}</soapenv:Body></soapenv:Envelope>"
    )
    return Response(envelope, status=status, content_type="text/xml; charset=utf-8")


def _soap_fault(code: str, message: str, status: int = 500) -> Response:
    envelope = (
        '<?xml version="1.0" encoding="UTF-8"?>'
        f'<soapenv:Envelope xmlns:soapenv="{SOAPENV}" xmlns:sf="{MD}">'
        f"<soapenv:Body><soapenv:Fault><faultcode>{escape(code)}</faultcode>"
        f"<faultstring>{escape(message)}</faultstring></soapenv:Fault></soapenv:Body></soapenv:Envelope>"
    )
    return Response(envelope, status=status, content_type="text/xml; charset=utf-8")


class SalesforceEmulator:
    def __init__(
        self,
        token: str = "sf-emulator-token",
        api_version: str = "60.0",
        org_id: str = "00D5g000004XyZaEAK",
        integration_user_id: str = "0055g00000LsIntAAF",
        client_id: str = "leadscore-client-id",
        client_secret: str = "leadscore-client-secret",
        latency_s: float = 0.0,
    ):
        self.token = token
        self.api_version = api_version
        self.org_id = org_id
        self.integration_user_id = integration_user_id
        self.client_id = client_id
        self.client_secret = client_secret
        self.latency_s = latency_s
        self.leads: dict[str, dict] = {}
        self.recycle_bin: dict[str, dict] = {}  # deleted Leads, which only `queryAll` reads
        self.tasks: dict[str, dict] = {}
        self.opportunities: dict[str, dict] = {}
        self.lead_fields: dict[str, dict] = {}
        self.custom_fields: dict[str, dict] = {}  # fullName -> metadata tree, as createMetadata received it
        self.metadata_forbidden = False  # the API user lacks Modify Metadata / Customize Application
        self.writes: list[tuple[str, dict]] = []
        self.calls: list[tuple[str, str, str | None]] = []
        self.reject: dict[str, tuple[str, str]] = {}
        # An active Lead assignment rule's owner: every Lead an update saves without
        # `Sforce-Auto-Assign: FALSE` goes to it, as REST runs the org's active rule by default.
        self.assignment_owner: str | None = None
        # Leads an "Allow, with alert" duplicate rule matches on edit: saved only with the
        # `Sforce-Duplicate-Rule-Header: allowSave=true` an API user acknowledges the alert by.
        self.duplicate_alerts: set[str] = set()
        self.unreadable: set[str] = set()  # objects the integration user has no Read on
        self.unavailable = False  # every REST call answers 503, as in the org's maintenance window
        self.unavailable_writes = False  # sObject Collections writes alone answer 503
        self.api_calls = 0
        self.api_limit = 15000
        self.limit_exceeded: str | None = None  # as "TotalRequests Limit exceeded.": every call refused
        self.query_page = 2000  # records a query answers at once; the rest through `nextRecordsUrl`
        self._cursors: dict[str, tuple[list[dict], int]] = {}  # locator -> records still to answer, total
        self.echo_url: str | None = None
        self.echo_fields: tuple[str, ...] = ECHO_FIELDS
        self.echo_statuses: list[int] = []
        self.url: str | None = None
        self._lock = threading.RLock()
        for name in BASE_LEAD_FIELDS:
            self.lead_fields[name] = self._standard_field(name, False if name == "IsConverted" else None)

    # ---- seeding and inspection (used by tests and the demo, not over HTTP)

    def load_fixtures(self, directory: Path) -> SalesforceEmulator:
        directory = Path(directory)
        for path in sorted(directory.glob("lead__*.json")):
            self.add_lead(json.loads(path.read_text()))
        for path in sorted(directory.glob("task__*.json")):
            record = json.loads(path.read_text())
            self.tasks[record["Id"]] = record
        for path in sorted(directory.glob("opportunity__*.json")):
            record = json.loads(path.read_text())
            self.opportunities[record["Id"]] = record
        return self

    def add_lead(self, record: dict) -> None:
        with self._lock:
            record = copy.deepcopy(record)
            record.setdefault("attributes", {"type": "Lead"})
            record.setdefault("IsConverted", False)
            self.leads[record["Id"]] = record
            for name, value in record.items():
                if name != "attributes" and self._lead_field(name) is None:
                    self.lead_fields[name] = self._standard_field(name, value)

    def lead(self, lead_id: str) -> dict:
        with self._lock:
            return copy.deepcopy(self.leads[lead_id])

    def delete_lead(self, lead_id: str, master_id: str | None = None) -> None:
        """Delete a Lead into the recycle bin; `master_id` names the Lead it was merged into."""
        with self._lock:
            record = self.leads.pop(lead_id, None)
            if record is not None:
                self.recycle_bin[lead_id] = {**record, "IsDeleted": True, "MasterRecordId": master_id}

    def merge_leads(self, master_id: str, merged_ids: list[str]) -> None:
        """Salesforce's merge: the others are deleted, each naming the master in MasterRecordId, and
        the master is updated."""
        with self._lock:
            for lead_id in merged_ids:
                self.delete_lead(lead_id, master_id)
            self.leads[master_id]["LastModifiedDate"] = _now()

    def echo_writes_to(self, url: str, fields: tuple[str, ...] = ECHO_FIELDS) -> None:
        """After each successful write, post the Outbound Message Salesforce would send for those leads.

        Like a real Outbound Message it carries the Id and the configured `fields` of the record as
        it now is (alphabetical, nulls left out), LastModifiedById being the integration user.
        """
        self.echo_url = url
        self.echo_fields = tuple(fields)

    def hide_lead_field(self, name: str) -> None:
        """A Lead field that exists but the API user may not see (no field-level security on it):
        describe and SOQL leave it out, and creating it again is a duplicate."""
        with self._lock:
            canonical = self._lead_field(name)
            if canonical:
                del self.lead_fields[canonical]
            self.custom_fields.setdefault(f"Lead.{name}", {"type": "CustomField", "items": []})

    def remove_lead_field(self, name: str) -> None:
        """Forget a Lead field (e.g. a seeded Leadscore_*__c one), as in an org where it was never created."""
        with self._lock:
            canonical = self._lead_field(name)
            if canonical:
                del self.lead_fields[canonical]
            for full_name in [n for n in self.custom_fields if n.lower() == f"lead.{name}".lower()]:
                del self.custom_fields[full_name]

    def revoke_read(self, entity: str) -> None:
        """Take Read on an object (e.g. Opportunity) from the integration user's profile."""
        self.unreadable.add(entity)

    @staticmethod
    def _standard_field(name: str, value) -> dict:
        kind = "picklist" if name in DEFAULT_PICKLISTS else _field_type(name, value)
        described = {
            "name": name,
            "label": _label(name),
            "type": kind,
            "custom": name.endswith("__c"),
            "updateable": name not in READ_ONLY_FIELDS,
            "nillable": name
            not in ("Id", "IsConverted", "CreatedDate", "LastModifiedDate", "SystemModstamp"),
            "length": {"string": 255, "id": 18, "picklist": 255}.get(kind, 0),
            "inlineHelpText": None,
        }
        if kind == "picklist":
            described["picklistValues"] = [_picklist_value(v) for v in DEFAULT_PICKLISTS[name]]
        return described

    def add_picklist_value(self, name: str, value: str, active: bool = True) -> None:
        """A value an org's admin added to a standard Lead picklist."""
        field = self.lead_fields.setdefault(name, self._standard_field(name, None))
        field["picklistValues"].append({**_picklist_value(value), "active": active})

    def _lead_field(self, name: str) -> str | None:
        """The canonical name of a Lead field (field names are case-insensitive), or None."""
        if name in self.lead_fields:
            return name
        lowered = name.lower()
        return next((n for n in self.lead_fields if n.lower() == lowered), None)

    def _opportunity_field(self, name: str) -> str | None:
        known = set(OPPORTUNITY_FIELDS).union(*(o.keys() for o in self.opportunities.values())) - {
            "attributes"
        }
        lowered = name.lower()
        return next((n for n in sorted(known) if n.lower() == lowered), None)

    def _task_field(self, name: str) -> str | None:
        known = set(TASK_FIELDS).union(*(t.keys() for t in self.tasks.values())) - {"attributes"}
        lowered = name.lower()
        return next((n for n in sorted(known) if n.lower() == lowered), None)

    def _attributes(self, entity: str, record_id: str) -> dict:
        return {"type": entity, "url": f"/services/data/v{self.api_version}/sobjects/{entity}/{record_id}"}

    def _view(self, entity: str, record: dict, fields: list[str]) -> dict:
        view = {"attributes": self._attributes(entity, record.get("Id", ""))}
        for name in fields:
            view[name] = copy.deepcopy(record.get(name))
        return view

    # ---- HTTP

    def app(self) -> Flask:
        app = Flask("salesforce-emulator")
        app.url_map.strict_slashes = False
        data = "/services/data/v<version>"

        @app.before_request
        def authenticate():
            self.calls.append((request.method, request.path, request.headers.get("Sforce-Call-Options")))
            if self.latency_s:
                time.sleep(self.latency_s)
            if self.unavailable:  # its logins included
                return _errors(503, "SERVER_UNAVAILABLE", "The server is down for maintenance.")
            if request.path.rstrip("/") == "/services/oauth2/token" or request.path.startswith(
                "/services/Soap/"
            ):
                return None  # the token endpoint needs no bearer; SOAP carries its session in a header
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                return _errors(401, "INVALID_SESSION_ID", "Session expired or invalid")
            with self._lock:
                self.api_calls += 1
                over = self.api_calls > self.api_limit
            if over or self.limit_exceeded:
                return _errors(
                    403, "REQUEST_LIMIT_EXCEEDED", self.limit_exceeded or "TotalRequests Limit exceeded."
                )
            return None

        @app.after_request
        def limit_info(response):
            if request.path.startswith("/services/data"):
                response.headers["Sforce-Limit-Info"] = f"api-usage={self.api_calls}/{self.api_limit}"
            return response

        @app.errorhandler(404)
        def not_found(_error):
            return _errors(404, "NOT_FOUND", "The requested resource does not exist")

        @app.errorhandler(405)
        def not_allowed(_error):
            return _errors(405, "METHOD_NOT_ALLOWED", f"HTTP Method '{request.method}' not allowed.")

        @app.post("/services/oauth2/token")
        def token():
            form = request.form
            if form.get("grant_type") != "client_credentials":
                return jsonify(
                    error="unsupported_grant_type", error_description="grant type not supported"
                ), 400
            if not (
                hmac.compare_digest(form.get("client_id", ""), self.client_id)
                and hmac.compare_digest(form.get("client_secret", ""), self.client_secret)
            ):
                return jsonify(error="invalid_client", error_description="invalid client credentials"), 400
            identity = f"https://login.salesforce.com/id/{self.org_id}/{self.integration_user_id}"
            issued_at = str(int(time.time() * 1000))
            digest = hmac.new(self.client_secret.encode(), (identity + issued_at).encode(), hashlib.sha256)
            return jsonify(
                access_token=self.token,
                signature=base64.b64encode(digest.digest()).decode(),
                scope="api",
                instance_url=f"{request.scheme}://{request.host}",
                id=identity,
                token_type="Bearer",
                issued_at=issued_at,
            )

        @app.get(f"{data}/sobjects/Lead/describe")
        def describe_lead(version):
            with self._lock:
                fields = copy.deepcopy(list(self.lead_fields.values()))
            return jsonify(
                name="Lead",
                label="Lead",
                labelPlural="Leads",
                keyPrefix="00Q",
                custom=False,
                queryable=True,
                updateable=True,
                fields=fields,
                urls={"describe": f"/services/data/v{version}/sobjects/Lead/describe"},
            )

        @app.get(f"{data}/sobjects/<entity>/<record_id>")
        def get_record(version, entity, record_id):
            if entity not in ("Lead", "Task"):
                return _errors(404, "NOT_FOUND", "The requested resource does not exist")
            with self._lock:
                record = (self.leads if entity == "Lead" else self.tasks).get(record_id)
                if record is None:
                    return _errors(404, "NOT_FOUND", "The requested resource does not exist")
                resolve = self._lead_field if entity == "Lead" else self._task_field
                wanted = [
                    f.strip() for raw in request.args.getlist("fields") for f in raw.split(",") if f.strip()
                ]
                if wanted:
                    names = ["Id"]
                    for name in wanted:
                        canonical = resolve(name)
                        if canonical is None:
                            return _errors(
                                400, "INVALID_FIELD", f"No such column '{name}' on sobject of type {entity}"
                            )
                        if canonical not in names:
                            names.append(canonical)
                elif entity == "Lead":
                    names = list(self.lead_fields)
                else:
                    names = [k for k in record if k != "attributes"]
                return jsonify(self._view(entity, record, names))

        @app.get(f"{data}/query")
        @app.get(f"{data}/queryAll")
        def query(version):
            soql = request.args.get("q", "")
            try:
                with self._lock:
                    return jsonify(self._query(soql, deleted=request.path.rstrip("/").endswith("/queryAll")))
            except SoqlError as error:
                return _errors(400, error.code, error.message)

        @app.get(f"{data}/query/<locator>")
        def query_more(version, locator):
            with self._lock:
                if locator not in self._cursors:
                    return _errors(400, "INVALID_QUERY_LOCATOR", "invalid query locator")
                return jsonify(self._page(*self._cursors.pop(locator)))

        @app.patch(f"{data}/composite/sobjects")
        def update_collection(version):
            if self.unavailable_writes:
                return _errors(503, "SERVER_UNAVAILABLE", "The server is down for maintenance.")
            body = request.get_json(silent=True)
            if not isinstance(body, dict) or not isinstance(body.get("records"), list):
                return _errors(
                    400, "JSON_PARSER_ERROR", "The request body must be a JSON object with records"
                )
            records = body["records"]
            if len(records) > MAX_COLLECTION:
                return _errors(
                    400,
                    "EXCEEDED_ID_LIMIT",
                    f"record limit reached. cannot submit more than {MAX_COLLECTION} records into this call",
                )
            return jsonify(self._update(records, bool(body.get("allOrNone")), request.headers))

        @app.post("/services/Soap/m/<version>")
        def metadata(version):
            return self._metadata(request.get_data())

        return app

    # ---- SOQL

    def _query(self, soql: str, deleted: bool = False) -> dict:
        records = self._select(soql, deleted=deleted)
        return self._page(records, len(records))

    def _relationship(self, parent: str, name: str, soql: str) -> tuple[str, str, str]:
        """A parent-to-child relationship of `parent` (as `Tasks` of Lead) the user may read."""
        found = CHILD_RELATIONSHIPS.get((parent, name.lower()))
        if found is None or found[1] in self.unreadable:
            raise SoqlError(
                "INVALID_TYPE",
                f"\n{soql}\n^\nERROR at Row:1:Column:1\nDidn't understand relationship '{name}' in FROM "
                "part of query call. If you are attempting to use a custom relationship, be sure to append "
                "the '__r' after the custom relationship name. Please reference your WSDL or the describe "
                "call for the appropriate names.",
            )
        return found

    def _select(self, soql: str, parent: tuple[str, dict] | None = None, deleted: bool = False) -> list[dict]:
        """The records a SELECT answers, each with its subqueries' children; `parent` (object, record)
        when `soql` is itself a relationship subquery; with the recycle bin's Leads when `deleted`
        (`queryAll`)."""
        subqueries: list[str] = []

        def set_aside(found: re.Match) -> str:
            subqueries.append(found[1])
            return f"__subquery{len(subqueries) - 1}"

        match = _SOQL.match(soql if parent else _SUBQUERY.sub(set_aside, soql))
        if not match:
            raise SoqlError("MALFORMED_QUERY", f"\n{soql}\n^\nERROR at Row:1:Column:1\nunexpected token")
        entity = match["entity"]
        entities = {name.lower(): name for name in ("Lead", "Task", "Opportunity", "Organization")}
        readable = set(entities) - {name.lower() for name in self.unreadable}
        if parent:
            _, entity, lookup = self._relationship(parent[0], entity, soql)
        elif entity.lower() not in readable:  # Salesforce says the same of an object the user cannot read
            raise SoqlError(
                "INVALID_TYPE",
                f"\n{soql}\n^\nERROR at Row:1:Column:{match.start('entity') + 1}\n"
                f"sObject type '{entity}' is not supported. If you are attempting to use a custom object, "
                "be sure to append the '__c' after the entity name. Please reference your WSDL or the "
                "describe call for the appropriate names.",
            )
        else:
            entity = entities[entity.lower()]
        resolve = {
            "Lead": self._lead_field,
            "Task": self._task_field,
            "Opportunity": self._opportunity_field,
            "Organization": lambda name: "Id" if name.lower() == "id" else None,
        }[entity]

        def column(name: str, start: int) -> str:
            canonical = resolve(name) if "." not in name else None
            if canonical is None:
                raise SoqlError(
                    "INVALID_FIELD",
                    f"\n{soql}\n{' ' * start}^\nERROR at Row:1:Column:{start + 1}\n"
                    f"No such column '{name}' on entity '{entity}'. If you are attempting to use a custom "
                    "field, be sure to append the '__c' after the custom field name. Please reference your "
                    "WSDL or the describe call for the appropriate names.",
                )
            return canonical

        selected, children, offset = [], {}, match.start("fields")
        for raw in match["fields"].split(","):
            name = raw.strip()
            start = offset + len(raw) - len(raw.lstrip())
            offset += len(raw) + 1
            if set_aside_at := _SET_ASIDE.fullmatch(name):
                child = subqueries[int(set_aside_at[1])]
                relationship = self._relationship(entity, _SOQL.match(child)["entity"], soql)[0]
                children[relationship] = child
                continue
            if not re.fullmatch(r"[\w.]+", name):
                raise SoqlError(
                    "MALFORMED_QUERY",
                    f"\n{soql}\n{' ' * start}^\nERROR at Row:1:Column:{start + 1}\n"
                    f"unexpected token: '{name}'",
                )
            if name.lower() in (chosen.lower() for chosen in selected):
                raise SoqlError("MALFORMED_QUERY", f"duplicate field selected: {name}")
            selected.append(column(name, start))
        rows = list(
            {
                "Lead": {**self.leads, **self.recycle_bin} if deleted else self.leads,
                "Task": self.tasks,
                "Opportunity": self.opportunities,
                "Organization": {self.org_id: {"Id": self.org_id}},
            }[entity].values()
        )
        if parent:
            rows = [r for r in rows if (r.get(lookup) or "")[:15] == parent[1]["Id"][:15]]
        for field, operator, wanted in self._conditions(soql, match, column):
            rows = [r for r in rows if _compared(r.get(field), operator, wanted)]
        if match["order_field"]:
            order = column(match["order_field"], match.start("order_field"))
            descending = (match["direction"] or "").upper() == "DESC"
            rows.sort(key=lambda r: _sort_key(r.get(order)), reverse=descending)
        if match["limit"] is not None:
            rows = rows[: int(match["limit"])]
        views = [self._view(entity, r, selected) for r in rows]
        for view, row in zip(views, rows, strict=True):
            for relationship, child in children.items():  # Salesforce answers null for no children
                records = self._select(child, (entity, row))
                answer = {"totalSize": len(records), "done": True, "records": records}
                view[relationship] = answer if records else None
        return views

    def _page(self, records: list[dict], total: int) -> dict:
        """The first `query_page` records; the rest are kept for the `nextRecordsUrl` it names."""
        answer = {"totalSize": total, "done": len(records) <= self.query_page}
        if not answer["done"]:
            locator = f"01g{uuid.uuid4().hex[:15]}-{self.query_page}"
            self._cursors[locator] = (records[self.query_page :], total)
            answer["nextRecordsUrl"] = f"/services/data/v{self.api_version}/query/{locator}"
        return {**answer, "records": records[: self.query_page]}

    @staticmethod
    def _conditions(soql: str, match: re.Match, column) -> list[tuple[str, str, object]]:
        """The WHERE clause as (field, operator, value or IN's values), conditions joined by AND."""
        if not match["where"]:
            return []
        where, start, conditions, pos = match["where"], match.start("where"), [], 0

        def malformed() -> SoqlError:
            return SoqlError("MALFORMED_QUERY", f"\n{soql}\n{' ' * (start + pos)}^\nunexpected token")

        while True:
            if not (condition := _CONDITION.match(where, pos)):
                raise malformed()
            field = column(condition["field"], start + condition.start("field"))
            if condition["in"]:
                conditions.append((field, "IN", _literal_list(condition["values"])))
            else:
                conditions.append((field, condition["op"], _literal(condition["value"])))
            pos = condition.end()
            if pos == len(where):
                return conditions
            if not (joined := _AND.match(where, pos)):
                raise malformed()
            pos = joined.end()

    # ---- sObject Collections update

    def _record_errors(self, item: dict, headers=None) -> list[dict]:
        record_id = item.get("id") or item.get("Id")
        kind = (item.get("attributes") or {}).get("type")
        if kind not in (None, "Lead"):
            return [_save_error("INVALID_TYPE", f"sObject type '{kind}' is not supported")]
        if not record_id:
            return [_save_error("MISSING_ARGUMENT", "Id not specified in an update call")]
        lead = self.leads.get(record_id)
        if lead is None:
            return [_save_error("ENTITY_IS_DELETED", "entity is deleted")]
        if lead.get("IsConverted"):
            return [_save_error("CANNOT_UPDATE_CONVERTED_LEAD", "cannot reference converted lead")]
        errors = [
            error
            for name, value in item.items()
            if name not in ("attributes", "id", "Id") and (error := self._field_error(name, value))
        ]
        if errors:
            return errors
        if record_id in self.reject:
            code, message = self.reject[record_id]
            return [_save_error(code, message)]
        acknowledged = (headers or {}).get("Sforce-Duplicate-Rule-Header", "").replace(" ", "").lower()
        if record_id in self.duplicate_alerts and "allowsave=true" not in acknowledged.split(";"):
            return [_save_error("DUPLICATES_DETECTED", "Use one of these records?")]
        return []

    def _field_error(self, name: str, value) -> dict | None:
        canonical = self._lead_field(name)
        if canonical is None:
            return _save_error("INVALID_FIELD", f"No such column '{name}' on sobject of type Lead")
        field = self.lead_fields[canonical]
        if not field.get("updateable", True):
            return _save_error(
                "INVALID_FIELD_FOR_INSERT_UPDATE",
                f"Unable to create/update fields: {canonical}. Please check the security settings of this "
                "field and verify that it is read/write for your profile or permission set.",
                [canonical],
            )
        if field["type"] == "picklist" and field.get("restrictedPicklist") and value is not None:
            allowed = {p["value"] for p in field.get("picklistValues", []) if p.get("active", True)}
            if str(value) not in allowed:
                return _save_error(
                    "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                    f"{field['label']}: bad value for restricted picklist field: {value}",
                    [canonical],
                )
        # Only fields created over the Metadata API have a known length; seeded ones may be long text.
        length = (field.get("length") or 0) if f"Lead.{canonical}" in self.custom_fields else 0
        if (
            field["type"] in ("string", "textarea")
            and isinstance(value, str)
            and length
            and len(value) > length
        ):
            return _save_error(
                "STRING_TOO_LONG",
                f"{field['label']}: data value too large: {value[:100]} (max length={length})",
                [canonical],
            )
        return None

    def _update(self, records: list, all_or_none: bool, headers=None) -> list[dict]:
        headers = headers or {}
        assign = headers.get("Sforce-Auto-Assign", "TRUE").upper() != "FALSE"
        with self._lock:
            checked = []
            for item in records:
                item = item if isinstance(item, dict) else {}
                checked.append((item, item.get("id") or item.get("Id"), self._record_errors(item, headers)))
            failed = any(errors for _, _, errors in checked)
            results, written = [], []
            for item, record_id, errors in checked:
                if errors:
                    results.append({"id": record_id, "success": False, "errors": errors})
                elif all_or_none and failed:
                    rolled_back = _save_error("ALL_OR_NONE_OPERATION_ROLLED_BACK", ROLLED_BACK)
                    results.append({"id": record_id, "success": False, "errors": [rolled_back]})
                else:
                    values = {
                        self._lead_field(k): v for k, v in item.items() if k not in ("attributes", "id", "Id")
                    }
                    lead = self.leads[record_id]
                    lead.update(copy.deepcopy(values))
                    if assign and self.assignment_owner:
                        lead["OwnerId"] = self.assignment_owner
                    now = _now()
                    lead.update(
                        LastModifiedById=self.integration_user_id, LastModifiedDate=now, SystemModstamp=now
                    )
                    self.writes.append((record_id, dict(values)))
                    written.append((record_id, values))
                    results.append({"id": record_id, "success": True, "errors": []})
        if self.echo_url and written:
            self._send_echo(self.echo_url, written)
        return results

    # ---- Outbound Message echo

    def outbound_message(self, written: list[tuple[str, dict]]) -> bytes:
        """The SOAP notification an Outbound Message on Lead would post after these writes."""
        base = self.url or "https://127.0.0.1"
        org = self.org_id[:15]
        notifications = []
        for lead_id, _values in written:
            record = self.leads.get(lead_id, {})
            fields = [("Id", lead_id)] + [
                (name, record.get(name)) for name in sorted(set(self.echo_fields) - {"Id"})
            ]
            present = [(name, value) for name, value in fields if value is not None]
            body = "".join(f"<sf:{name}>{escape(_xml_value(value))}</sf:{name}>" for name, value in present)
            notifications.append(
                f"<Notification><Id>{sf_id('04l5g')}</Id>"
                f'<sObject xsi:type="sf:Lead" xmlns:sf={quoteattr(ENTERPRISE)}>{body}</sObject>'
                "</Notification>"
            )
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<soapenv:Envelope xmlns:soapenv="{SOAPENV}" xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
            f'xmlns:xsi="{XSI}">\n <soapenv:Body>\n  <notifications xmlns="{OUTBOUND}">\n'
            f"   <OrganizationId>{self.org_id}</OrganizationId>\n"
            f"   <ActionId>{OUTBOUND_ACTION_ID}</ActionId>\n"
            '   <SessionId xsi:nil="true"/>\n'
            f"   <EnterpriseUrl>{base}/services/Soap/c/{self.api_version}/{org}</EnterpriseUrl>\n"
            f"   <PartnerUrl>{base}/services/Soap/u/{self.api_version}/{org}</PartnerUrl>\n"
            f"   {''.join(notifications)}\n  </notifications>\n </soapenv:Body>\n</soapenv:Envelope>"
        ).encode()

    def _send_echo(self, url: str, written: list[tuple[str, dict]]) -> None:
        payload = self.outbound_message(written)

        def deliver():
            with contextlib.suppress(requests.RequestException):  # Salesforce would retry
                response = requests.post(
                    url,
                    data=payload,
                    headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'},
                    timeout=10,
                )
                self.echo_statuses.append(response.status_code)

        threading.Thread(target=deliver, daemon=True, name="salesforce-echo").start()

    # ---- Metadata API (SOAP)

    def _metadata(self, raw: bytes) -> Response:
        try:
            root = SafeET.fromstring(raw)
        except Exception:  # defusedxml raises several kinds for hostile or broken XML
            return _soap_fault("soapenv:Client", "Unable to parse the request body as XML")
        session = root.find(f".//{{{MD}}}SessionHeader/{{{MD}}}sessionId")
        if session is None or session.text != self.token:
            return _soap_fault(
                "sf:INVALID_SESSION_ID",
                "INVALID_SESSION_ID: Invalid Session ID found in SessionHeader: Illegal Session",
            )
        with self._lock:
            self.api_calls += 1
        if self.metadata_forbidden:
            return _soap_fault(
                "sf:INSUFFICIENT_ACCESS",
                "INSUFFICIENT_ACCESS: use of the Metadata API requires a user with the ModifyAllData or "
                "ModifyMetadata permissions",
            )
        body = root.find(f"{{{SOAPENV}}}Body")
        operation = body[0] if body is not None and len(body) else None
        name = _local(operation.tag) if operation is not None else ""
        if name in ("createMetadata", "updateMetadata"):
            create = name == "createMetadata"
            results = [self._save_field(_tree(m), create) for m in operation.findall(f"{{{MD}}}metadata")]
            return _soap(f"<{name}Response>{''.join(results)}</{name}Response>")
        if name == "readMetadata":
            kind = (operation.findtext(f"{{{MD}}}type") or "").strip()
            names = [(e.text or "").strip() for e in operation.findall(f"{{{MD}}}fullNames")]
            records = "".join(self._read_metadata(kind, n) for n in names)
            return _soap(f"<readMetadataResponse><result>{records}</result></readMetadataResponse>")
        return _soap_fault("soapenv:Client", f"No operation available for request {{{MD}}}{name}")

    @staticmethod
    def _save_result(full_name: str, code: str | None = None, message: str = "", fields=()) -> str:
        if code is None:
            return f"<result><fullName>{escape(full_name)}</fullName><success>true</success></result>"
        field_xml = "".join(f"<fields>{escape(f)}</fields>" for f in fields)
        return (
            f"<result><errors>{field_xml}<message>{escape(message)}</message><statusCode>{code}</statusCode>"
            f"</errors><fullName>{escape(full_name)}</fullName><success>false</success></result>"
        )

    def _save_field(self, tree: dict, create: bool) -> str:
        """createMetadata, refused for a field that exists, or updateMetadata, refused for one that
        does not and replacing it whole by the one sent, as Salesforce does."""
        refused = self._field_refused(tree)
        if refused:
            return refused
        items = tree["items"]
        full_name = str(_first(items, "fullName"))
        entity, _, field_name = full_name.partition(".")
        kind, label = _first(items, "type"), _first(items, "label")
        with self._lock:
            kept = next((n for n in self.custom_fields if n.lower() == full_name.lower()), None)
            described = self._lead_field(field_name) if entity == "Lead" else None
            if create and (kept or described):
                return self._save_result(
                    full_name,
                    "DUPLICATE_DEVELOPER_NAME",
                    f"There is already a field named {field_name[:-3]} on {entity}.",
                    ["fullName"],
                )
            if not create and not (kept or described):
                return self._save_result(
                    full_name,
                    "INVALID_CROSS_REFERENCE_KEY",
                    f"In field: fullName - no CustomField named {full_name} found",
                    ["fullName"],
                )
            self.custom_fields[kept or full_name] = tree
            if entity == "Lead" and (create or described):  # a hidden field stays hidden
                name = described or field_name
                values = self._picklist_values(items) if kind == "Picklist" else []
                self.lead_fields[name] = self._describe_custom(name, kind, str(label), items, values)
        return self._save_result(full_name)

    def _field_refused(self, tree: dict) -> str | None:
        """The failed SaveResult for a CustomField definition Salesforce would refuse, else None."""
        items = tree["items"]
        full_name = str(_first(items, "fullName") or "")
        if tree["type"] != "CustomField":
            return self._save_result(
                full_name, "INVALID_TYPE", f"Cannot create metadata of type {tree['type']}"
            )
        entity, _, field_name = full_name.partition(".")
        if not entity or not field_name.endswith("__c") or not re.fullmatch(r"[A-Za-z]\w*__c", field_name):
            return self._save_result(
                full_name,
                "INVALID_FIELD",
                f"Invalid fullName, must be Object.Name__c: {full_name}",
                ["fullName"],
            )
        kind, label = _first(items, "type"), _first(items, "label")
        if not label:
            return self._save_result(
                full_name, "REQUIRED_FIELD_MISSING", "Required field is missing: label", ["label"]
            )
        if kind not in METADATA_TYPES:
            return self._save_result(
                full_name, "FIELD_INTEGRITY_EXCEPTION", f"Invalid field type: {kind}", ["type"]
            )
        if kind in ("Text", "LongTextArea") and not _first(items, "length"):
            return self._save_result(
                full_name, "FIELD_INTEGRITY_EXCEPTION", "Length: You must enter a value", ["length"]
            )
        if kind == "Number" and not _first(items, "precision"):
            return self._save_result(
                full_name, "FIELD_INTEGRITY_EXCEPTION", "Precision: You must enter a value", ["precision"]
            )
        if kind == "Picklist" and not self._picklist_values(items):
            return self._save_result(
                full_name,
                "FIELD_INTEGRITY_EXCEPTION",
                "Picklist Values: You must enter at least one value",
                ["valueSet"],
            )
        return None

    @staticmethod
    def _picklist_values(items: list) -> list[dict]:
        value_set = _first(items, "valueSet")
        definition = _first(value_set["items"], "valueSetDefinition") if isinstance(value_set, dict) else None
        if not isinstance(definition, dict):
            return []
        values = []
        for name, value in definition["items"]:
            if name == "value" and isinstance(value, dict):
                full = str(_first(value["items"], "fullName") or "")
                values.append({
                    "active": str(_first(value["items"], "isActive") or "true").lower() != "false",
                    "defaultValue": str(_first(value["items"], "default") or "").lower() == "true",
                    "label": str(_first(value["items"], "label") or full),
                    "validFor": None,
                    "value": full,
                })  # fmt: skip
        return values

    @staticmethod
    def _describe_custom(name: str, kind: str, label: str, items: list, values: list[dict]) -> dict:
        def number(key: str, default: int = 0) -> int:
            with contextlib.suppress(TypeError, ValueError):
                return int(_first(items, key))
            return default

        entry = {
            "name": name,
            "label": label,
            "type": METADATA_TYPES[kind],
            "custom": True,
            "updateable": True,
            "nillable": True,
            "length": number("length", 255 if kind in ("TextArea", "Picklist", "Email", "Url") else 0),
            "precision": number("precision"),
            "scale": number("scale"),
            "inlineHelpText": _first(items, "inlineHelpText") or None,  # what reps see at the field
        }
        if kind in ("TextArea", "LongTextArea"):
            entry["extraTypeInfo"] = "plaintextarea"
            entry["length"] = number("length", 255) if kind == "LongTextArea" else 255
        if kind == "Picklist":
            value_set = _first(items, "valueSet")
            restricted = _first(value_set["items"], "restricted") if isinstance(value_set, dict) else None
            entry["picklistValues"] = values
            entry["restrictedPicklist"] = str(restricted or "true").lower() != "false"
        return entry

    def _read_metadata(self, kind: str, full_name: str) -> str:
        kind = kind if re.fullmatch(r"\w+", kind) else "Metadata"
        with self._lock:
            match = next((n for n in self.custom_fields if n.lower() == full_name.lower()), None)
            if kind == "CustomField" and match:
                stored = _xml_items(self.custom_fields[match]["items"])
                return f'<records xsi:type="CustomField">{stored}</records>'
            entity, _, field_name = full_name.partition(".")
            standard = self._lead_field(field_name) if entity == "Lead" and field_name else None
            if kind == "CustomField" and standard:  # seeded from records rather than created here
                field = self.lead_fields[standard]
                items = [("fullName", f"Lead.{standard}")]
                if field["custom"]:
                    kind_name = DESCRIBE_TO_METADATA.get(field["type"], "Text")
                    items += [("label", field["label"]), ("type", kind_name)]
                return f'<records xsi:type="CustomField">{_xml_items(items)}</records>'
        return f'<records xsi:type="{kind}"/>'  # Salesforce answers an absent component with an empty record
