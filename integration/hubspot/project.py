"""The HubSpot developer-platform project that installs leadscore in one portal.

HubSpot stopped letting anyone create a private app on October 26, 2026; an integration for one
portal is now a project-based app with static auth, uploaded with the HubSpot CLI. Its subscriptions
are the handler's events and the properties the reader asks for, as listed below; a test holds them to
`HANDLED_EVENTS` and `CONTACT_PROPERTIES`, so a property the score starts reading cannot be left out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

from integration.errors import UserError
from integration.hubspot import ACTIVITY_PROPERTIES, FEEDBACK_PROPERTY, SHOWN_PROPERTIES

PLATFORM_VERSION = "2026.09"
APP_UID = "leadscore"
# Whose change can move the score. Left out: names (never scored), the outcome dates (a stage change
# comes with them as a lifecyclestage change) and the merged ids (a merge comes as contact.merge).
RESCORING_PROPERTIES = (
    "hs_lead_status", "lifecyclestage", "hs_analytics_source", "recent_conversion_event_name",
    "num_conversion_events", "jobtitle", "numemployees", "industry", "company", "email", "phone",
    "mobilephone", "hs_email_optout", "hs_email_bad_address", "associatedcompanyid",
)  # fmt: skip
# Change with every visit: subscribed only when asked (--with-engagement); read afresh at the next event.
ENGAGEMENT_PROPERTIES = (
    "hs_analytics_num_visits", "hs_analytics_num_page_views", "hs_analytics_source_data_1",
    "hs_analytics_source_data_2", "recent_conversion_date", "hs_analytics_last_visit_timestamp",
)  # fmt: skip
REQUIRED_SCOPES = (
    "oauth",  # GET /account-info/v3/details, which tells `leadscore rescore` its portal
    "crm.objects.contacts.read",
    "crm.objects.contacts.write",
    "crm.schemas.contacts.read",  # the properties are listed at setup and at every worker start
    "crm.schemas.contacts.write",  # `leadscore setup hubspot` creates them
    "crm.objects.deals.read",  # a closed-won deal is an outcome of its contacts
)
OPTIONAL_SCOPES = (
    "sales-email-read",  # email bodies for the LLM; without it, scored without them
    "crm.objects.companies.read",  # a contact's company size and industry, where only its company has them
)
DEAL_STAGE = "dealstage"  # a deal's move to closed won; the worker reads whether it is won
_INTERNAL_NAME = re.compile(r"[a-z][a-z0-9_]*")


def project_files(
    target_url: str, with_engagement: bool = False, extra_properties: tuple[str, ...] = ()
) -> dict:
    """Each file of the project, by its path, as JSON."""
    scheme, host, path, _, _ = urlsplit(target_url)
    if scheme != "https" or not host or not path.endswith("/webhooks/hubspot"):
        raise UserError(
            f"--target-url must be leadscore's public HTTPS webhook, https://<host>/webhooks/hubspot, got "
            f"{target_url!r}: HubSpot posts only to HTTPS, and signs the exact URL"
        )
    if misnamed := [name for name in extra_properties if not _INTERNAL_NAME.fullmatch(name)]:
        raise UserError(
            f"--property {misnamed[0]!r} is not a HubSpot property's internal name (lower-case letters, "
            "digits and underscores, as Settings > Properties shows it)"
        )
    watched = (
        *RESCORING_PROPERTIES,
        *ACTIVITY_PROPERTIES,
        FEEDBACK_PROPERTY,
        *SHOWN_PROPERTIES,
        *(ENGAGEMENT_PROPERTIES if with_engagement else ()),
        *extra_properties,
    )
    legacy = [
        {"subscriptionType": "contact.creation", "active": True},
        *(
            {"subscriptionType": "contact.propertyChange", "propertyName": name, "active": True}
            for name in dict.fromkeys(watched)
        ),
        {"subscriptionType": "contact.merge", "active": True},
        {"subscriptionType": "deal.propertyChange", "propertyName": DEAL_STAGE, "active": True},
    ]
    app = {
        "uid": APP_UID,
        "type": "app",
        "config": {
            "name": "leadscore",
            "description": "Writes a lead score (0-100), an A-D tier and a one-line reason to every contact, "
            "within seconds of its creation or change.",
            "distribution": "private",
            "auth": {
                "type": "static",
                "requiredScopes": list(REQUIRED_SCOPES),
                "optionalScopes": list(OPTIONAL_SCOPES),
                "conditionallyRequiredScopes": [],
            },
            "permittedUrls": {"fetch": [], "iframe": [], "img": []},
        },
    }
    webhooks = {
        "uid": f"{APP_UID}_webhooks",
        "type": "webhooks",
        "config": {
            "settings": {"targetUrl": target_url, "maxConcurrentRequests": 10},
            "subscriptions": {
                "legacyCrmObjects": legacy,
                "hubEvents": [{"subscriptionType": "contact.privacyDeletion", "active": True}],
            },
        },
    }
    return {
        "hsproject.json": {"name": "leadscore", "srcDir": "src", "platformVersion": PLATFORM_VERSION},
        "src/app/app-hsmeta.json": app,
        "src/app/webhooks/webhooks-hsmeta.json": webhooks,
    }


def write_project(out: Path, files: dict) -> list[Path]:
    """Write the project under `out`, which must not hold one already (an upload replaces the app)."""
    if (out / "hsproject.json").exists():
        raise UserError(f"{out} already holds a HubSpot project: give a new --out, or delete it first")
    written = []
    for name, content in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written
