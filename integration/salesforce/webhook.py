"""Salesforce in: Outbound Messages (SOAP) and signed change events (JSON), for Leads and for
Opportunities (a won one is an outcome for the Lead converted into it).

Outbound Messages carry no signature, so `/webhooks/salesforce` requires both a
secret token in the URL and an allow-listed OrganizationId. Salesforce resends a
message until it gets `<Ack>true</Ack>`, which is answered only once every
notification is durably queued.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Callable
from typing import Literal
from xml.etree.ElementTree import Element, ParseError
from xml.sax.saxutils import escape

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring
from flask import Blueprint, Response, current_app, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from integration import signing
from integration.crm import same_account
from integration.errors import BodyTooLarge, PayloadError, SignatureError, WebhookError, first_problem
from integration.events import MAX_EPOCH_MS, IntakeRow, deal_key
from integration.queue import Skipped
from integration.salesforce import OUTPUT_FIELDS, SYSTEM_FIELDS, full_id, is_org_id, is_record_id
from integration.settings import SettingsError

log = logging.getLogger(__name__)

MAX_NOTIFICATIONS = 100
# A change-event trigger is handed up to 2,000 events at once, and its callout can only fail them all.
MAX_CHANGE_EVENTS = 2000
SOAP_NS = "http://schemas.xmlsoap.org/soap/envelope/"
OUTBOUND_NS = "http://soap.sforce.com/2005/09/outbound"
XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
OWN_FIELDS = frozenset(OUTPUT_FIELDS.values())
_CLIENT = re.compile(r";client=([^;]*)")

# A DELETE may be a merge's: the worker asks the recycle bin which Lead remains, and moves what is kept
# of the deleted one to it (nothing is scored: the one that remains has its own UPDATE).
HANDLED_CHANGES = {
    "CREATE": "creation", "UPDATE": "property_change", "UNDELETE": "creation", "DELETE": "deletion",
}  # fmt: skip
IGNORED_CHANGES = frozenset({"GAP_OVERFLOW"})  # too many changes at once: no record ids
# GAP_*: CDC lost the details, not the record; rescore (or look for a merge) to be safe.
HANDLED_CHANGES |= {f"GAP_{kind}": kind_of for kind, kind_of in list(HANDLED_CHANGES.items())}
# An opportunity's stage change may make it won: an outcome for the Lead converted into it, whose
# record no longer changes. Queued under its own key; the worker reads whether it is won.
OPPORTUNITY_OUTCOME_FIELDS = frozenset({"StageName", "IsWon", "IsClosed"})
OPPORTUNITY_CHANGES = frozenset({"UPDATE", "GAP_UPDATE"})  # a GAP_ event no longer says which fields
# The sObjects leadscore takes events of, and the key a record is queued under: a Lead's own id, an
# Opportunity's deal key. Any other is logged as unsupported (a Flow or CDC channel set up on it).
SCORED_OBJECTS: dict[str, Callable[[str], str]] = {"Lead": str, "Opportunity": deal_key}

ACK = (
    '<?xml version="1.0" encoding="UTF-8"?>'
    f'<soapenv:Envelope xmlns:soapenv="{SOAP_NS}"><soapenv:Body>'
    f'<notificationsResponse xmlns="{OUTBOUND_NS}"><Ack>true</Ack></notificationsResponse>'
    "</soapenv:Body></soapenv:Envelope>"
)


class ForbiddenOrg(WebhookError):
    """The sender authenticated, but for an organization this deployment does not serve."""

    status = 403


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(element: Element, name: str) -> Element | None:
    return next((c for c in element if _local(c.tag) == name), None)


def _text(element: Element, name: str) -> str:
    child = _child(element, name)
    return (child.text or "").strip() if child is not None else ""


def same_record(first: str, second: str) -> bool:
    """Salesforce ids compare on their case-sensitive 15-character form (18 adds a checksum)."""
    return bool(first and second) and same_account(first, second)


def api_client(change_origin: str) -> str:
    """The `client=` name in a CDC changeOrigin such as 'com/salesforce/api/rest/60.0;client=leadscore'."""
    match = _CLIENT.search(change_origin)
    return match.group(1).rstrip("/") if match else ""


def check_token(given: str | None, expected: str) -> None:
    if not given:
        raise SignatureError(
            "missing token: use the Outbound Message endpoint URL /webhooks/salesforce/<token> "
            "(or ?token=<token>) with SALESFORCE_WEBHOOK_TOKEN"
        )
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise SignatureError(
            "wrong token in the Outbound Message URL: compare it with SALESFORCE_WEBHOOK_TOKEN"
        )


def checked_org(org_id: str, allowed: frozenset[str]) -> str:
    """The org id in its 18-character form, so an org's events share one account whichever form
    each carried; refused unless it is one of SALESFORCE_ORG_IDS."""
    if not is_org_id(org_id):
        raise PayloadError(
            f"OrganizationId {org_id[:40]!r} is not a Salesforce org id (00D…, 15 characters, or 18 "
            "ending in the 15's case checksum)"
        )
    if org_id[:15] not in allowed:
        raise ForbiddenOrg(f"OrganizationId {org_id!r} is not in SALESFORCE_ORG_IDS")
    return full_id(org_id)


def parse_notifications(body: bytes) -> Element:
    """The `notifications` element of an Outbound Message, parsed with entities and DTDs refused."""
    try:
        root = fromstring(body, forbid_dtd=True)
    except DefusedXmlException as exc:
        raise PayloadError(
            f"XML with a DTD or entity declarations is refused ({type(exc).__name__}): "
            "Outbound Messages never contain one"
        ) from None
    except ParseError as exc:
        raise PayloadError(f"malformed XML: {exc}; expected a SOAP Outbound Message") from None
    body_element = _child(root, "Body") if _local(root.tag) == "Envelope" else None
    notifications = _child(body_element, "notifications") if body_element is not None else None
    if notifications is None:
        raise PayloadError("expected a SOAP Envelope whose Body holds an Outbound Message <notifications>")
    return notifications


def triage_notification(notification: Element, org_id: str) -> IntakeRow | Skipped:
    """A Lead's notification is queued whoever it names as `LastModifiedById`: Salesforce sends the
    record as it is when the message goes out, not as the change left it, so leadscore's own write
    landing in between would hide a rep's edit. The Flow's entry condition keeps leadscore's writes
    from sending messages; an echo that still comes costs one read, and the unchanged lead no write."""
    notification_id = _text(notification, "Id")
    sobject = _child(notification, "sObject")
    if not notification_id or sobject is None:
        raise PayloadError("every <Notification> needs an <Id> and an <sObject>")
    object_type = (sobject.get(XSI_TYPE) or "").rsplit(":", 1)[-1]
    record_id = _text(sobject, "Id")
    ref = f"{notification_id} ({object_type} {record_id})"
    if object_type not in SCORED_OBJECTS:
        return Skipped("unsupported", ref, f"{object_type or 'untyped'} records are not scored")
    if not record_id:
        raise PayloadError(f"notification {notification_id} has a {object_type} without an <Id>")
    if not is_record_id(record_id):
        return Skipped("unsupported", ref, f"{record_id!r} is not a Salesforce record id")
    return IntakeRow(
        account_id=org_id,
        lead_id=SCORED_OBJECTS[object_type](full_id(record_id)),
        event_id=notification_id,
        # which fields changed is not said; for an Opportunity, the worker reads whether it is won
        kind="deal_change" if object_type == "Opportunity" else "outbound_message",
        changed_fields=(),
        occurred_at_ms=int(time.time() * 1000),  # an Outbound Message carries no time of change
    )


class ChangeEventHeader(BaseModel):
    """The CDC `ChangeEventHeader`, which Flow and Apex callouts send in the same shape."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    entity_name: str = Field(alias="entityName")
    record_ids: list[str] = Field(alias="recordIds", min_length=1)
    change_type: str = Field(alias="changeType")
    changed_fields: list[str] = Field(default_factory=list, alias="changedFields")
    change_origin: str = Field("", alias="changeOrigin")
    commit_user: str = Field("", alias="commitUser")
    commit_timestamp: int = Field(alias="commitTimestamp", ge=0, le=MAX_EPOCH_MS)
    transaction_key: str = Field(alias="transactionKey", min_length=1)
    sequence_number: int = Field(alias="sequenceNumber")


class ChangeEvent(BaseModel):
    model_config = ConfigDict(extra="allow")

    ChangeEventHeader: ChangeEventHeader


class ChangeEventDelivery(BaseModel):
    organization_id: str = Field(alias="organizationId", min_length=15, max_length=18)
    events: list[ChangeEvent] = Field(min_length=1, max_length=MAX_CHANGE_EVENTS)


_EVENTS = TypeAdapter(ChangeEventDelivery)


def parse_change_events(body: bytes) -> ChangeEventDelivery:
    try:
        return _EVENTS.validate_json(body)
    except ValidationError as exc:
        raise PayloadError(
            'expected {"organizationId": "00D…", "events": [1 to 100 Lead or Opportunity change events, '
            f"each with a ChangeEventHeader]}}; {first_problem(exc)}"
        ) from None


def triage_change(
    event: ChangeEvent, org_id: str, integration_user: str, client_name: str
) -> list[IntakeRow | Skipped]:
    header = event.ChangeEventHeader
    ref = f"{header.transaction_key}/{header.sequence_number}"
    key = SCORED_OBJECTS.get(header.entity_name)
    if header.entity_name == "Lead":
        kind = HANDLED_CHANGES.get(header.change_type)
        verdict = _lead_verdict(header, integration_user, client_name)
    elif header.entity_name == "Opportunity":
        kind = "deal_change"
        verdict = _opportunity_verdict(header)
    else:
        kind, verdict = None, ("unsupported", f"{header.entity_name} changes are not scored")
    if verdict is not None:
        return [Skipped(verdict[0], f"{ref} {rid}", *verdict[1:]) for rid in header.record_ids]
    invalid = [rid for rid in header.record_ids if not is_record_id(rid)]
    if invalid:  # CDC sends wildcards like "00Q*" when a field's type changes for every record
        return [Skipped("unsupported", f"{ref} {rid}", "not a single record id") for rid in header.record_ids]
    changed = tuple(f for f in header.changed_fields if f not in SYSTEM_FIELDS)
    return [
        IntakeRow(
            account_id=org_id,
            lead_id=key(full_id(record_id)),
            event_id=f"{ref}/{record_id}",
            kind=kind,
            changed_fields=changed,
            occurred_at_ms=header.commit_timestamp,
        )
        for record_id in header.record_ids
    ]


# None: queue it; a third item True: leadscore's own write come back (Skipped.echo)
Verdict = tuple[Literal["ignore", "unsupported"], str] | tuple[Literal["ignore"], str, bool] | None


def _lead_verdict(header: ChangeEventHeader, integration_user: str, client_name: str) -> Verdict:
    if header.change_type not in HANDLED_CHANGES:
        known = header.change_type in IGNORED_CHANGES
        return ("ignore" if known else "unsupported", f"change type {header.change_type} is not scored")
    if same_record(header.commit_user, integration_user):
        return ("ignore", "change made by leadscore's integration user", True)
    if api_client(header.change_origin) == client_name:
        return ("ignore", "change made through leadscore's API client", True)
    if header.change_type == "UPDATE" and set(header.changed_fields) <= OWN_FIELDS | SYSTEM_FIELDS:
        return ("ignore", "only leadscore's own fields changed")  # by an admin, say: not an echo
    return None


def _opportunity_verdict(header: ChangeEventHeader) -> Verdict:
    if header.change_type not in OPPORTUNITY_CHANGES:
        known = header.change_type in HANDLED_CHANGES.keys() | IGNORED_CHANGES
        return ("ignore" if known else "unsupported", f"Opportunity {header.change_type} makes no outcome")
    if header.change_type == "UPDATE" and not OPPORTUNITY_OUTCOME_FIELDS & set(header.changed_fields):
        return ("ignore", "the Opportunity's stage did not change")
    return None


def soap_fault(message: str, status: int) -> Response:
    code = "soapenv:Client" if status < 500 else "soapenv:Server"
    escaped = escape(message)
    xml = (
        f'<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv="{SOAP_NS}"><soapenv:Body>'
        f"<soapenv:Fault><faultcode>{code}</faultcode><faultstring>{escaped}</faultstring></soapenv:Fault>"
        "</soapenv:Body></soapenv:Envelope>"
    )
    return Response(xml, status=status, content_type="text/xml; charset=utf-8")


bp = Blueprint("salesforce", __name__)


@bp.errorhandler(RequestEntityTooLarge)  # by code: Flask tries code handlers before class ones
@bp.errorhandler(Exception)
def _refuse(exc: Exception):
    """Every refusal of an Outbound Message is a SOAP fault (Salesforce resends until acknowledged);
    change events are refused with JSON."""
    if isinstance(exc, RequestEntityTooLarge):
        exc = BodyTooLarge(current_app.extensions["leadscore"].settings.max_body_bytes)
    if isinstance(exc, WebhookError):
        message, status = exc.message, exc.status
    elif isinstance(exc, SettingsError):
        message, status = str(exc), 503
    elif isinstance(exc, HTTPException):
        message, status = exc.description or exc.name, exc.code or 500
    else:
        log.exception("unexpected error on %s", request.path)
        message, status = f"internal error ({type(exc).__name__}); nothing was acknowledged", 500
    log.warning("refused Salesforce delivery to %s: %s", request.path, message)
    if request.path.startswith("/webhooks/salesforce/events"):
        return jsonify(error=message), status
    return soap_fault(message, status)


@bp.post("/webhooks/salesforce")
@bp.post("/webhooks/salesforce/<token>")
def receive_outbound_message(token: str | None = None):
    services = current_app.extensions["leadscore"]
    settings = services.settings
    settings.require_salesforce_outbound()
    check_token(token or request.args.get("token"), settings.salesforce_webhook_token)
    notifications = parse_notifications(services.body(request))
    org_id = checked_org(_text(notifications, "OrganizationId"), settings.allowed_org_ids)
    items = [n for n in notifications if _local(n.tag) == "Notification"]
    if not items:
        raise PayloadError("the Outbound Message holds no <Notification> elements")
    if len(items) > MAX_NOTIFICATIONS:
        raise PayloadError(f"expected at most {MAX_NOTIFICATIONS} notifications, got {len(items)}")
    triaged = [triage_notification(n, org_id) for n in items]
    summary = services.hand_off("salesforce", triaged)
    log.info("outbound message from %s: %s", org_id, summary)
    return Response(ACK, status=200, content_type="text/xml; charset=utf-8")


@bp.post("/webhooks/salesforce/events")
def receive_change_events():
    services = current_app.extensions["leadscore"]
    settings = services.settings
    settings.require_salesforce_events()
    body = services.body(request)
    signing.verify(
        settings.salesforce_events_secret,
        body,
        request.headers.get(signing.TIMESTAMP_HEADER),
        request.headers.get(signing.SIGNATURE_HEADER),
    )
    delivery = parse_change_events(body)
    org_id = checked_org(delivery.organization_id, settings.allowed_org_ids)
    triaged = [
        item
        for event in delivery.events
        for item in triage_change(
            event,
            org_id,
            settings.salesforce_integration_user_id,
            settings.salesforce_client_name,
        )
    ]
    return jsonify(services.hand_off("salesforce", triaged))
