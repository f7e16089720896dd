"""An emulator of the HubSpot CRM v3 endpoints leadscore uses, seeded from fixtures.

Behaves like HubSpot where it matters to the integration: bearer auth, only the
requested properties returned, 404 for unknown contacts, writes refused for
properties that do not exist or values outside an enumeration, and (optionally)
the property-change webhooks HubSpot sends back after an integration's write.
"""

from __future__ import annotations

import contextlib
import copy
import json
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import requests
from flask import Flask, jsonify, request

ALWAYS_RETURNED = (
    "createdate",
    "hs_createdate",
    "hs_object_id",
    "lastmodifieddate",
    "hs_lastmodifieddate",
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _error(status: int, category: str, message: str):
    body = {
        "status": "error",
        "message": message,
        "correlationId": str(uuid.uuid4()),
        "category": category,
    }
    return jsonify(body), status


def _list_arg(name: str) -> list[str]:
    return [v for raw in request.args.getlist(name) for v in raw.split(",") if v]


class HubSpotEmulator:
    def __init__(self, token: str = "emulator-token", latency_s: float = 0.0):
        self.token = token
        self.latency_s = latency_s
        self.contacts: dict[str, dict] = {}
        self.objects: dict[str, dict[str, dict]] = {"notes": {}, "emails": {}}
        self.groups: dict[str, dict] = {
            "contactinformation": {"name": "contactinformation", "label": "Contact information"}
        }
        self.properties: dict[str, dict] = {}
        self.writes: list[tuple[str, dict]] = []
        self.calls: list[tuple[str, str]] = []
        self.echo: dict | None = None
        self.echo_responses: list[dict] = []
        self.forbidden_objects: set[str] = set()  # object types the token lacks the scope for
        self._lock = threading.Lock()
        self._event_id = 9_000_000_000

    # ---- seeding and inspection (used by tests and the demo, not over HTTP)

    def load_fixtures(self, directory: Path) -> HubSpotEmulator:
        directory = Path(directory)
        for path in sorted(directory.glob("contact__*.json")):
            self.add_contact(json.loads(path.read_text()))
        for kind in self.objects:
            for path in sorted(directory.glob(f"{kind[:-1]}__*.json")):
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
                contact = self.contacts.get(str(event.get("objectId")))
                if contact and event.get("propertyName") and event.get("changeSource") != "INTEGRATION":
                    contact["properties"][event["propertyName"]] = event.get("propertyValue") or ""
                    contact["properties"]["lastmodifieddate"] = contact["updatedAt"] = _now()

    def echo_writes_to(self, url: str, app_secret: str, app_id: str, portal_id: str) -> None:
        """After each write, post the property-change webhooks HubSpot would send."""
        self.echo = {"url": url, "secret": app_secret, "app_id": app_id, "portal_id": portal_id}

    @staticmethod
    def _standard_property(name: str) -> dict:
        return {
            "name": name,
            "label": name,
            "type": "string",
            "fieldType": "text",
            "groupName": "contactinformation",
            "options": [],
        }

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
            return None

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
            problems = [p for name, value in values.items() if (p := self._invalid(name, value))]
            if problems:
                return _error(
                    400, "VALIDATION_ERROR", f"Property values were not valid: {json.dumps(problems)}"
                )
            with self._lock:
                changed = {k: str(v) for k, v in values.items() if contact["properties"].get(k) != str(v)}
                contact["properties"].update(changed)
                contact["properties"]["lastmodifieddate"] = contact["updatedAt"] = _now()
                self.writes.append((contact_id, dict(values)))
            if self.echo and changed:
                self._send_echo(contact_id, changed)
            return jsonify(self._view(contact, list(values), []))

        @app.post("/crm/v3/objects/<object_type>/batch/read")
        def batch_read(object_type):
            if object_type in self.forbidden_objects:
                return _error(
                    403,
                    "MISSING_SCOPES",
                    "This app hasn't been granted all required scopes to make this call.",
                )
            store = self.contacts if object_type == "contacts" else self.objects.get(object_type)
            if store is None:
                return _error(400, "VALIDATION_ERROR", f"Unable to infer object type from: {object_type}")
            body = request.get_json(silent=True) or {}
            wanted = body.get("properties") or []
            started = _now()
            results = [
                self._view(store[i["id"]], wanted, []) for i in body.get("inputs", []) if i.get("id") in store
            ]
            return jsonify(status="COMPLETE", results=results, startedAt=started, completedAt=_now())

        @app.get("/crm/v3/properties/contacts/groups")
        def list_groups():
            return jsonify(results=list(self.groups.values()))

        @app.post("/crm/v3/properties/contacts/groups")
        def create_group():
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
            prop = request.get_json(silent=True) or {}
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
