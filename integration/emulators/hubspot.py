"""An emulator of the HubSpot CRM v3 endpoints leadscore uses, seeded from fixtures.

Behaves like HubSpot where it matters to the integration: bearer auth, only the
requested properties returned, 404 for unknown contacts, writes refused for
properties that do not exist or values outside an enumeration, and (optionally)
the property-change webhooks HubSpot sends back after an integration's write.

Also: batch read/update answering 207 with per-input errors, v4 association batch
reads, the account details naming the token's portal, and HubSpot's rate limiting
(rolling ten-second limit, 429 storms, daily limit).
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import time
import uuid
from collections import deque
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import requests
from flask import Flask, g, jsonify, request

ALWAYS_RETURNED = (
    "createdate",
    "hs_createdate",
    "hs_object_id",
    "lastmodifieddate",
    "hs_lastmodifieddate",
)
# Default contact properties every portal has, beyond those the fixture contacts carry values for.
DEFAULT_PROPERTIES = ("city", "country", "state", "hs_analytics_average_page_views")
FIXTURE_PREFIXES = {"notes": "note", "emails": "email", "deals": "deal", "companies": "company"}
# A portal's default options of the enumeration properties leadscore's rules read (internal values).
DEFAULT_OPTIONS = {
    "hs_lead_status": ("NEW", "OPEN", "IN_PROGRESS", "OPEN_DEAL", "UNQUALIFIED", "ATTEMPTED_TO_CONTACT",
                       "CONNECTED", "BAD_TIMING"),
    "lifecyclestage": ("subscriber", "lead", "marketingqualifiedlead", "salesqualifiedlead", "opportunity",
                       "customer", "evangelist", "other"),
    "hs_analytics_source": ("ORGANIC_SEARCH", "PAID_SEARCH", "EMAIL_MARKETING", "SOCIAL_MEDIA", "REFERRALS",
                            "OTHER_CAMPAIGNS", "DIRECT_TRAFFIC", "OFFLINE", "PAID_SOCIAL", "AI_REFERRALS"),
}  # fmt: skip
SEARCH_LIMIT = 200
SEARCH_RESULTS_CAP = 10_000  # a search pages through at most this many results, `after` or not
BATCH_LIMIT = 100  # inputs per CRM v3 batch call
RATE_WINDOW_S = 10.0  # HubSpot's "ten secondly rolling" window
DEFAULT_RATE_MAX = 100  # private-app burst limit reported when a storm hits without `rate_limit`
DAILY_MAX = 250_000
SETUP_PATH_PREFIX = "/crm/v3/properties/"  # property and group setup: not counted by `api_calls()`
ASSOCIATION_TYPE_IDS = {
    ("contacts", "notes"): 202,
    ("contacts", "emails"): 198,
    ("contacts", "deals"): 4,
    ("deals", "contacts"): 3,
}  # HUBSPOT_DEFINED association type ids


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(status: int, category: str, message: str, errors: list[dict] | None = None):
    body = {
        "status": "error",
        "message": message,
        "correlationId": str(uuid.uuid4()),
        "category": category,
    }
    if errors:
        body["errors"] = errors
    return jsonify(body), status


def _type_name(object_type: str) -> str:
    """`contacts` -> `CONTACT`, as HubSpot names object types in messages and contexts."""
    return object_type.upper().removesuffix("S")


def _associations(contact: dict, kind: str) -> list[dict]:
    return ((contact.get("associations") or {}).get(kind) or {}).get("results") or []


def _batch(results: list[dict], errors: list[dict], started: str):
    """A batch reply: 200 when every input succeeded, else 207 with the errors."""
    body = {"status": "COMPLETE", "results": results}
    if errors:
        body.update(numErrors=len(errors), errors=errors)
    body.update(startedAt=started, completedAt=_now())
    return jsonify(body), 207 if errors else 200


def _batch_error(category: str, message: str, context: dict, details: list[dict] | None = None) -> dict:
    return {
        "status": "error",
        "category": category,
        "message": message,
        "context": context,
        "errors": details or [],
        "links": {},
    }


def _not_found(object_type: str, ids: list[str]) -> dict:
    """A batch's error for the ids of records that were deleted or never existed."""
    return _batch_error(
        "OBJECT_NOT_FOUND",
        f"Could not get some {_type_name(object_type)} objects, they may be deleted or not exist. "
        "Check that ids are valid.",
        {"ids": ids},
    )


def _number(value) -> float | None:
    """A filter operand as HubSpot orders it: a number, or a datetime as epoch milliseconds."""
    with contextlib.suppress(TypeError, ValueError):
        return float(value)
    with contextlib.suppress(TypeError, ValueError):
        return datetime.fromisoformat(value).timestamp() * 1000
    return None


def _passes(contact: dict, condition: dict) -> bool:
    """One search filter (EQ, NEQ, GT, GTE, LT, LTE, IN, NOT_IN) against a contact."""
    name, operator = condition.get("propertyName"), condition.get("operator", "EQ")
    stored = contact["id"] if name == "hs_object_id" else contact["properties"].get(name)
    if operator in ("IN", "NOT_IN"):
        inside = stored is not None and str(stored).casefold() in {
            str(v).casefold() for v in condition["values"]
        }
        return inside if operator == "IN" else not inside
    if stored is None:
        return operator == "NEQ"
    wanted = condition.get("value")
    left, right = _number(stored), _number(wanted)
    if left is None or right is None:
        left, right = str(stored).casefold(), str(wanted).casefold()
    return {
        "EQ": left == right, "NEQ": left != right, "GT": left > right, "GTE": left >= right,
        "LT": left < right, "LTE": left <= right,
    }[operator]  # fmt: skip


def _sort_key(contact: dict, name: str | None) -> tuple:
    """A contact's place in a search sorted by one property: numbers as numbers, blanks last."""
    stored = contact["id"] if name == "hs_object_id" else contact["properties"].get(name)
    if stored in (None, ""):
        return (2, 0, "")
    number = _number(stored)
    return (0, number, "") if number is not None else (1, 0, str(stored).casefold())


def _too_many(count: int):
    return _error(
        400, "VALIDATION_ERROR", f"Batch input may hold at most {BATCH_LIMIT} inputs; it held {count}."
    )


def _list_arg(name: str) -> list[str]:
    return [v for raw in request.args.getlist(name) for v in raw.split(",") if v]


class HubSpotEmulator:
    def __init__(
        self,
        token: str = "emulator-token",
        latency_s: float = 0.0,
        rate_limit: int | None = None,
        portal_id: str = "48213377",
    ):
        self.token = token
        self.portal_id = portal_id  # the portal the token belongs to (account details)
        self.latency_s = latency_s
        self.rate_limit = rate_limit  # authenticated calls per rolling 10 s; None = unlimited
        self.search_per_s: int | None = None  # search calls a second, HubSpot's own limit on them
        self._searches: deque[float] = deque()
        self.daily_limit_reached = False  # every authenticated call answers 429 DAILY
        # While set, every authenticated call answers 477 with this Retry-After: the portal is being
        # moved between data hosting locations.
        self.migrating_retry_after_s: int | None = None
        self.locked_calls = 0  # the next calls answer 423, as while a high-volume sync holds the lock
        self.throttled = 0  # 429s answered
        self.association_page_size: int | None = None  # a record's associations a page; None: all in one
        self.reject: dict[str, str] = {}  # contact id -> message: writes fail like a validation rule
        self.contacts: dict[str, dict] = {}
        self.objects: dict[str, dict[str, dict]] = {"notes": {}, "emails": {}, "deals": {}, "companies": {}}
        self.groups: dict[str, dict] = {
            "contactinformation": {"name": "contactinformation", "label": "Contact information"}
        }
        self.properties: dict[str, dict] = {n: self._standard_property(n) for n in DEFAULT_PROPERTIES}
        self.writes: list[tuple[str, dict]] = []
        self.calls: list[tuple[str, str]] = []
        self.echo: dict | None = None
        self.echo_responses: list[dict] = []
        self.forbidden_objects: set[str] = set()  # object types the token lacks the scope for
        # batch reads of these ("associations": those; "writes": batch updates) answer 503
        self.unavailable_objects: set[str] = set()
        self.invalid_objects: set[str] = set()  # batch reads of these answer 400, as to a malformed request
        self.schemas_read_only = False  # the token lacks crm.schemas.contacts.write: creating answers 403
        self.refused_properties: dict[str, tuple[int, str, str]] = {}  # name -> status, category, message
        self._lock = threading.Lock()
        self._event_id = 9_000_000_000
        self._authenticated: list[tuple[str, str]] = []
        self._window: deque[float] = deque()
        self._storm = 0

    # ---- seeding and inspection (used by tests and the demo, not over HTTP)

    def load_fixtures(self, directory: Path) -> HubSpotEmulator:
        directory = Path(directory)
        for path in sorted(directory.glob("contact__*.json")):
            self.add_contact(json.loads(path.read_text()))
        for kind in self.objects:
            for path in sorted(directory.glob(f"{FIXTURE_PREFIXES[kind]}__*.json")):
                record = json.loads(path.read_text())
                self.objects[kind][record["id"]] = record
        return self

    def add_contact(self, record: dict) -> None:
        with self._lock:
            self.contacts[record["id"]] = copy.deepcopy(record)
            for name in record["properties"]:
                self.properties.setdefault(name, self._standard_property(name))

    def contact_properties(self, contact_id: str) -> dict:
        return dict(self.contacts[contact_id]["properties"])

    def apply_changes(self, events: list[dict]) -> None:
        """Make the changes a delivery reports, as they happened in HubSpot before it was sent."""
        with self._lock:
            for event in events:
                if event.get("subscriptionType") == "contact.merge":
                    self._merge(event)
                    continue
                contact = self.contacts.get(str(event.get("objectId")))
                if contact and event.get("propertyName") and event.get("changeSource") != "INTEGRATION":
                    contact["properties"][event["propertyName"]] = event.get("propertyValue") or ""
                    contact["properties"]["lastmodifieddate"] = contact["updatedAt"] = _now()

    def _merge(self, event: dict) -> None:
        """The contact that remains takes the primary's values, and the merged contacts' where the primary
        has none, under the new id HubSpot gives it; the merged records are archived."""
        primary = self.contacts[str(event["primaryObjectId"])]
        merged = [self.contacts[str(i)] for i in event["mergedObjectIds"]]
        survivor = str(event.get("newObjectId") or primary["id"])
        properties: dict = {}
        gone = []
        for record in (*merged, primary):
            properties.update({name: value for name, value in record["properties"].items() if value})
            earlier = record["properties"].get("hs_merged_object_ids") or ""
            gone += [record["id"], *filter(None, earlier.split(";"))]
            record["archived"] = True
        self.contacts[survivor] = {
            **copy.deepcopy(primary),
            "id": survivor,
            "archived": False,
            "properties": {
                **properties,
                "hs_object_id": survivor,
                "hs_merged_object_ids": ";".join(i for i in gone if i != survivor),
                "lastmodifieddate": _now(),
            },
        }

    def storm(self, n: int) -> None:
        """The next `n` authenticated calls answer 429 (ten-secondly limit), whatever the rate."""
        with self._lock:
            self._storm = n

    def api_calls(self) -> int:
        """Authenticated calls (429s included), leaving out property and group setup."""
        with self._lock:
            return sum(1 for _, path in self._authenticated if not path.startswith(SETUP_PATH_PREFIX))

    def echo_writes_to(self, url: str, app_secret: str, app_id: str, portal_id: str) -> None:
        """After each write, post the property-change webhooks HubSpot would send."""
        self.echo = {"url": url, "secret": app_secret, "app_id": app_id, "portal_id": portal_id}

    @staticmethod
    def _standard_property(name: str) -> dict:
        options = [
            {"label": value.replace("_", " ").title(), "value": value, "displayOrder": order, "hidden": False}
            for order, value in enumerate(DEFAULT_OPTIONS.get(name, ()))
        ]
        return {
            "name": name,
            "label": name,
            "type": "enumeration" if options else "string",
            "fieldType": "select" if options else "text",
            "groupName": "contactinformation",
            "options": options,
        }

    def add_option(self, name: str, value: str, label: str | None = None, hidden: bool = False) -> None:
        """An option a portal's admin added to an enumeration property (its value, as the UI makes it,
        is the label itself)."""
        prop = self.properties.setdefault(name, self._standard_property(name))
        prop["options"].append({"label": label or value, "value": value,
                                "displayOrder": len(prop["options"]), "hidden": hidden})  # fmt: skip

    # ---- HTTP

    def app(self) -> Flask:
        app = Flask("hubspot-emulator")

        @app.before_request
        def authenticate():
            self.calls.append((request.method, request.path))
            if self.latency_s:
                time.sleep(self.latency_s)
            if request.headers.get("Authorization") != f"Bearer {self.token}":
                return _error(
                    401,
                    "INVALID_AUTHENTICATION",
                    "Authentication credentials not found. This API supports OAuth 2.0 "
                    "authentication and you can find more details at "
                    "https://developers.hubspot.com/docs/methods/auth/oauth-overview",
                )
            return self._admit()

        @app.after_request
        def rate_limit_headers(response):
            remaining = g.get("rate_remaining")
            if remaining is not None and response.status_code != 429:
                response.headers.update(self._rate_headers(remaining))
            return response

        @app.get("/account-info/v3/details")
        def account_details():
            if "account-info" in self.forbidden_objects:  # the token lacks the oauth scope
                return _error(
                    403,
                    "MISSING_SCOPES",
                    "This app hasn't been granted all required scopes to make this call.",
                )
            return jsonify(
                portalId=int(self.portal_id), accountType="STANDARD", timeZone="US/Eastern",
                companyCurrency="USD", additionalCurrencies=[], utcOffset="-05:00",
                utcOffsetMilliseconds=-18000000, uiDomain="app.hubspot.com", dataHostingLocation="na1",
            )  # fmt: skip

        @app.get("/crm/v3/objects/contacts/<contact_id>")
        def get_contact(contact_id):
            contact = self.contacts.get(contact_id)
            if contact is None or contact.get("archived"):
                return _error(404, "OBJECT_NOT_FOUND", "resource not found")
            return jsonify(self._view(contact, _list_arg("properties"), _list_arg("associations")))

        @app.patch("/crm/v3/objects/contacts/<contact_id>")
        def update_contact(contact_id):
            contact = self.contacts.get(contact_id)
            if contact is None:
                return _error(404, "OBJECT_NOT_FOUND", "resource not found")
            values = (request.get_json(silent=True) or {}).get("properties") or {}
            refused = self._refused(contact_id, values)
            if refused:
                return _error(400, refused["category"], refused["message"])
            self._write(contact_id, values)
            return jsonify(self._view(contact, list(values), []))

        @app.post("/crm/v3/objects/contacts/batch/update")
        def batch_update():
            if "writes" in self.unavailable_objects:
                return _error(503, "SERVICE_UNAVAILABLE", "The service is temporarily unavailable.")
            inputs = (request.get_json(silent=True) or {}).get("inputs") or []
            if len(inputs) > BATCH_LIMIT:
                return _too_many(len(inputs))
            ids = [str(i.get("id")) for i in inputs]
            if len(set(ids)) != len(ids):
                return _error(400, "VALIDATION_ERROR", "Duplicate IDs found in batch input.")
            refusals = {
                contact_id: self._refused(contact_id, item.get("properties") or {})
                for contact_id, item in zip(ids, inputs, strict=True)
                if contact_id in self.contacts and not self.contacts[contact_id].get("archived")
            }
            invalid = next((refused for refused in refusals.values() if refused), None)
            if invalid:  # one invalid input refuses the whole request: nothing is written
                return _error(400, invalid["category"], invalid["message"], invalid["errors"])
            started, results = _now(), []
            for contact_id, item in zip(ids, inputs, strict=True):
                if contact_id in refusals:
                    values = item.get("properties") or {}
                    self._write(contact_id, values)
                    results.append(self._view(self.contacts[contact_id], list(values), []))
            missing = [contact_id for contact_id in ids if contact_id not in refusals]
            return _batch(results, [_not_found("contacts", missing)] if missing else [], started)

        @app.post("/crm/v3/objects/contacts/search")
        def search_contacts():
            body = request.get_json(silent=True) or {}
            limit = int(body.get("limit") or 10)
            if limit > SEARCH_LIMIT:
                return _error(400, "VALIDATION_ERROR", f"limit must be at most {SEARCH_LIMIT}, was {limit}")
            groups = body.get("filterGroups") or []

            def wanted(contact: dict) -> bool:  # filter groups are ORed, filters inside a group ANDed
                return not groups or any(
                    all(_passes(contact, f) for f in g.get("filters") or []) for g in groups
                )

            found = [c for c in self.contacts.values() if not c.get("archived") and wanted(c)]
            for order in reversed(body.get("sorts") or []):  # HubSpot promises no order without one
                name = order.get("propertyName")
                found.sort(key=partial(_sort_key, name=name), reverse=order.get("direction") == "DESCENDING")
            start = int(body.get("after") or 0)
            if start + limit > SEARCH_RESULTS_CAP:
                return _error(
                    400, "VALIDATION_ERROR", f"paging past {SEARCH_RESULTS_CAP:,} results is not allowed"
                )
            page = found[start : start + limit]
            reply = {
                "total": len(found),
                "results": [self._view(c, body.get("properties") or [], []) for c in page],
            }
            if start + limit < len(found):
                reply["paging"] = {"next": {"after": str(start + limit)}}
            return jsonify(reply)

        @app.post("/crm/v3/objects/<object_type>/batch/read")
        def batch_read(object_type):
            if object_type in self.forbidden_objects:
                return _error(
                    403,
                    "MISSING_SCOPES",
                    "This app hasn't been granted all required scopes to make this call.",
                )
            if object_type in self.unavailable_objects:
                return _error(503, "SERVICE_UNAVAILABLE", "The service is temporarily unavailable.")
            if object_type in self.invalid_objects:
                return _error(400, "VALIDATION_ERROR", "Property values were not valid")
            store = self.contacts if object_type == "contacts" else self.objects.get(object_type)
            if store is None:
                return _error(400, "VALIDATION_ERROR", f"Unable to infer object type from: {object_type}")
            body = request.get_json(silent=True) or {}
            inputs = body.get("inputs") or []
            if len(inputs) > BATCH_LIMIT:
                return _too_many(len(inputs))
            wanted = body.get("properties") or []
            started = _now()
            ids = list(dict.fromkeys(str(i.get("id")) for i in inputs))
            records = {i: self._live(store, i) for i in ids}
            answered = {record["id"]: record for record in records.values() if record is not None}
            results = [self._view(record, wanted, []) for record in answered.values()]
            missing = [i for i, record in records.items() if record is None]
            return _batch(results, [_not_found(object_type, missing)] if missing else [], started)

        @app.post("/crm/v4/associations/<from_type>/<to_type>/batch/read")
        def association_batch_read(from_type, to_type):
            if "associations" in self.unavailable_objects:
                return _error(503, "SERVICE_UNAVAILABLE", "Service Unavailable")
            if {from_type, to_type} & self.forbidden_objects:
                return _error(
                    403,
                    "MISSING_SCOPES",
                    "This app hasn't been granted all required scopes to make this call.",
                )
            if (from_type, to_type) not in ASSOCIATION_TYPE_IDS:
                return _error(
                    400, "VALIDATION_ERROR", f"Unable to infer object type from: {from_type} -> {to_type}"
                )
            inputs = (request.get_json(silent=True) or {}).get("inputs") or []
            started, results, errors = _now(), [], []
            type_id = ASSOCIATION_TYPE_IDS[(from_type, to_type)]
            spec = {"category": "HUBSPOT_DEFINED", "typeId": type_id, "label": None}
            for asked in {str(i.get("id")): i for i in inputs}.values():
                from_id, start = str(asked.get("id")), int(asked.get("after") or 0)
                to_ids = self._linked(from_type, from_id, to_type)
                if to_ids:
                    end = start + (self.association_page_size or len(to_ids))
                    to = [{"toObjectId": int(i), "associationTypes": [dict(spec)]} for i in to_ids[start:end]]
                    results.append({"from": {"id": from_id}, "to": to})
                    if end < len(to_ids):
                        results[-1]["paging"] = {"next": {"after": str(end), "link": None}}
                    continue
                error = _batch_error(
                    "OBJECT_NOT_FOUND",
                    f"No {to_type} is associated with {from_type.removesuffix('s')} {from_id}.",
                    {"fromObjectId": [from_id], "toObjectType": [_type_name(to_type)]},
                )
                errors.append({**error, "subCategory": "crm.associations.NO_ASSOCIATIONS_FOUND"})
            return _batch(results, errors, started)

        @app.get("/crm/v3/properties/contacts/groups")
        def list_groups():
            return jsonify(results=list(self.groups.values()))

        def missing_schema_scope():
            return _error(403, "MISSING_SCOPES", "This app hasn't been granted all required scopes to make "
                          "this call.")  # fmt: skip

        @app.post("/crm/v3/properties/contacts/groups")
        def create_group():
            if self.schemas_read_only:
                return missing_schema_scope()
            group = request.get_json(silent=True) or {}
            if group.get("name") in self.groups:
                return _error(409, "CONFLICT", f"A property group named '{group['name']}' already exists.")
            self.groups[group["name"]] = {"archived": False, "displayOrder": -1, **group}
            return jsonify(self.groups[group["name"]]), 201

        @app.get("/crm/v3/properties/contacts")
        def list_properties():
            return jsonify(results=list(self.properties.values()))

        @app.post("/crm/v3/properties/contacts")
        def create_property():
            if self.schemas_read_only:
                return missing_schema_scope()
            prop = request.get_json(silent=True) or {}
            if prop.get("name") in self.refused_properties:
                return _error(*self.refused_properties[prop["name"]])
            if prop.get("name") in self.properties:
                return _error(
                    409,
                    "OBJECT_ALREADY_EXISTS",
                    f"Object already exists. Property {prop['name']} already exists",
                )
            if prop.get("groupName") not in self.groups:
                return _error(
                    400, "VALIDATION_ERROR", f"property group {prop.get('groupName')} does not exist"
                )
            now = _now()
            self.properties[prop["name"]] = {
                "createdAt": now,
                "updatedAt": now,
                "archived": False,
                "options": [],
                **prop,
            }
            return jsonify(self.properties[prop["name"]]), 201

        return app

    # ---- rate limiting

    def _admit(self):
        """Count an authenticated call; answer 429 when a limit is hit, else None to serve it."""
        with self._lock:
            self._authenticated.append((request.method, request.path))
            if self.locked_calls > 0:
                self.locked_calls -= 1
                return _error(423, "LOCKED", "Too many requests to sync this object; try again in 2 seconds")
            if self.migrating_retry_after_s is not None:
                body, status = _error(477, "MIGRATION_IN_PROGRESS", "Migration in progress")
                return body, status, {"Retry-After": str(self.migrating_retry_after_s)}
            if self.daily_limit_reached:
                policy = "DAILY"
            elif self.search_per_s is not None and request.path.endswith("/search") and self._search_full():
                policy = "SECONDLY"
            elif self._storm > 0:
                self._storm -= 1
                policy = "TEN_SECONDLY_ROLLING"
            elif self.rate_limit is not None:
                now = time.monotonic()
                while self._window and now - self._window[0] >= RATE_WINDOW_S:
                    self._window.popleft()
                if len(self._window) >= self.rate_limit:
                    policy = "TEN_SECONDLY_ROLLING"
                else:
                    self._window.append(now)
                    g.rate_remaining = self.rate_limit - len(self._window)
                    return None
            else:
                return None
            self.throttled += 1
        return self._too_many_requests(policy)

    def _search_full(self) -> bool:
        """Whether a search now would be past `search_per_s` (counted whether answered or not)."""
        now = time.monotonic()
        while self._searches and now - self._searches[0] >= 1.0:
            self._searches.popleft()
        self._searches.append(now)
        return len(self._searches) > self.search_per_s

    def _rate_headers(self, remaining: int) -> dict[str, str]:
        return {
            "X-HubSpot-RateLimit-Interval-Milliseconds": str(int(RATE_WINDOW_S * 1000)),
            "X-HubSpot-RateLimit-Max": str(self.rate_limit or DEFAULT_RATE_MAX),
            "X-HubSpot-RateLimit-Remaining": str(remaining),
        }

    def _too_many_requests(self, policy: str):
        daily = policy == "DAILY"
        body = {
            "status": "error",
            "message": f"You have reached your {policy.lower()} limit.",
            "errorType": "RATE_LIMIT",
            "correlationId": str(uuid.uuid4()),
            "policyName": policy,
            "groupName": "publicapi",
        }
        headers = self._rate_headers(0)
        if daily:
            headers["X-HubSpot-RateLimit-Daily"] = str(DAILY_MAX)
            headers["X-HubSpot-RateLimit-Daily-Remaining"] = "0"
        return jsonify(body), 429, headers

    # ---- writes

    def _refused(self, contact_id: str, values: dict) -> dict | None:
        """Why a write of `values` to an existing contact would be refused, or None."""
        problems = [p for name, value in values.items() if (p := self._invalid(name, value))]
        if problems:
            return {
                "category": "VALIDATION_ERROR",
                "message": f"Property values were not valid: {json.dumps(problems)}",
                "errors": [{"message": p["message"], "code": p["error"], "in": p["name"]} for p in problems],
            }
        if contact_id in self.reject:
            message = self.reject[contact_id]
            return {
                "category": "VALIDATION_ERROR",
                "message": message,
                "errors": [{"message": message, "code": "VALIDATION_RULE"}],
            }
        return None

    def _write(self, contact_id: str, values: dict) -> None:
        """Apply a validated write as HubSpot would, and echo the changed values."""
        contact = self.contacts[contact_id]
        with self._lock:
            changed = {k: str(v) for k, v in values.items() if contact["properties"].get(k) != str(v)}
            contact["properties"].update(changed)
            contact["properties"]["lastmodifieddate"] = contact["updatedAt"] = _now()
            self.writes.append((contact_id, dict(values)))
        if self.echo and changed:
            self._send_echo(contact_id, changed)

    def _linked(self, from_type: str, from_id: str, to_type: str) -> list[str]:
        """Ids associated with a live record: a contact's as it holds them; a deal's contacts are
        the contacts that name it (the emulator keeps each association once, on the contact)."""
        if from_type == "contacts":
            contact = self.contacts.get(from_id) or {}
            if contact.get("archived"):
                return []
            return list(dict.fromkeys(str(a["id"]) for a in _associations(contact, to_type)))
        if from_id not in self.objects[from_type]:
            return []
        return [
            contact_id
            for contact_id, contact in self.contacts.items()
            if not contact.get("archived")
            and any(str(a["id"]) == from_id for a in _associations(contact, from_type))
        ]

    @staticmethod
    def _live(store: dict, record_id: str) -> dict | None:
        """The record a read of this id answers with: itself, or, merged away, the record it was merged
        into (which HubSpot returns under its own id); None for one deleted or never made."""
        record = store.get(record_id)
        if record is not None and not record.get("archived"):
            return record
        return next(
            (
                other for other in store.values()
                if not other.get("archived")
                and record_id in (other["properties"].get("hs_merged_object_ids") or "").split(";")
            ),
            None,
        )  # fmt: skip

    def _view(self, record: dict, properties: list[str], associations: list[str]) -> dict:
        props = record["properties"]
        wanted = [*ALWAYS_RETURNED, *properties]
        view = {
            "id": record["id"],
            "properties": {name: props[name] for name in wanted if name in props},
            "createdAt": record["createdAt"],
            "updatedAt": record["updatedAt"],
            "archived": False,
        }
        linked = {k: v for k, v in (record.get("associations") or {}).items() if k in associations}
        if linked:
            view["associations"] = linked
        return view

    def _invalid(self, name: str, value) -> dict | None:
        definition = self.properties.get(name)
        if definition is None:
            return {
                "isValid": False,
                "message": f'Property "{name}" does not exist',
                "error": "PROPERTY_DOESNT_EXIST",
                "name": name,
            }
        if value == "":
            return None  # an empty string clears a property of any type
        if definition.get("type") == "enumeration":
            allowed = {o["value"] for o in definition.get("options", [])}
            if str(value) not in allowed:
                return {
                    "isValid": False,
                    "message": f"{value} was not one of the allowed options",
                    "error": "INVALID_OPTION",
                    "name": name,
                }
        if definition.get("type") == "number":
            try:
                float(value)
            except (TypeError, ValueError):
                return {
                    "isValid": False,
                    "message": f"{value} is not a valid number",
                    "error": "INVALID_DECIMAL",
                    "name": name,
                }
        return None

    def _send_echo(self, contact_id: str, changed: dict[str, str]) -> None:
        from integration.replay import sign_and_post

        echo = self.echo
        events = []
        for name, value in changed.items():
            self._event_id += 1
            events.append({
                "eventId": self._event_id, "subscriptionId": 2438902,
                "portalId": int(echo["portal_id"]), "appId": int(echo["app_id"]),
                "occurredAt": int(time.time() * 1000), "subscriptionType": "contact.propertyChange",
                "attemptNumber": 0, "objectId": int(contact_id), "changeSource": "INTEGRATION",
                "sourceId": echo["app_id"], "propertyName": name, "propertyValue": value,
            })  # fmt: skip

        def deliver():
            with contextlib.suppress(requests.RequestException, ValueError):  # HubSpot would retry
                response = sign_and_post(echo["url"], json.dumps(events).encode(), echo["secret"])
                self.echo_responses.append(response.json())

        threading.Thread(target=deliver, daemon=True).start()
