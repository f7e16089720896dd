"""HubSpot CRM v3 through `hubspot-api-client`: read a contact as a `Lead`, write its score."""

from __future__ import annotations

import html
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime

import urllib3
from hubspot import HubSpot
from hubspot.crm.associations.v4 import ApiException as AssociationsApiException
from hubspot.crm.associations.v4 import (
    BatchInputPublicFetchAssociationsBatchRequest,
    PublicFetchAssociationsBatchRequest,
)
from hubspot.crm.contacts import (
    ApiException,
    BatchInputSimplePublicObjectBatchInput,
    Filter,
    FilterGroup,
    PublicObjectSearchRequest,
    SimplePublicObjectBatchInput,
)
from hubspot.crm.objects import ApiException as ObjectsApiException
from hubspot.crm.objects import BatchReadInputSimplePublicObjectId, SimplePublicObjectId
from hubspot.crm.properties import ApiException as PropertiesApiException
from hubspot.crm.properties import OptionInput, PropertyCreate, PropertyGroupCreate
from redis import Redis
from urllib3.util.retry import Retry

from integration.crm import SetupReport, WriteResult, write_one
from integration.errors import CRMError, CRMUnavailable, LeadGone, RateLimited
from integration.hubspot import (
    ACTIVITY_PROPERTIES,
    BATCH_LIMIT,
    FEEDBACK_PROPERTY,
    OUTCOME_STAGES,
    OUTPUT_PROPERTIES,
    WRITTEN_PROPERTIES,
    outcome_stages,
    stage_date_property,
)
from integration.lead import FEEDBACK_VALUES, Lead, bounded_texts, field_help, moment_of, option_label
from integration.ratelimit import DEFAULT_MAX_WAIT_S, RateLimiter
from integration.settings import Settings

log = logging.getLogger(__name__)

# A contact's company facts, and the properties of its company record that hold them.
COMPANY_FACTS = {"company": "name", "numemployees": "numberofemployees", "industry": "industry"}
CONTACT_PROPERTIES = (
    "firstname", "lastname", "email", "phone", "mobilephone", "hs_email_optout",
    "hs_email_bad_address", "jobtitle", "company", "numemployees", "industry",
    "hs_analytics_source", "hs_analytics_source_data_1", "hs_analytics_source_data_2",
    "hs_lead_status", "lifecyclestage", "num_conversion_events", "hs_analytics_num_visits",
    "hs_analytics_num_page_views", "recent_conversion_event_name", "recent_conversion_date",
    "notes_last_updated", "hs_last_sales_activity_timestamp", "hs_analytics_last_visit_timestamp",
    "hs_sales_email_last_replied", "hs_merged_object_ids", "associatedcompanyid",
)  # fmt: skip
TEXT_OBJECTS = {"notes": ("hs_note_body",), "emails": ("hs_email_subject", "hs_email_text")}
MAX_TEXT_RECORDS = 5
MAX_ASSOCIATION_PAGES = 10  # of a 100 contacts' notes, emails or deals: more is a record's history, not news
SEARCH_PAGE = 200  # the search API's largest page
MAX_THROTTLED_TRIES = 8
SEARCHES_PER_S = 4  # HubSpot's own limit on its search API, a token's searches a second
THROTTLED_PUT_OFF_S = 60  # a batch still throttled after MAX_THROTTLED_TRIES waits this long
DAILY_PAUSE_S = 3600  # HubSpot resets daily limits at midnight in the portal's time zone
# 477: the portal is being moved between data hosting locations, "typically up to 24 hours".
MIGRATING, MIN_MIGRATION_WAIT_S, MAX_MIGRATION_WAIT_S = 477, 60, 86_400
# 423: a high-volume sync locked the objects; "locks will last for 2 seconds".
LOCKED, LOCKED_PAUSE_S = 423, 2.0
API_ERRORS = (ApiException, ObjectsApiException, AssociationsApiException)
GROUP = PropertyGroupCreate(name="leadscore", label="leadscore", display_order=-1)
PROPERTY_DEFINITIONS = (
    PropertyCreate(
        name=OUTPUT_PROPERTIES["score"], label="Lead score", type="number", field_type="number",
        group_name=GROUP.name, description=field_help("score", "reps"),
    ),
    PropertyCreate(
        name=OUTPUT_PROPERTIES["tier"], label="Lead tier", type="enumeration", field_type="select",
        group_name=GROUP.name, description=field_help("tier", "reps"),
        options=[OptionInput(label=t, value=t, display_order=i, hidden=False)
                 for i, t in enumerate("ABCD")],
    ),
    PropertyCreate(
        name=OUTPUT_PROPERTIES["reason"], label="Lead score reason", type="string",
        field_type="text", group_name=GROUP.name, description=field_help("reason", "reps"),
    ),
    PropertyCreate(
        name=OUTPUT_PROPERTIES["scored_at"], label="Lead scored at", type="datetime",
        field_type="date", group_name=GROUP.name, description=field_help("scored_at", "reps"),
    ),
    PropertyCreate(
        name=OUTPUT_PROPERTIES["details"], label="Lead score details", type="string",
        field_type="textarea", group_name=GROUP.name,
        description=field_help("details", "reps"),
    ),
    PropertyCreate(
        name=OUTPUT_PROPERTIES["holdout"], label="Lead score holdout", type="bool",
        field_type="booleancheckbox", group_name=GROUP.name,
        description=field_help("holdout", "reps"),
        options=[OptionInput(label="Yes", value="true", display_order=0, hidden=False),
                 OptionInput(label="No", value="false", display_order=1, hidden=False)],
    ),
    PropertyCreate(
        name=FEEDBACK_PROPERTY, label="Lead score feedback", type="enumeration", field_type="select",
        group_name=GROUP.name, description=field_help("feedback", "reps"),
        options=[OptionInput(label=option_label(value), value=value, display_order=i,
                             hidden=False) for i, value in enumerate(FEEDBACK_VALUES)],
    ),
)  # fmt: skip
_TAG = re.compile(r"<[^<>]+>")  # not <[^>]+>: n² on a run of "<"


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
    contact_id: str,
    portal_id: str,
    props: dict[str, str],
    texts: tuple[str, ...] = (),
    custom_properties: dict[str, str] | None = None,
    stages: dict[str, str] = OUTCOME_STAGES,
) -> Lead:
    """Map HubSpot contact properties onto the CRM-neutral `Lead`; `stages`: the lifecycle stages that
    are outcomes, and which."""
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
        custom={n: props[p] for n, p in (custom_properties or {}).items() if props.get(p)},
        current_output={key: props[name] for key, name in OUTPUT_PROPERTIES.items() if props.get(name)},
        feedback=props.get(FEEDBACK_PROPERTY) or None,
        outcome=stages.get(props.get("lifecyclestage") or ""),
        outcome_at=converted_at(props, stages),
        merged_ids=merged_ids(props),
    )


def merged_ids(props: dict[str, str]) -> tuple[str, ...]:
    """The ids of the contacts merged into this one (`hs_merged_object_ids`, ";"-separated)."""
    return tuple(i for i in (props.get("hs_merged_object_ids") or "").split(";") if i.isdigit())


def converted_at(props: dict[str, str], stages: dict[str, str] = OUTCOME_STAGES) -> datetime | None:
    """The earliest moment the contact entered an outcome stage, as HubSpot dates it."""
    dated = [stage_date_property(stage) for stage in stages]
    moments = [moment_of(props[p]) for p in dated if props.get(p)]
    return min((m for m in moments if m), default=None)


def _throttle(exc) -> tuple[str, float]:
    """HubSpot's 429 policy (TEN_SECONDLY_ROLLING, SECONDLY, DAILY) and how long to hold off."""
    try:
        policy = json.loads(exc.body or "{}").get("policyName", "")
    except (ValueError, AttributeError):
        policy = ""
    return policy, _retry_after_s(exc, 1.0 if policy == "SECONDLY" else 2.0)


def _retry_after_s(exc, otherwise: float) -> float:
    """The seconds HubSpot's Retry-After asks for (0 included), or `otherwise` where it does not say."""
    headers = {k.lower(): v for k, v in (exc.headers or {}).items()}
    return float(headers["retry-after"]) if headers.get("retry-after", "").isdigit() else otherwise


class HubSpotCRM:
    """One portal, reached with one access token; every call bounded by a timeout."""

    crm = "hubspot"

    def __init__(
        self,
        settings: Settings,
        portal_id: str = "",
        limiter: RateLimiter | None = None,
        telemetry: Callable[..., None] = lambda *args, **labels: None,
        custom_properties: dict[str, str] | None = None,
    ):
        """`custom_properties`: further properties a trained model reads, feature name -> property."""
        settings.require_hubspot_api()
        self.portal_id = self.account_id = portal_id
        self.custom_properties = dict(custom_properties or {})
        self.outcome_stages = outcome_stages(settings.hubspot_outcome_stages)
        self.won_pipelines = frozenset(settings.hubspot_won_pipelines)  # empty: every pipeline
        self.stage_dates = [stage_date_property(stage) for stage in self.outcome_stages]
        self.read_properties = list(dict.fromkeys([
            *CONTACT_PROPERTIES, *OUTPUT_PROPERTIES.values(), FEEDBACK_PROPERTY,
            *self.custom_properties.values(), *self.stage_dates,
        ]))  # fmt: skip
        self.limiter, self.telemetry = limiter, telemetry
        # Searches have a limit of their own, every process's together; a 429 of it holds back searches only.
        self.search_limiter = limiter.beside("search", SEARCHES_PER_S, window_s=1.0) if limiter else None
        self._merged_away: dict[str, str] = {}  # by the last read_leads: id asked for → contact that remains
        self.timeout = settings.hubspot_timeout_s
        retry = Retry(
            total=3,
            backoff_factor=0.5,
            status_forcelist=(500, 502, 503, 504),  # 429s are handled in _call, for every worker
            allowed_methods=frozenset({"GET", "PATCH", "POST"}),  # every call here is idempotent
            raise_on_status=False,
            respect_retry_after_header=False,  # 429s are _call's: it pauses every worker, not just this one
        )
        self.client = HubSpot(
            access_token=settings.hubspot_access_token,
            host=str(settings.hubspot_api_base).rstrip("/"),
            retry=retry,
        )

    def _call(self, operation: str, fn, *args, **kwargs):
        """One API call, within the shared rate limit. What a refusal does, layer by layer:
        - a 5xx or no answer is retried by urllib3 (`Retry` above); still none is CRMUnavailable, and
          the batch waits for HubSpot (workers/batch.py);
        - a 429 pauses every worker as long as HubSpot asks and the call is tried again, as is a 423
          (a sync locked the record), MAX_THROTTLED_TRIES times in all; then RateLimited puts the batch
          off THROTTLED_PUT_OFF_S, as a DAILY 429 (an hour) and a 477 (the portal moving) do at once;
        - waiting for a call slot longer than the limiter's max_wait_s is RateLimited too (ratelimit.py);
        - a 401 is CRMError: the token is wrong, and no retry helps."""
        searching = operation == "search"
        for _ in range(MAX_THROTTLED_TRIES):
            if self.limiter is not None:
                self.limiter.acquire()
            if searching and self.search_limiter is not None:
                self.search_limiter.acquire()
            self.telemetry("crm_calls_total", crm="hubspot", operation=operation)
            try:
                return fn(*args, _request_timeout=self.timeout, **kwargs)
            except API_ERRORS as exc:
                if exc.status == 401:
                    raise CRMError(_token_refused(self.portal_id)) from exc
                if exc.status == MIGRATING:
                    raise self._migrating(exc) from None
                if exc.status == LOCKED:
                    time.sleep(LOCKED_PAUSE_S)
                    continue
                if exc.status != 429:
                    raise
                self.telemetry("crm_throttled_total", crm="hubspot")
                policy, wait_s = _throttle(exc)
                if policy == "DAILY":
                    if self.limiter is not None:
                        self.limiter.pause(DAILY_PAUSE_S)  # no worker spends a call to learn it again
                    raise RateLimited(
                        f"HubSpot portal {self.portal_id}: daily API limit reached",
                        retry_after_s=DAILY_PAUSE_S,
                    ) from None
                searches_only = searching and policy == "SECONDLY"
                held = self.search_limiter if searches_only else self.limiter
                log.warning("HubSpot answered 429 (%s); every worker's %s pause %.1fs", policy,
                            "searches" if searches_only else "calls", wait_s)  # fmt: skip
                if held is not None:
                    held.pause(wait_s)
                else:
                    time.sleep(wait_s)
            except urllib3.exceptions.HTTPError as exc:  # no answer, after urllib3's own retries
                raise CRMUnavailable(f"HubSpot did not answer ({operation}): {exc}") from exc
        raise RateLimited(
            f"HubSpot portal {self.portal_id}: still throttled or locked after {MAX_THROTTLED_TRIES} tries",
            retry_after_s=THROTTLED_PUT_OFF_S,
        )

    def _migrating(self, exc) -> RateLimited:
        """The portal is moving to another data centre: no call will do until it has moved, so every
        worker holds off as long as HubSpot's Retry-After says (an hour if it does not say)."""
        wait_s = min(max(_retry_after_s(exc, DAILY_PAUSE_S), MIN_MIGRATION_WAIT_S), MAX_MIGRATION_WAIT_S)
        if self.limiter is not None:
            self.limiter.pause(wait_s)
        return RateLimited(
            f"HubSpot portal {self.portal_id or '(the token’s)'} is moving between data centres (477); "
            f"trying again in {wait_s:.0f}s",
            retry_after_s=wait_s,
        )

    def contacts_at_outcome(self, changed_since: datetime) -> Iterator[tuple[str, str, datetime | None]]:
        """(contact id, outcome, when it converted) of every contact changed since `changed_since`
        whose lifecycle stage is an outcome, 200 a search; the outcome is "won" where the contact has
        a closed-won deal the token may read."""
        if not self.outcome_stages:  # HUBSPOT_OUTCOME_STAGES took out every one: none to look for
            return
        filters = [
            Filter(property_name="lifecyclestage", operator="IN", values=list(self.outcome_stages)),
            Filter(property_name="lastmodifieddate", operator="GTE",
                   value=str(int(changed_since.timestamp() * 1000))),
        ]  # fmt: skip
        for page in self._search(filters, ["lifecyclestage", *self.stage_dates]):
            found = {str(c.id): c.properties or {} for c in page}
            stages = self.outcome_stages
            at_outcome = [i for i, props in found.items() if props.get("lifecyclestage") in stages]
            won = self._with_won_deal(at_outcome)
            for contact_id in at_outcome:
                props = found[contact_id]
                kind = "won" if contact_id in won else stages[props["lifecyclestage"]]
                yield contact_id, kind, converted_at(props, stages)

    def contact_ids(self) -> Iterator[str]:
        """Every contact's id, 200 a search: what `leadscore rescore` queues."""
        for page in self._search([], []):
            yield from (str(c.id) for c in page)

    def _search(self, filters: list[Filter], properties: list[str]) -> Iterator[list]:
        """The contacts matching every filter, a page of 200 at a time. Pages by `hs_object_id`
        rather than the `after` cursor, which HubSpot stops at 10,000."""
        last_id = "0"
        while True:
            request = PublicObjectSearchRequest(
                filter_groups=[FilterGroup(filters=[
                    *filters, Filter(property_name="hs_object_id", operator="GT", value=last_id),
                ])],
                sorts=[{"propertyName": "hs_object_id", "direction": "ASCENDING"}],
                properties=properties, limit=SEARCH_PAGE,
            )  # fmt: skip
            try:
                page = self._call("search", self.client.crm.contacts.search_api.do_search, request)
            except ApiException as exc:
                raise _failure(f"HubSpot contact search failed: {exc.status} {exc.reason}", exc) from exc
            yield page.results
            if len(page.results) < SEARCH_PAGE:
                return
            last_id = str(page.results[-1].id)

    def token_portal(self) -> str:
        """The portal the access token belongs to (HubSpot's account details), so that leads
        queued by `leadscore rescore` are filed under the portal its webhooks name."""
        try:
            details = self._call(
                "account_details",
                self.client.crm.contacts.basic_api.api_client.call_api,
                "/account-info/v3/details",
                "GET",
                header_params={"Accept": "application/json"},
                response_types_map={200: "object"},
                auth_settings=["oauth2"],
                _return_http_data_only=True,
            )
        except ApiException as exc:
            if exc.status == 403:
                raise CRMError(
                    "HubSpot refused its account details, which name the portal the token belongs to (403 "
                    "MISSING_SCOPES): give the app the oauth scope"
                ) from exc
            raise _failure(f"HubSpot account details: {exc.status} {exc.reason}", exc) from exc
        return str(details["portalId"])

    def read_lead(self, contact_id: str) -> Lead:
        """One contact, read the way a batch reads it, so both give the same scoring inputs."""
        lead = self.read_leads([contact_id]).get(contact_id)
        if lead is None:
            raise LeadGone(f"HubSpot contact {contact_id} no longer exists")
        return lead

    def read_leads(self, contact_ids: list[str]) -> dict[str, Lead]:
        """Contacts 100 a call with `batch/read`; deleted ones are simply absent (HubSpot's 207). HubSpot
        answers an id merged away with the contact that remains, under that one's id: it is noted for
        `merged_into`, not read as the contact asked for."""
        found: dict[str, dict[str, str]] = {}
        asked, self._merged_away = set(contact_ids), {}
        for start in range(0, len(contact_ids), BATCH_LIMIT):
            chunk = contact_ids[start : start + BATCH_LIMIT]
            try:
                batch = self._call(
                    "batch_read",
                    self.client.crm.contacts.batch_api.read,
                    BatchReadInputSimplePublicObjectId(
                        properties=self.read_properties,
                        inputs=[SimplePublicObjectId(id=i) for i in chunk],
                    ),
                    archived=False,
                )
            except ApiException as exc:
                raise _failure(f"HubSpot batch read failed: {exc.status} {exc.reason}", exc) from exc
            for contact in batch.results:
                contact_id, properties = str(contact.id), contact.properties or {}
                if contact_id in asked:
                    found[contact_id] = properties
                self._merged_away.update({i: contact_id for i in merged_ids(properties) if i in asked})
        self._with_company_facts(found)
        active = [i for i in found if any(found[i].get(p) for p in ACTIVITY_PROPERTIES)]
        texts = self._texts(self._associated(active)) if active else {}
        return {
            i: lead_from_properties(
                i, self.portal_id, found[i], texts.get(i, ()), self.custom_properties, self.outcome_stages
            )
            for i in contact_ids
            if i in found
        }

    def _with_company_facts(self, found: dict[str, dict[str, str]]) -> None:
        """Fill a contact's empty company name, size and industry from its primary company's record,
        where most portals keep them (enrichment fills the company, forms seldom ask the contact): one
        call a 100 contacts that lack one, none where the token may not read companies."""
        lacking = {
            i: props["associatedcompanyid"] for i, props in found.items()
            if props.get("associatedcompanyid") and not all(props.get(p) for p in COMPANY_FACTS)
        }  # fmt: skip
        companies = self._read_objects(
            "companies", sorted(set(lacking.values())), list(COMPANY_FACTS.values())
        )
        for contact_id, company_id in lacking.items():
            company = (companies or {}).get(company_id, {})
            props = found[contact_id]
            for contact_property, company_property in COMPANY_FACTS.items():
                props[contact_property] = props.get(contact_property) or company.get(company_property)

    def _associated(
        self, ids: list[str], kinds: tuple[str, ...] = tuple(TEXT_OBJECTS), of: str = "contacts"
    ) -> dict[str, dict[str, list[str]]]:
        """Associated record ids (notes and emails of contacts by default) of each record, through
        the v4 associations batch read; a kind the token may not read is left out."""
        linked: dict[str, dict[str, list[str]]] = {}
        for kind in kinds:
            for start in range(0, len(ids), BATCH_LIMIT):
                try:
                    for result in self._association_pages(of, kind, ids[start : start + BATCH_LIMIT]):
                        to_ids = linked.setdefault(str(result._from.id), {}).setdefault(kind, [])
                        to_ids += [str(t.to_object_id) for t in result.to or []]
                except AssociationsApiException as exc:
                    if (exc.status or 0) >= 500:  # HubSpot is failing: wait for it, not score without
                        raise _failure(f"HubSpot associations read failed: {exc.status}", exc) from exc
                    log.warning("scoring without some %s: associations answered %s", kind, exc.status)
        return linked

    def _association_pages(self, of: str, kind: str, ids: list[str]) -> Iterator:
        """Each record's associations of one kind, every page of them: HubSpot pages each record's
        list on its own (`paging.next.after`), the newest last. MAX_ASSOCIATION_PAGES calls at most."""
        inputs = [PublicFetchAssociationsBatchRequest(id=i) for i in ids]
        for _ in range(MAX_ASSOCIATION_PAGES):
            page = self._call(
                "associations_read",
                self.client.crm.associations.v4.batch_api.get_page,
                of,
                kind,
                BatchInputPublicFetchAssociationsBatchRequest(inputs=inputs),
            )
            inputs = []
            for result in page.results or []:
                yield result
                if result.paging is not None and result.paging.next is not None:
                    after = result.paging.next.after
                    inputs.append(PublicFetchAssociationsBatchRequest(id=str(result._from.id), after=after))
            if not inputs:
                return
        log.warning("%s of %d %s past %d pages each read no further: scored on those read", kind, len(inputs),
                    of, MAX_ASSOCIATION_PAGES)  # fmt: skip

    def _with_won_deal(self, contact_ids: list[str]) -> set[str]:
        """Which of these contacts have a closed-won deal, where the token may read deals: two calls
        a 100 (associations, then the deals)."""
        if not contact_ids:
            return set()
        linked = self._associated(contact_ids, ("deals",))
        won = self._won_deals(sorted({d for kinds in linked.values() for d in kinds.get("deals", [])}))
        return {c for c, kinds in linked.items() if won.keys() & set(kinds.get("deals", []))}

    def won_deal_leads(self, deal_ids: list[str]) -> dict[str, tuple[datetime | None, list[str]]]:
        """Each of these deals that is closed won: when it closed (its `closedate`) and its contacts.
        What a deal webhook needs: two calls a 100 (the deals, then the won ones' contacts); none
        where the token may not read deals."""
        won = self._won_deals(deal_ids)
        linked = self._associated(sorted(won), ("contacts",), of="deals") if won else {}
        return {deal: (closed, linked.get(deal, {}).get("contacts", [])) for deal, closed in won.items()}

    def _won_deals(self, deal_ids: list[str]) -> dict[str, datetime | None]:
        """The closed-won ones among these deals, in HUBSPOT_WON_PIPELINES where it is set (a renewal
        won from an existing customer is no lead converting), with their close dates; none where the
        token may not read deals."""
        deals = self._read_objects(
            "deals", deal_ids, ["hs_is_closed_won", "closedate", "pipeline"], tolerated=(403,)
        ) or {}  # fmt: skip
        return {
            deal: moment_of(props.get("closedate"))
            for deal, props in deals.items()
            if props.get("hs_is_closed_won") == "true"
            and (not self.won_pipelines or props.get("pipeline") in self.won_pipelines)
        }

    def _read_objects(
        self, kind: str, ids: list[str], properties: list[str], tolerated: tuple[int, ...] | None = None
    ) -> dict[str, dict] | None:
        """The properties of these `kind` records by id, 100 a call; None where HubSpot refuses them with
        a status in `tolerated` (any 4xx when None: a scope the token lacks), logged, so the caller goes
        on without. Another refusal, or HubSpot failing (5xx), fails the batch instead: it is retried, or
        waits for HubSpot, rather than going on without."""
        read: dict[str, dict] = {}
        for start in range(0, len(ids), BATCH_LIMIT):
            try:
                batch = self._call(
                    f"{kind}_read",
                    self.client.crm.objects.batch_api.read,
                    kind,
                    BatchReadInputSimplePublicObjectId(
                        properties=properties,
                        inputs=[SimplePublicObjectId(id=i) for i in ids[start : start + BATCH_LIMIT]],
                    ),
                    archived=False,
                )
            except ObjectsApiException as exc:
                status = exc.status or 0
                if status >= 500 or (tolerated is not None and status not in tolerated):
                    raise _failure(f"HubSpot {kind} read failed: {exc.status} {exc.reason}", exc) from exc
                log.warning("going on without %s: reading them answered %s %s", kind, exc.status, exc.reason)
                return None
            read.update({str(record.id): record.properties or {} for record in batch.results})
        return read

    def _texts(self, linked: dict[str, dict[str, list[str]]]) -> dict[str, tuple[str, ...]]:
        """Latest notes and emails per contact, newest first, bounded in count and size."""
        wanted = {
            kind: sorted({i for kinds in linked.values() for i in kinds.get(kind, [])[-MAX_TEXT_RECORDS:]})
            for kind in TEXT_OBJECTS
        }
        text_of: dict[str, tuple[str, str]] = {}
        for kind, fields in TEXT_OBJECTS.items():
            records = self._read_objects(kind, wanted[kind], [*fields, "hs_timestamp"])
            for record_id, props in (records or {}).items():  # None without sales-email-read, say
                text_of[record_id] = (props.get("hs_timestamp") or "", record_text(props, fields))
        return {
            contact: newest_texts([text_of[i] for ids in kinds.values() for i in ids if i in text_of])
            for contact, kinds in linked.items()
        }

    def merged_into(self, lead_ids: list[str]) -> dict[str, str]:
        """Of these contacts, read as gone by the last `read_leads`, the ones merged into another, by the
        id asked for: the contact that remains, which HubSpot answered with instead."""
        return {i: self._merged_away[i] for i in lead_ids if i in self._merged_away}

    def write_scores(self, contact_id: str, fields: dict[str, str]) -> None:
        write_one(self, "HubSpot contact", contact_id, fields)

    def write_many(self, writes: list[tuple[str, dict[str, str]]]) -> list[WriteResult]:
        """Score fields to many contacts, 100 a `batch/update`; a 207 names the ones that failed."""
        results: dict[str, WriteResult] = {}
        try:
            for start in range(0, len(writes), BATCH_LIMIT):
                chunk = writes[start : start + BATCH_LIMIT]
                self._write_batch(chunk, results, _Halving(budget=halving_budget(len(chunk))))
        except (RateLimited, CRMError) as exc:  # a later call of a halved batch: keep what was written
            exc.written = [r.lead_id for r in results.values() if r.ok]
            raise
        for failed in (r for r in results.values() if not r.ok):
            log.warning("HubSpot refused contact %s: %s %s", failed.lead_id, failed.code, failed.message)
        return [
            results.get(contact_id, WriteResult(contact_id, False, "NO_RESULT", "HubSpot did not report it"))
            for contact_id, _ in writes
        ]

    def _write_batch(
        self, chunk: list[tuple[str, dict[str, str]]], results: dict[str, WriteResult], halving: _Halving
    ) -> None:
        """One `batch/update`. HubSpot refuses the whole request (400) for one contact's invalid
        value, a validation rule say: its halves are written apart until that contact is found, so
        the others still get their scores. A property missing from the portal refuses every contact
        alike: each is refused at once, saying to run setup. While no half has been written, halving
        stops once its budget of calls is spent (enough to find one contact; a rule refusing every
        contact would otherwise cost two calls a contact): the halves still open are written once
        each, and one refused is refused whole, its contacts not tried alone (so not permanent)."""
        halving.calls += 1
        inputs = [
            SimplePublicObjectBatchInput(
                id=contact_id, properties={WRITTEN_PROPERTIES[k]: v for k, v in fields.items()}
            )
            for contact_id, fields in chunk
        ]
        try:
            response = self._call(
                "batch_update",
                self.client.crm.contacts.batch_api.update,
                BatchInputSimplePublicObjectBatchInput(inputs=inputs),
            )
        except ApiException as exc:
            if exc.status != 400:
                raise _failure(f"HubSpot batch update failed: {exc.status} {exc.body}", exc) from exc
            category, message, codes = _refusal(exc.body)
            halve = len(chunk) > 1 and not _setup_fix(codes)
            if halve and halving.may_halve:
                middle = len(chunk) // 2
                self._write_batch(chunk[:middle], results, halving)
                self._write_batch(chunk[middle:], results, halving)
                return
            for contact_id, _ in chunk:
                results[contact_id] = _refused(contact_id, category, message, codes, alone=not halve)
            return
        for error in getattr(response, "errors", None) or []:
            context = error.context or {}
            codes = [e.code for e in error.errors or [] if getattr(e, "code", None)]
            for contact_id in context.get("ids") or context.get("id") or []:
                results[str(contact_id)] = _refused(str(contact_id), error.category, error.message, codes)
        for contact in response.results or []:
            results.setdefault(str(contact.id), WriteResult(str(contact.id), True))
            halving.wrote = True

    def contact_properties(self) -> dict[str, list[str]]:
        """The portal's contact properties and the values of their visible options, in one call
        (`leadscore worker` asks at start)."""
        found = self._call("properties", self.client.crm.properties.core_api.get_all, "contacts")
        return {p.name: [o.value for o in p.options or () if not o.hidden] for p in found.results}

    def ensure_properties(self) -> SetupReport:
        """Create the leadscore property group and properties; existing ones are left alone."""
        try:
            return self._ensure_properties()
        except PropertiesApiException as exc:
            if exc.status == 401:
                raise CRMError(_token_refused(self.portal_id)) from exc
            if exc.status == 403:
                raise CRMError(
                    "HubSpot refused to create leadscore's properties (403 MISSING_SCOPES): give the app "
                    "the crm.schemas.contacts.read and crm.schemas.contacts.write scopes, then run "
                    "`leadscore setup hubspot` again"
                ) from exc
            if (exc.status or 0) >= 500:
                said = f"HubSpot could not create leadscore's properties: {exc.status} {exc.reason}"
                raise _failure(said, exc) from exc
            raise

    def _ensure_properties(self) -> SetupReport:
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
                continue
            try:
                api.core_api.create("contacts", definition)
            except PropertiesApiException as exc:
                if exc.status == 409:  # another setup created it since the list was read
                    report.existing.append(definition.name)
                    continue
                if exc.status in (400, 422):
                    _, message, _ = _refusal(exc.body)
                    raise CRMError(
                        f"HubSpot refused to create the contact property {definition.name} (label "
                        f"{definition.label!r}): {message or exc.reason}; fix what it names (another "
                        "property with that label, say), then run `leadscore setup hubspot` again"
                    ) from exc
                raise
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


# How long a worker waits in a batch for a HubSpot call slot: longer than the rolling window's 10 s (so a
# full window, or a secondly 429's pause, is waited out), shorter than a pause HubSpot asked for after
# a burst, which puts the batch off and frees the worker for the Salesforce org's batches meanwhile.
WORKER_MAX_WAIT_S = 15.0


def shared_limiter(
    redis: Redis, settings: Settings, portal_id: str, max_wait_s: float = DEFAULT_MAX_WAIT_S
) -> RateLimiter:
    """The portal's rolling call budget, which every worker and `leadscore rescore` take from."""
    return RateLimiter(redis, f"hubspot:{portal_id}", settings.hubspot_calls_per_10s, max_wait_s=max_wait_s)


def _token_refused(portal_id: str) -> str:
    portal = f" for portal {portal_id}" if portal_id else ""
    return (
        f"HubSpot refused HUBSPOT_ACCESS_TOKEN{portal} (401: revoked, expired or mistyped): set the "
        "app's current access token"
    )


def _failure(message: str, exc: ApiException | ObjectsApiException) -> CRMError:
    """The error for HubSpot's refusal: CRMUnavailable for a 5xx (HubSpot is down or in maintenance,
    and urllib3 has already retried), so the batch waits for HubSpot; CRMError for the rest."""
    return (CRMUnavailable if (exc.status or 0) >= 500 else CRMError)(message)


def _refusal(body: str | None) -> tuple[str, str, list[str]]:
    """A refused request's category, message and codes (its `errors`, or the invalid properties
    its message lists), read from HubSpot's error body."""
    try:
        parsed = json.loads(body or "")
    except ValueError:
        return "", str(body), []
    if not isinstance(parsed, dict):
        return "", str(body), []
    message = str(parsed.get("message", ""))
    codes = [str(e["code"]) for e in parsed.get("errors") or [] if isinstance(e, dict) and e.get("code")]
    return str(parsed.get("category", "")), message, codes or re.findall(r'"error":\s*"([A-Z_]+)"', message)


@dataclass
class _Halving:
    """A refused `batch/update`'s search for the contacts HubSpot refuses: its calls, and whether
    any half was written (then the refusals are the contacts', not a rule refusing all)."""

    budget: int
    calls: int = 0
    wrote: bool = False

    @property
    def may_halve(self) -> bool:
        """Within the budget; or, once a half was written (the refusals are the contacts' own), within
        four budgets: past that a rule refusing all but a few would cost two calls a contact."""
        return self.calls < self.budget or (self.wrote and self.calls < 4 * self.budget)


def halving_budget(contacts: int) -> int:
    """The `batch/update` calls that find one refused contact among these: two a halving, and one."""
    return 2 * math.ceil(math.log2(max(contacts, 1))) + 2


def _refused(
    contact_id: str, category: str, message: str, codes: list[str], alone: bool = True
) -> WriteResult:
    """One contact's refused write: a value HubSpot will not take stays refused (permanent), once
    it was refused for this contact `alone`; a deleted contact is gone."""
    code = f"{category} ({', '.join(codes)})" if codes else category
    return WriteResult(
        contact_id, False, code, f"{message}{_setup_fix(codes)}",
        permanent=alone and category == "VALIDATION_ERROR", gone=category == "OBJECT_NOT_FOUND",
    )  # fmt: skip


def _setup_fix(codes: object) -> str:
    """What to add to a refusal naming a property that does not exist: how to create leadscore's."""
    return (
        ": `leadscore setup hubspot` creates leadscore's properties"
        if "PROPERTY_DOESNT_EXIST" in str(codes)
        else ""
    )
