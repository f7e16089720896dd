"""HubSpot CRM v3 through `hubspot-api-client`: read a contact as a `Lead`, write its score."""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass

from hubspot import HubSpot
from hubspot.crm.contacts import ApiException, SimplePublicObjectInput
from hubspot.crm.objects import ApiException as ObjectsApiException
from hubspot.crm.objects import BatchReadInputSimplePublicObjectId, SimplePublicObjectId
from hubspot.crm.properties import OptionInput, PropertyCreate, PropertyGroupCreate
from urllib3.util.retry import Retry

from integration.errors import CRMError, LeadGone
from integration.hubspot import OUTPUT_PROPERTIES
from integration.lead import Lead, bounded_texts
from integration.settings import Settings

log = logging.getLogger(__name__)

CONTACT_PROPERTIES = (
    "firstname", "lastname", "email", "phone", "mobilephone", "hs_email_optout",
    "hs_email_bad_address", "jobtitle", "company", "numemployees", "industry",
    "hs_analytics_source", "hs_analytics_source_data_1", "hs_analytics_source_data_2",
    "hs_lead_status", "lifecyclestage", "num_conversion_events", "hs_analytics_num_visits",
    "hs_analytics_num_page_views", "recent_conversion_event_name", "recent_conversion_date",
    "notes_last_updated", "hs_last_sales_activity_timestamp", "hs_analytics_last_visit_timestamp",
    "hs_sales_email_last_replied",
)  # fmt: skip
TEXT_OBJECTS = {"notes": ("hs_note_body",), "emails": ("hs_email_subject", "hs_email_text")}
MAX_TEXT_RECORDS = 5
GROUP = PropertyGroupCreate(name="leadscore", label="leadscore", display_order=-1)
PROPERTY_DEFINITIONS = (
    PropertyCreate(
        name=OUTPUT_PROPERTIES["score"], label="Lead score", type="number", field_type="number",
        group_name=GROUP.name, description="Conversion propensity, 0-100 (leadscore)",
    ),
    PropertyCreate(
        name=OUTPUT_PROPERTIES["tier"], label="Lead tier", type="enumeration", field_type="select",
        group_name=GROUP.name, description="A = call first … D = nurture (leadscore)",
        options=[OptionInput(label=t, value=t, display_order=i, hidden=False)
                 for i, t in enumerate("ABCD")],
    ),
    PropertyCreate(
        name=OUTPUT_PROPERTIES["reason"], label="Lead score reason", type="string",
        field_type="text", group_name=GROUP.name, description="Why, in one line (leadscore)",
    ),
    PropertyCreate(
        name=OUTPUT_PROPERTIES["scored_at"], label="Lead scored at", type="datetime",
        field_type="date", group_name=GROUP.name, description="When the score was written",
    ),
    PropertyCreate(
        name=OUTPUT_PROPERTIES["details"], label="Lead score details", type="string",
        field_type="textarea", group_name=GROUP.name,
        description="JSON provenance: sub-scores, weights, model, evidence, fingerprint",
    ),
)  # fmt: skip
_TAG = re.compile(r"<[^>]+>")


@dataclass
class SetupReport:
    created: list[str]
    existing: list[str]


def html_to_text(value: str) -> str:
    return html.unescape(_TAG.sub(" ", value))


def _count(value: str | None) -> int:
    try:
        return int(float(value)) if value else 0
    except ValueError:
        return 0


def record_text(props: dict[str, str], fields: tuple[str, ...]) -> str:
    """A note's or email's text fields as plain text."""
    return " — ".join(html_to_text(props[f]) for f in fields if props.get(f))


def newest_texts(dated: list[tuple[str, str]]) -> tuple[str, ...]:
    """The newest texts first, bounded in count and size."""
    return bounded_texts([text for _, text in sorted(dated, reverse=True)[:MAX_TEXT_RECORDS]])


def lead_from_properties(
    contact_id: str, portal_id: str, props: dict[str, str], texts: tuple[str, ...] = ()
) -> Lead:
    """Map HubSpot contact properties onto the CRM-neutral `Lead`."""
    return Lead(
        crm="hubspot",
        account_id=portal_id,
        lead_id=contact_id,
        first_name=props.get("firstname"),
        last_name=props.get("lastname"),
        has_email=bool(props.get("email")),
        email_bad=props.get("hs_email_bad_address") == "true",
        email_opted_out=props.get("hs_email_optout") == "true",
        has_phone=bool(props.get("phone") or props.get("mobilephone")),
        title=props.get("jobtitle"),
        company=props.get("company"),
        company_size=props.get("numemployees"),
        industry=props.get("industry"),
        source=props.get("hs_analytics_source"),
        source_detail=" / ".join(
            v for k in ("hs_analytics_source_data_1", "hs_analytics_source_data_2") if (v := props.get(k))
        )
        or None,
        status=props.get("hs_lead_status"),
        stage=props.get("lifecyclestage"),
        conversions=_count(props.get("num_conversion_events")),
        visits=_count(props.get("hs_analytics_num_visits")),
        page_views=_count(props.get("hs_analytics_num_page_views")),
        recent_conversion=props.get("recent_conversion_event_name"),
        recent_conversion_at=props.get("recent_conversion_date"),
        last_activity_at=props.get("notes_last_updated") or props.get("hs_last_sales_activity_timestamp"),
        last_reply_at=props.get("hs_sales_email_last_replied"),
        texts=texts,
        current_output={key: props[name] for key, name in OUTPUT_PROPERTIES.items() if props.get(name)},
    )


class HubSpotCRM:
    """One portal, reached with one access token; every call bounded by a timeout."""

    crm = "hubspot"

    def __init__(self, settings: Settings, portal_id: str = ""):
        settings.require_hubspot_api()
        self.portal_id = portal_id
        self.timeout = settings.hubspot_timeout_s
        retry = Retry(
            total=3,
            backoff_factor=0.5,
            status_forcelist=(429, 500, 502, 503, 504),
            allowed_methods=frozenset({"GET", "PATCH", "POST"}),  # every call here is idempotent
            raise_on_status=False,
        )
        self.client = HubSpot(
            access_token=settings.hubspot_access_token,
            host=str(settings.hubspot_api_base).rstrip("/"),
            retry=retry,
        )

    def read_lead(self, contact_id: str) -> Lead:
        try:
            contact = self.client.crm.contacts.basic_api.get_by_id(
                contact_id,
                properties=[*CONTACT_PROPERTIES, *OUTPUT_PROPERTIES.values()],
                associations=list(TEXT_OBJECTS),
                archived=False,
                _request_timeout=self.timeout,
            )
        except ApiException as exc:
            if exc.status == 404:
                raise LeadGone(f"HubSpot contact {contact_id} no longer exists") from None
            raise CRMError(f"reading HubSpot contact {contact_id}: {exc.status} {exc.reason}") from exc
        texts = self._latest_texts(contact.associations or {})
        return lead_from_properties(str(contact.id), self.portal_id, contact.properties or {}, texts)

    def _latest_texts(self, associations: dict) -> tuple[str, ...]:
        """Latest notes and emails, newest first, bounded in count and size."""
        dated: list[tuple[str, str]] = []
        for object_type, fields in TEXT_OBJECTS.items():
            linked = associations.get(object_type)
            ids = sorted({a.id for a in (linked.results if linked else [])}, key=int, reverse=True)
            if not ids:
                continue
            try:
                batch = self.client.crm.objects.batch_api.read(
                    object_type,
                    BatchReadInputSimplePublicObjectId(
                        properties=[*fields, "hs_timestamp"],
                        inputs=[SimplePublicObjectId(id=i) for i in ids[:MAX_TEXT_RECORDS]],
                    ),
                    archived=False,
                    _request_timeout=self.timeout,
                )
            except ObjectsApiException as exc:  # e.g. 403 without the sales-email-read scope
                log.warning(
                    "scoring without %s: reading them answered %s %s", object_type, exc.status, exc.reason
                )
                continue
            for record in batch.results:
                props = record.properties or {}
                dated.append((props.get("hs_timestamp") or "", record_text(props, fields)))
        return newest_texts(dated)

    def write_scores(self, contact_id: str, fields: dict[str, str]) -> None:
        properties = {OUTPUT_PROPERTIES[key]: value for key, value in fields.items()}
        try:
            self.client.crm.contacts.basic_api.update(
                contact_id,
                SimplePublicObjectInput(properties=properties),
                _request_timeout=self.timeout,
            )
        except ApiException as exc:
            if exc.status == 404:
                raise LeadGone(f"HubSpot contact {contact_id} was deleted before the write") from None
            raise CRMError(f"writing HubSpot contact {contact_id}: {exc.status} {exc.body}") from exc

    def ensure_properties(self) -> SetupReport:
        """Create the leadscore property group and properties; existing ones are left alone."""
        api = self.client.crm.properties
        existing_groups = {g.name for g in api.groups_api.get_all("contacts").results}
        report = SetupReport(created=[], existing=[])
        if GROUP.name in existing_groups:
            report.existing.append(f"group {GROUP.name}")
        else:
            api.groups_api.create("contacts", GROUP)
            report.created.append(f"group {GROUP.name}")
        existing = {p.name for p in api.core_api.get_all("contacts").results}
        for definition in PROPERTY_DEFINITIONS:
            if definition.name in existing:
                report.existing.append(definition.name)
            else:
                api.core_api.create("contacts", definition)
                report.created.append(definition.name)
        return report

    def list_scored(self, contact_ids: list[str]) -> list[dict[str, str]]:
        """The rep's list view columns for these contacts, in the given order."""
        rows = []
        for contact_id in contact_ids:
            try:
                contact = self.client.crm.contacts.basic_api.get_by_id(
                    contact_id,
                    properties=["firstname", "lastname", "company", "jobtitle",
                                *OUTPUT_PROPERTIES.values()],
                    _request_timeout=self.timeout,
                )  # fmt: skip
            except ApiException as exc:
                if exc.status == 404:
                    continue
                raise
            rows.append({"id": str(contact.id), **(contact.properties or {})})
        return rows
