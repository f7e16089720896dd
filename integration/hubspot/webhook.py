"""`POST /webhooks/hubspot`: verify the v3 signature, normalise, drop noise, enqueue.

Event tables follow Zulip's webhook style: what we handle, what we ignore on
purpose; anything else is logged as unsupported and still acknowledged, so
HubSpot does not retry it forever.
"""

from __future__ import annotations

import logging
import re
import time

from flask import Blueprint, current_app, jsonify, request
from hubspot.exceptions import InvalidSignatureTimestampError
from hubspot.utils.signature import Signature
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from integration.errors import PayloadError, SignatureError, first_problem
from integration.events import ERASE, MAX_EPOCH_MS, IntakeRow, deal_key
from integration.hubspot import DEAL_OUTCOME_PROPERTIES, OUTPUT_PROPERTIES, SHOWN_PROPERTIES
from integration.queue import Skipped

log = logging.getLogger(__name__)

CONTACT_OBJECT_TYPE = "0-1"
DEAL_OBJECT_TYPE = "0-3"
MERGE = "merge"
MAX_EVENTS = 100
TIMESTAMP_TOLERANCE_MS = 300_000  # HubSpot's documented 5 minutes

HANDLED_EVENTS = {
    "contact.creation": "creation",
    "contact.propertyChange": "property_change",
    "object.creation": "creation",
    "object.propertyChange": "property_change",
    "deal.propertyChange": "deal_change",  # a stage change: closed won is an outcome for its contacts
    "contact.privacyDeletion": ERASE,  # a GDPR delete: leadscore's copies of the contact go too
    "contact.merge": MERGE,  # the contact that remains holds both records' data: it is scored
    "object.merge": MERGE,
}
IGNORED_EVENTS = frozenset(
    {
        # Nothing left to score, or the change arrives again as property changes.
        "contact.deletion",  # restorable for 90 days; a GDPR delete comes as contact.privacyDeletion too
        "contact.restore",
        "contact.associationChange",
        "object.deletion",
        "object.restore",
        "object.associationChange",
        # Other objects: leadscore scores contacts only.
        "company.creation",
        "company.deletion",
        "company.propertyChange",
        "company.associationChange",
        "deal.creation",
        "deal.deletion",
        "deal.associationChange",
        "conversation.creation",
        "conversation.deletion",
        "conversation.newMessage",
        "conversation.propertyChange",
    }
)
OWN_PROPERTIES = frozenset(OUTPUT_PROPERTIES.values())

# HubSpot signs the URI with these characters decoded (its v3 signature docs).
_DECODED_IN_SIGNATURE = {
    "%3A": ":", "%2F": "/", "%3F": "?", "%40": "@", "%21": "!", "%24": "$",
    "%27": "'", "%28": "(", "%29": ")", "%2A": "*", "%2C": ",", "%3B": ";",
}  # fmt: skip
_MILLISECONDS = re.compile(r"[0-9]{1,15}")
_ENCODED = re.compile("|".join(_DECODED_IN_SIGNATURE), re.IGNORECASE)


class HubSpotEvent(BaseModel):
    """One element of HubSpot's webhook array, as its docs describe it. Ids are whole numbers above
    zero as sent: `true`, `"743"` or `743.0` is not taken for a contact."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    event_id: int = Field(alias="eventId", strict=True, gt=0)
    subscription_id: int = Field(alias="subscriptionId", strict=True, gt=0)
    portal_id: int = Field(alias="portalId", strict=True, gt=0)
    app_id: int = Field(alias="appId", strict=True, gt=0)
    occurred_at: int = Field(
        alias="occurredAt", strict=True, ge=0, le=MAX_EPOCH_MS, description="epoch milliseconds"
    )
    subscription_type: str = Field(alias="subscriptionType")
    attempt_number: int = Field(0, alias="attemptNumber", strict=True, ge=0)
    object_id: int | None = Field(None, alias="objectId", strict=True, gt=0)
    object_type_id: str | None = Field(None, alias="objectTypeId")
    change_source: str | None = Field(None, alias="changeSource")
    source_id: str | None = Field(None, alias="sourceId")
    property_name: str | None = Field(None, alias="propertyName")
    property_value: str | None = Field(None, alias="propertyValue")
    primary_object_id: int | None = Field(None, alias="primaryObjectId", strict=True, gt=0)
    new_object_id: int | None = Field(None, alias="newObjectId", strict=True, gt=0)


class _Typed(BaseModel):
    """What every element must be, whatever its type: an object naming its subscription type."""

    model_config = ConfigDict(extra="allow")

    subscriptionType: str  # noqa: N815 (HubSpot's own name)


_DELIVERY = TypeAdapter(list[HubSpotEvent])
_ELEMENTS = TypeAdapter(list[_Typed])
_EXPECTED = (
    "expected a JSON array of HubSpot webhook events (objects with eventId, subscriptionType, "
    "portalId, objectId, …)"
)


def signed_uri(url: str) -> str:
    return _ENCODED.sub(lambda m: _DECODED_IN_SIGNATURE[m.group(0).upper()], url)


def verify_signature(
    *, secret: str, method: str, uri: str, body: bytes, signature: str | None, timestamp: str | None
) -> None:
    """Raise `SignatureError` unless HubSpot's v3 signature over the raw body checks out."""
    if not signature:
        raise SignatureError(
            "missing X-HubSpot-Signature-v3 header: only HubSpot's v3-signed deliveries are accepted"
        )
    if not timestamp:
        raise SignatureError("missing X-HubSpot-Request-Timestamp header (epoch milliseconds)")
    stale = SignatureError(
        f"X-HubSpot-Request-Timestamp {timestamp[:32]!r} is not within 5 minutes of now: "
        "a replayed delivery or a wrong clock"
    )
    if (
        not _MILLISECONDS.fullmatch(timestamp)
        or abs(time.time() * 1000 - int(timestamp)) > TIMESTAMP_TOLERANCE_MS
    ):
        raise stale
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureError("body is not UTF-8, so it cannot carry a HubSpot signature") from None
    try:
        valid = signature.isascii() and Signature.is_valid(
            signature=signature,
            client_secret=secret,
            request_body=text,
            http_uri=signed_uri(uri),
            http_method=method,
            signature_version="v3",
            timestamp=timestamp,
        )
    except InvalidSignatureTimestampError:
        raise stale from None
    if not valid:
        raise SignatureError(
            "X-HubSpot-Signature-v3 does not match: check that HUBSPOT_APP_SECRET is this app's "
            f"client secret and that {uri} is the exact URL HubSpot posts to (set PUBLIC_BASE_URL "
            "behind a proxy)"
        )


def parse_delivery(body: bytes) -> list[HubSpotEvent | Skipped]:
    """The delivery's events. An event that does not fit `HubSpotEvent` is refused only when its type
    is one leadscore scores: one of any other type is not scored whatever its shape, and an unknown
    type is logged and acknowledged, not a reason to refuse the events beside it."""
    try:
        events: list[HubSpotEvent | Skipped] = _DELIVERY.validate_json(body)
    except ValidationError:
        events = _parse_each(body)
    if not events:
        raise PayloadError("expected a JSON array of 1 to 100 HubSpot webhook events, got []")
    if len(events) > MAX_EVENTS:
        raise PayloadError(f"expected at most {MAX_EVENTS} events in one delivery, got {len(events)}")
    return events


def _parse_each(body: bytes) -> list[HubSpotEvent | Skipped]:
    """Element by element, for a delivery that did not fit as a whole (the rare, slower path)."""
    try:
        elements = _ELEMENTS.validate_json(body)
    except ValidationError as exc:
        raise PayloadError(f"{_EXPECTED}; {first_problem(exc)}") from None
    events: list[HubSpotEvent | Skipped] = []
    for index, element in enumerate(elements):
        fields = element.model_dump()
        ref = f"{fields.get('eventId')} ({element.subscriptionType}, object {fields.get('objectId')})"
        if unscored := _unscored(element.subscriptionType, ref):
            events.append(unscored)
            continue
        try:
            events.append(HubSpotEvent.model_validate(fields))
        except ValidationError as exc:  # refused alone: HubSpot never sends again what gets a 4xx
            events.append(Skipped("malformed", ref, f"{_EXPECTED}; {first_problem(exc, within=index)}"))
    return events


def _unscored(subscription_type: str, ref: str) -> Skipped | None:
    """Why events of this type are not scored; None for a type leadscore scores."""
    if subscription_type in HANDLED_EVENTS:
        return None
    if subscription_type in IGNORED_EVENTS:
        return Skipped("ignore", ref, f"{subscription_type} is not scored")
    return Skipped("unsupported", ref, f"unsupported subscription type {subscription_type!r}")


def triage(event: HubSpotEvent, own_app_id: str) -> IntakeRow | Skipped:
    """Score the contact this event is about, or say why not. Runs for every event, so it is lean."""
    kind = HANDLED_EVENTS.get(event.subscription_type)
    if kind is None:
        return _unscored(event.subscription_type, _ref(event))
    if event.subscription_type.startswith("object."):
        if kind == "property_change" and event.object_type_id == DEAL_OBJECT_TYPE:
            kind = "deal_change"
        elif event.object_type_id != CONTACT_OBJECT_TYPE:
            return _skipped(event, "ignore", f"object type {event.object_type_id} is not a contact")
    if kind == MERGE:  # HubSpot may give the contact that remains a new id
        survivor = event.new_object_id or event.primary_object_id or event.object_id
        if survivor is None:
            return _skipped(event, "ignore", "merge names no newObjectId, primaryObjectId or objectId")
        return _row(event, str(survivor), kind)
    if event.object_id is None:
        return _skipped(event, "ignore", "event names no objectId")
    if kind == ERASE:
        return _row(event, str(event.object_id), kind)
    if kind == "deal_change":
        if event.property_name not in DEAL_OUTCOME_PROPERTIES:
            return _skipped(event, "ignore", f"deal property {event.property_name} does not make an outcome")
        return _row(event, deal_key(str(event.object_id)), kind)
    ours = event.change_source == "INTEGRATION" and event.source_id == own_app_id
    if kind == "property_change" and event.property_name in OWN_PROPERTIES:
        if ours or event.property_name not in SHOWN_PROPERTIES:
            return _skipped(event, "ignore", f"{event.property_name} is leadscore's own output", echo=ours)
    elif ours:
        return _skipped(event, "ignore", "change made by leadscore itself", echo=True)
    return _row(event, str(event.object_id), kind)


def _row(event: HubSpotEvent, key: str, kind: str) -> IntakeRow:
    changed = event.property_name
    # Positional: the web builds one an event, and keywords cost a NamedTuple a third more.
    # The event id: eventId alone is not guaranteed unique; a redelivery repeats both.
    return IntakeRow(
        str(event.portal_id), key, f"{event.event_id}@{event.occurred_at}", kind,
        (changed,) if changed else (), event.occurred_at,
    )  # fmt: skip


def _ref(event: HubSpotEvent) -> str:
    return f"{event.event_id} ({event.subscription_type}, object {event.object_id})"


def _skipped(event: HubSpotEvent, verdict: str, detail: str, echo: bool = False) -> Skipped:
    return Skipped(verdict, _ref(event), detail, echo)


bp = Blueprint("hubspot", __name__)


@bp.post("/webhooks/hubspot")
def receive():
    services = current_app.extensions["leadscore"]
    settings = services.settings
    settings.require_hubspot_webhook()
    body = services.body(request)
    verify_signature(
        secret=settings.hubspot_app_secret,
        method=request.method,
        uri=services.public_url(request),
        body=body,
        signature=request.headers.get("X-HubSpot-Signature-v3"),
        timestamp=request.headers.get("X-HubSpot-Request-Timestamp"),
    )
    events = parse_delivery(body)

    own_app_id = settings.hubspot_app_id
    triaged = [e if isinstance(e, Skipped) else triage(e, own_app_id or str(e.app_id)) for e in events]
    summary = services.hand_off("hubspot", triaged)
    if malformed := [e.detail for e in events if isinstance(e, Skipped) and e.verdict == "malformed"]:
        raise PayloadError(_refusal(malformed, summary["queued"]))
    return jsonify(summary)


def _refusal(problems: list[str], queued: int) -> str:
    """A 400 for the events not the shape HubSpot sends, once the others are queued: HubSpot retries
    no 4xx, so refusing the whole delivery would lose the events beside them."""
    more = f" (and {len(problems) - 1} more such events)" if len(problems) > 1 else ""
    if not queued:
        return problems[0] + more
    others = "1 other event was" if queued == 1 else f"{queued} other events were"
    return f"{problems[0]}{more}; the delivery's {others} queued"
