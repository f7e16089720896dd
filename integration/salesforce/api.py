"""Salesforce REST through `simple-salesforce`: read a Lead as a `Lead`, write its score.

Writes go through sObject Collections (`PATCH composite/sobjects`, up to 200
records, allOrNone false), so one record's failure never blocks the others, and
every call names leadscore in `Sforce-Call-Options` so its own changes can be
recognised when they come back as change events.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import suppress
from datetime import UTC, datetime
from typing import NamedTuple, TypeVar

import requests
from redis import Redis
from redis.exceptions import RedisError
from simple_salesforce import Salesforce
from simple_salesforce.exceptions import (
    SalesforceAuthenticationFailed,
    SalesforceError,
    SalesforceExpiredSession,
)

from integration.crm import SetupReport, WriteResult, write_one
from integration.errors import CRMError, CRMUnavailable, LeadGone, RateLimited
from integration.lead import FEEDBACK_VALUES, Lead, bounded_texts, field_help, option_label
from integration.salesforce import (
    BATCH_LIMIT,
    FEEDBACK_FIELD,
    OUTPUT_FIELDS,
    SCORED_PICKLISTS,
    WRITTEN_FIELDS,
    full_id,
    is_record_id,
)
from integration.settings import Settings, SettingsError

log = logging.getLogger(__name__)
T = TypeVar("T")

LEAD_FIELDS = (
    "Id", "FirstName", "LastName", "Email", "Phone", "MobilePhone", "HasOptedOutOfEmail", "DoNotCall",
    "EmailBouncedReason", "Title", "Company", "NumberOfEmployees", "Industry", "LeadSource", "Status",
    "Rating", "Description", "IsConverted", "ConvertedOpportunityId", "LastActivityDate",
)  # fmt: skip
TASK_FIELDS = ("Subject", "Description", "ActivityDate", "CreatedDate")
MAX_TASKS = 5
# Each Lead's own latest Tasks, by the relationship subquery: one query, however busy another Lead is.
LATEST_TASKS = f"(SELECT {', '.join(TASK_FIELDS)} FROM Tasks ORDER BY CreatedDate DESC LIMIT {MAX_TASKS})"
MAX_MERGE_HOPS = 3  # a merged-away Lead's winner, merged away in turn, followed this far
# Salesforce's per-record status codes that retrying the same write cannot fix.
PERMANENT_CODES = frozenset(
    {
        "FIELD_CUSTOM_VALIDATION_EXCEPTION", "INVALID_FIELD", "INVALID_FIELD_FOR_INSERT_UPDATE",
        "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST", "STRING_TOO_LONG", "INSUFFICIENT_ACCESS_OR_READONLY",
        "INSUFFICIENT_ACCESS_ON_CROSS_REFERENCE_ENTITY", "FIELD_INTEGRITY_EXCEPTION", "INVALID_TYPE",
        "DUPLICATES_DETECTED", "REQUIRED_FIELD_MISSING",
    }
)  # fmt: skip
GONE_CODES = frozenset({"ENTITY_IS_DELETED", "CANNOT_UPDATE_CONVERTED_LEAD", "INVALID_CROSS_REFERENCE_KEY"})


# `description` is for admins (Setup shows it); `inlineHelpText` is what reps see, at the field's "i".
FIELD_DEFINITIONS: dict[str, dict] = {
    OUTPUT_FIELDS["score"]: {
        "label": "Lead Score", "type": "Number", "precision": 3, "scale": 0,
        "description": field_help("score", "admins"),
        "inlineHelpText": field_help("score", "reps"),
    },
    OUTPUT_FIELDS["tier"]: {
        "label": "Lead Tier", "type": "Picklist", "values": ["A", "B", "C", "D"],
        "description": field_help("tier", "admins"),
        "inlineHelpText": field_help("tier", "reps"),
    },
    OUTPUT_FIELDS["reason"]: {
        "label": "Lead Score Reason", "type": "Text", "length": 255,
        "description": field_help("reason", "admins"),
        "inlineHelpText": field_help("reason", "reps"),
    },
    OUTPUT_FIELDS["scored_at"]: {
        "label": "Lead Scored At", "type": "DateTime",
        "description": field_help("scored_at", "admins"),
        "inlineHelpText": field_help("scored_at", "reps"),
    },
    OUTPUT_FIELDS["details"]: {
        "label": "Lead Score Details", "type": "LongTextArea", "length": 32768, "visibleLines": 5,
        "description": field_help("details", "admins"),
        "inlineHelpText": field_help("details", "reps"),
    },
    OUTPUT_FIELDS["holdout"]: {
        "label": "Lead Score Holdout", "type": "Checkbox", "defaultValue": "false",
        "description": field_help("holdout", "admins"),
        "inlineHelpText": field_help("holdout", "reps"),
    },
    FEEDBACK_FIELD: {
        "label": "Lead Score Feedback", "type": "Picklist", "values": list(FEEDBACK_VALUES),
        "description": field_help("feedback", "admins"),
        "inlineHelpText": field_help("feedback", "reps"),
    },
}  # fmt: skip

ADMIN_STEPS = (
    f"Grant field-level security on the {len(FIELD_DEFINITIONS)} Leadscore fields: read/write for "
    "leadscore's integration user's profile or permission set; for the reps' profiles read-only, except "
    "Lead Score Feedback, which reps edit "
    "(Setup > Object Manager > Lead > Fields & Relationships > each field > Set Field-Level Security).",
    "Give that profile or permission set Read on Opportunity, so a Lead converted into an opportunity "
    "that is won counts as won, not only converted.",
    "Add Lead Score, Lead Tier and Lead Score Reason as columns of the reps' Lead list views, and Lead "
    "Score Holdout while HOLDOUT_SHARE is above 0: a held-out lead's score is blank on purpose "
    "(list view > gear > Select Fields to Display).",
    "Put Lead Score Feedback on the reps' Lead page layout, so they can say a score is too high, too low "
    "or right (Setup > Object Manager > Lead > Page Layouts).",
    "Point an Outbound Message (a Flow on Lead create/edit, entry condition LastModifiedById is not the "
    "integration user, run every time a record is updated and meets the condition) at "
    "https://<your host>/webhooks/salesforce/<SALESFORCE_WEBHOOK_TOKEN> with field Id, "
    "or send signed change events to /webhooks/salesforce/events (see the README).",
    "Send won opportunities the same way (an Outbound Message with field Id from a Flow on Opportunity "
    "updated, entry condition StageName changed to a won stage, run only when a record is updated to meet "
    "the condition; or its change events), so an opportunity won after its Lead converted counts as that "
    "Lead's win.",
)


class ObjectUnreadable(CRMError):
    """The query names an object the integration user may not read (Salesforce's INVALID_TYPE)."""


def _errors(exc: SalesforceError) -> list[dict]:
    """The errors of a Salesforce REST error answer (a JSON list of errorCode and message)."""
    content = exc.content if isinstance(exc.content, list) else []
    return [error for error in content if isinstance(error, dict)]


def _error_codes(exc: SalesforceError) -> set[str]:
    return {error.get("errorCode", "") for error in _errors(exc)}


def _said(exc: SalesforceError) -> str:
    """What Salesforce said, without the query it quotes (simple-salesforce's URL holds it, and a
    SOQL error repeats it above its last line); a field it does not know comes with how leadscore's
    own fields are created."""
    parts = []
    for error in _errors(exc):
        lines = str(error.get("message", "")).strip().splitlines() or [""]
        parts.append(f"{error.get('errorCode')}: {lines[-1]}")
    said = "; ".join(parts)
    if "INVALID_FIELD" in _error_codes(exc):
        said += " (`leadscore setup salesforce` creates leadscore's fields)"
    return said or str(exc)


def _failure(what: str, exc: SalesforceError | requests.RequestException) -> CRMError | RateLimited:
    """The error for a failed call: CRMUnavailable when the org did not answer or answered 5xx (down
    or in maintenance), so the batch waits for it; RateLimited when the org's API limit is spent (the
    day's calls: an hour; concurrent long requests: a minute), so the batch is put off without
    spending its retries; ObjectUnreadable for INVALID_TYPE; else CRMError."""
    if isinstance(exc, requests.RequestException):
        unanswered = isinstance(exc, (requests.ConnectionError, requests.Timeout))
        return (CRMUnavailable if unanswered else CRMError)(f"{what}: {exc}")
    if "REQUEST_LIMIT_EXCEEDED" in _error_codes(exc):
        daily = "TotalRequests" in _said(exc)
        return RateLimited(
            f"{what}: {_said(exc)} (the org's API limit, which other apps share; Setup > System Overview "
            "shows its use)",
            retry_after_s=3600 if daily else 60,
        )
    if exc.status >= 500:
        kind = CRMUnavailable
    else:
        kind = ObjectUnreadable if "INVALID_TYPE" in _error_codes(exc) else CRMError
    return kind(f"{what}: {_said(exc)}")


def _setup_refused(name: str, label: str, exc: Exception, verb: str = "create") -> CRMError:
    """What the admin must do when the Metadata API refuses to `verb` one of leadscore's fields."""
    said = " ".join(str(exc).split())
    if "DUPLICATE_DEVELOPER_NAME" in said:
        return CRMError(
            f"Lead.{name} exists, but this Salesforce user cannot see it: give the integration user "
            f"field-level security on {label} (Setup > Object Manager > Lead > Fields & Relationships > "
            f"{label} > Set Field-Level Security), then run `leadscore setup salesforce` again"
        )
    if "INSUFFICIENT_ACCESS" in said:
        return CRMError(
            f"this Salesforce user may not {verb} fields: give it the Customize Application and Modify "
            "Metadata permissions (or have an admin run `leadscore setup salesforce`)"
        )
    return CRMError(f"Salesforce refused to {verb} Lead.{name}: {said}")


def _soql_ids(ids: list[str]) -> str:
    for record_id in ids:
        if not is_record_id(record_id):
            raise ValueError(f"{record_id!r} is not a Salesforce record id")
    return ", ".join(f"'{i}'" for i in ids)


def lead_from_record(
    record: dict,
    org_id: str,
    tasks: list[dict] = (),
    custom_fields: dict[str, str] | None = None,
    won: bool = False,
) -> Lead:
    """Map a Salesforce Lead record (and its latest Tasks) onto the CRM-neutral `Lead`."""
    employees = record.get("NumberOfEmployees")
    texts = [record.get("Description") or ""] + [
        " — ".join(t[f] for f in ("Subject", "Description") if t.get(f)) for t in tasks
    ]
    return Lead(
        crm="salesforce",
        account_id=org_id,
        lead_id=record["Id"],
        first_name=record.get("FirstName"),
        last_name=record.get("LastName"),
        has_email=bool(record.get("Email")),
        email_bad=bool(record.get("EmailBouncedReason")),
        email_opted_out=bool(record.get("HasOptedOutOfEmail")),
        has_phone=bool((record.get("Phone") or record.get("MobilePhone")) and not record.get("DoNotCall")),
        title=record.get("Title"),
        company=record.get("Company"),
        company_size=str(employees) if employees else None,
        industry=record.get("Industry"),
        source=record.get("LeadSource"),
        status=record.get("Status"),
        stage=record.get("Rating"),
        last_activity_at=record.get("LastActivityDate"),
        engagement_known=False,  # no visits, form conversions or replies on a Lead: not "not engaged"
        texts=bounded_texts(texts),
        rating=record.get("Rating"),
        do_not_call=bool(record.get("DoNotCall")),
        custom={n: str(record[f]) for n, f in (custom_fields or {}).items() if record.get(f) is not None},
        current_output={
            key: _shown(record[name]) for key, name in OUTPUT_FIELDS.items() if record.get(name) is not None
        },
        feedback=record.get(FEEDBACK_FIELD) or None,
        outcome=("won" if won else "converted") if record.get("IsConverted") else None,
        read_only=bool(record.get("IsConverted")),  # Salesforce refuses updates to converted Leads
    )


class SalesforceCRM:
    """One org, reached as leadscore's integration user; every call bounded by a timeout."""

    crm = "salesforce"

    def __init__(
        self,
        settings: Settings,
        org_id: str = "",
        telemetry: Callable[..., None] = lambda *args, **labels: None,
        custom_fields: dict[str, str] | None = None,
        redis: Redis | None = None,
    ):
        """`custom_fields`: further Lead fields a trained model reads, feature name -> field API name.
        `redis`: where the org's session is shared with the worker's other processes (`SharedSession`)."""
        settings.require_salesforce_api()
        self.org_id = self.account_id = org_id
        self.custom_fields = dict(custom_fields or {})
        self._read_fields: list[str] | None = None
        self.picklists: dict[str, list[str]] = {}  # active values of SCORED_PICKLISTS, from `read_fields`
        self.timeout = settings.salesforce_timeout_s
        self.stop_fraction = settings.salesforce_api_stop_fraction
        self.telemetry = telemetry
        self.settings = settings
        self.session = requests.Session()
        self.session.headers.update({
            "Sforce-Call-Options": f"client={settings.salesforce_client_name}",
            # REST runs the org's active Lead assignment rules on every update unless told not to, so a
            # score write would hand a rep's Lead to a queue; and a duplicate rule that alerts on edit
            # refuses an API save that does not acknowledge the alert.
            "Sforce-Auto-Assign": "FALSE",
            "Sforce-Duplicate-Rule-Header": "allowSave=true",
        })  # fmt: skip
        renewable = redis is not None and _auth_mode(settings) != "token"
        self.shared = SharedSession(redis, settings, org_id) if renewable else None
        shared = self.shared.get() if self.shared else None
        self.sf = self._client(shared) if shared else self._log_in()

    def _client(self, token: SessionToken) -> Salesforce:
        return Salesforce(
            instance_url=token.instance_url,
            session_id=token.access_token,
            version=self.settings.salesforce_api_version,
            session=self.session,
        )

    def _log_in(self) -> Salesforce:
        """A client on a new session, which the worker's other processes then use too."""
        try:
            token = _new_session(self.settings, self.session)
        except requests.RequestException as exc:
            raise _failure("Salesforce login failed", exc) from exc
        except SalesforceAuthenticationFailed as exc:
            raise _login_refused(exc) from exc
        if self.shared:
            self.shared.put(token)
        return self._client(token)

    def adopt_shared_session(self) -> None:
        """Take up the session another process of the worker renewed. A work horse is forked from a
        parent that keeps the session it started with; without this, every job after that session
        expired would be refused once and log in again."""
        shared = self.shared.get() if self.shared else None
        if shared and shared.access_token != self.sf.session_id:
            self.sf = self._client(shared)

    @property
    def read_fields(self) -> list[str]:
        """The Lead fields read with every lead. The ones leadscore added later (feedback, holdout)
        and a model's custom fields are read only where the org has them, so an org that has not
        re-run `leadscore setup salesforce` keeps scoring instead of failing every query. One
        describe call per process (`leadscore worker` makes it before forking)."""
        if self._read_fields is None:
            optional = [FEEDBACK_FIELD, OUTPUT_FIELDS["holdout"], *self.custom_fields.values()]
            present = self._lead_fields()
            self.picklists = {
                name: [v["value"] for v in present[name].get("picklistValues") or () if v.get("active")]
                for name in SCORED_PICKLISTS if name in present
            }  # fmt: skip
            missing = [name for name in optional if name not in present]
            if missing:
                log.warning(
                    "Salesforce org %s has no Lead field %s: not read (`leadscore setup salesforce` adds "
                    "leadscore's own)", self.org_id, ", ".join(missing),
                )  # fmt: skip
            required = [*LEAD_FIELDS, *(f for key, f in OUTPUT_FIELDS.items() if key != "holdout")]
            unseen = [name for name in required if name.endswith("__c") and name not in present]
            if unseen:
                log.error(
                    "Salesforce org %s: this user cannot see the Lead field %s, so reading and writing "
                    "leads will be refused: run `leadscore setup salesforce`, and give the integration user "
                    "field-level security on leadscore's fields", self.org_id, ", ".join(unseen),
                )  # fmt: skip
            self._read_fields = list(dict.fromkeys([*required, *(f for f in optional if f in present)]))
        return self._read_fields

    def prepare(self) -> None:
        """Settle which Lead fields to read now, in the worker's parent, so work horses inherit it;
        not the API usage the describe reported: each work horse learns that from its own first call,
        or a worker started past SALESFORCE_API_STOP_FRACTION would never see the budget reset."""
        self._read_fields = None
        try:
            _ = self.read_fields
        finally:
            self.sf.api_usage.clear()

    def _lead_fields(self) -> dict[str, dict]:
        """The Lead fields this user can see, by name, as the describe gives them."""
        self._within_budget("describe")
        try:
            described = self._renewing(
                lambda: self.sf.restful("sobjects/Lead/describe", timeout=self.timeout)
            )
        except (SalesforceError, requests.RequestException) as exc:
            raise _failure("describing Lead failed", exc) from exc
        return {f["name"]: f for f in described["fields"]}

    def _renewing(self, call: Callable[[], T]) -> T:
        """`call`, and once more on a new session when the org says this one expired and leadscore
        logs in itself (client credentials, or username and password). A fixed
        SALESFORCE_ACCESS_TOKEN cannot be renewed: said so, with what to set."""
        try:
            return call()
        except SalesforceExpiredSession:
            if _auth_mode(self.settings) == "token":
                raise CRMError(
                    "Salesforce no longer accepts SALESFORCE_ACCESS_TOKEN (INVALID_SESSION_ID: expired or "
                    "revoked): set a new one, or unset it and let leadscore log in itself with "
                    "SALESFORCE_CONSUMER_KEY and SALESFORCE_CONSUMER_SECRET, or a username and password"
                ) from None
            log.info("Salesforce session of org %s expired: logging in again", self.org_id)
            self.sf = self._log_in()
            return call()

    def _within_budget(self, operation: str) -> None:
        """Stop before the org's daily API budget is spent (Sforce-Limit-Info, seen on every answer)."""
        usage = self.sf.api_usage.get("api-usage")
        if usage is not None and usage.total and usage.used / usage.total >= self.stop_fraction:
            self.telemetry("crm_throttled_total", crm="salesforce")
            raise RateLimited(
                f"Salesforce org {self.org_id} has used {usage.used} of {usage.total} daily API calls; "
                f"leadscore stops at {self.stop_fraction:.0%} (SALESFORCE_API_STOP_FRACTION)",
                retry_after_s=3600,
            )
        self.telemetry("crm_calls_total", crm="salesforce", operation=operation)

    def _query(self, soql: str) -> list[dict]:
        return self._answer(lambda: self.sf.query_all(soql, timeout=self.timeout))["records"]

    def merged_into(self, lead_ids: list[str]) -> dict[str, str]:
        """Of these Leads, read as gone, the ones merged into another, by the id asked for: the Lead
        that remains. A merge deletes the others and names the winner in each one's MasterRecordId,
        which the recycle bin keeps (`queryAll`); the winner names none of them. A winner merged
        away since (A into B, then B into C) is followed to the last, MAX_MERGE_HOPS at most. One
        query a 200 Leads a hop."""
        merged = self._masters(lead_ids)
        for _ in range(MAX_MERGE_HOPS - 1):
            further = self._masters(sorted(set(merged.values())))
            if not further:
                break
            merged = {lead_id: further.get(master, master) for lead_id, master in merged.items()}
        return merged

    def _masters(self, lead_ids: list[str]) -> dict[str, str]:
        """The MasterRecordId of each of these Leads a merge deleted, by the id asked for."""
        found: dict[str, str] = {}
        for start in range(0, len(lead_ids), BATCH_LIMIT):
            chunk = lead_ids[start : start + BATCH_LIMIT]
            soql = (
                f"SELECT Id, MasterRecordId FROM Lead WHERE Id IN ({_soql_ids(chunk)}) "
                "AND IsDeleted = true AND MasterRecordId != null"
            )
            answer = self._answer(
                lambda: self.sf.query_all(soql, include_deleted=True, timeout=self.timeout)  # noqa: B023
            )
            master = {row["Id"][:15]: full_id(row["MasterRecordId"]) for row in answer["records"]}
            found |= {lead_id: master[lead_id[:15]] for lead_id in chunk if lead_id[:15] in master}
        return found

    def _answer(self, query: Callable[[], dict]) -> dict:
        """One query call, within the API budget, on a renewed session where it expired."""
        self._within_budget("query")
        try:
            return self._renewing(query)
        except (SalesforceError, requests.RequestException) as exc:
            raise _failure("Salesforce query failed", exc) from exc

    def open_lead_ids(self) -> Iterator[str]:
        """Every Lead not converted, by id, a page (2,000 records) a call: what `leadscore rescore`
        queues. Converted Leads are left out: Salesforce refuses to update them."""
        page = self._answer(
            lambda: self.sf.query("SELECT Id FROM Lead WHERE IsConverted = false", timeout=self.timeout)
        )
        while True:
            yield from (record["Id"] for record in page["records"])
            if page.get("done", True):
                return
            more = page["nextRecordsUrl"]
            page = self._answer(
                lambda: self.sf.query_more(more, identifier_is_url=True, timeout=self.timeout)  # noqa: B023
            )

    def reached_org(self) -> str:
        """The org the credentials reach, by the id its webhooks carry (18 characters)."""
        [org] = self._query("SELECT Id FROM Organization")
        return org["Id"]

    def read_leads(self, lead_ids: list[str]) -> dict[str, Lead]:
        """Leads by id; deleted ones are left out, converted ones come back `read_only`."""
        if not lead_ids:  # a batch of opportunities alone
            return {}
        ids = _soql_ids(lead_ids)
        fields = ", ".join(self.read_fields)
        records = self._query(f"SELECT {fields}, {LATEST_TASKS} FROM Lead WHERE Id IN ({ids})")
        found = {r["Id"][:15]: r for r in records}
        won = self._won_opportunities(
            [r.get("ConvertedOpportunityId") for r in records if r.get("IsConverted")]
        )
        return {  # keyed by the ids asked for, whether 15 or 18 characters long
            lead_id: lead_from_record(
                found[key],
                self.org_id,
                (found[key].get("Tasks") or {}).get("records", []),
                self.custom_fields,
                won=(found[key].get("ConvertedOpportunityId") or "")[:15] in won,
            )
            for lead_id in lead_ids
            if (key := lead_id[:15]) in found
        }

    def converted_leads(self, changed_since: datetime) -> list[tuple[str, str]]:
        """(Lead id, "won" or "converted") for each of the org's Leads converted, and so changed,
        since `changed_since`."""
        records = self._query(
            "SELECT Id, ConvertedOpportunityId FROM Lead WHERE IsConverted = true "
            f"AND SystemModstamp >= {changed_since.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ}"
        )
        won = self._won_opportunities([r.get("ConvertedOpportunityId") for r in records])
        return [
            (r["Id"], "won" if (r.get("ConvertedOpportunityId") or "")[:15] in won else "converted")
            for r in records
        ]

    def won_deal_leads(self, opportunity_ids: list[str]) -> dict[str, tuple[datetime | None, list[str]]]:
        """Of these opportunities, the won ones, by the ids asked for, with the Leads converted into
        them: what an opportunity's change event needs (two queries a 200). Undated: `CloseDate` is a
        date alone, and the Leads are no longer scored, so when it was seen serves."""
        won = self._won_opportunities(opportunity_ids)
        leads: dict[str, list[str]] = {}
        for start in range(0, len(won), BATCH_LIMIT):
            chunk = _soql_ids(sorted(won)[start : start + BATCH_LIMIT])
            for row in self._query(
                f"SELECT Id, ConvertedOpportunityId FROM Lead WHERE ConvertedOpportunityId IN ({chunk})"
            ):
                leads.setdefault(row["ConvertedOpportunityId"][:15], []).append(row["Id"])
        return {i: (None, sorted(leads.get(i[:15], []))) for i in opportunity_ids if i[:15] in won}

    def _won_opportunities(self, opportunity_ids: list[str | None]) -> set[str]:
        """Which of these opportunities are won, by 15-character id; one query a 200, none without
        ids, and none won when the integration user may not read Opportunity (logged)."""
        ids = sorted({i for i in opportunity_ids if i})
        won: set[str] = set()
        for start in range(0, len(ids), BATCH_LIMIT):
            chunk = _soql_ids(ids[start : start + BATCH_LIMIT])
            try:
                rows = self._query(f"SELECT Id, IsWon FROM Opportunity WHERE Id IN ({chunk})")
            except ObjectUnreadable:
                log.warning(
                    "Salesforce org %s: leadscore's integration user cannot read Opportunity, so converted "
                    "Leads are kept as converted, never won (grant Read on Opportunity)", self.org_id,
                )  # fmt: skip
                return set()
            won |= {row["Id"][:15] for row in rows if row.get("IsWon")}
        return won

    def read_lead(self, lead_id: str) -> Lead:
        lead = self.read_leads([lead_id]).get(lead_id)
        if lead is None:
            raise LeadGone(f"Salesforce Lead {lead_id} is deleted")
        return lead

    def write_many(self, writes: list[tuple[str, dict[str, str]]]) -> list[WriteResult]:
        """Write score fields to many Leads, 200 a call; each record succeeds or fails on its own."""
        results: list[WriteResult] = []
        for start in range(0, len(writes), BATCH_LIMIT):
            chunk = writes[start : start + BATCH_LIMIT]
            records = [
                {"attributes": {"type": "Lead"}, "id": lead_id, **_typed(fields)} for lead_id, fields in chunk
            ]
            self._within_budget("collections_update")
            try:
                saved = self._renewing(
                    lambda: self.sf.restful(
                        "composite/sobjects",
                        method="PATCH",
                        json={"allOrNone": False, "records": records},  # noqa: B023 (called at once)
                        timeout=self.timeout,
                    )
                )
            except (SalesforceError, requests.RequestException) as exc:
                raise _failure("Salesforce collections write failed", exc) from exc
            for (lead_id, _), result in zip(chunk, saved, strict=True):
                error = (result.get("errors") or [{}])[0]
                code = error.get("statusCode", "")
                results.append(
                    WriteResult(
                        lead_id,
                        bool(result.get("success")),
                        code,
                        error.get("message", ""),
                        permanent=code in PERMANENT_CODES,
                        gone=code in GONE_CODES,
                    )
                )
        for failed in (r for r in results if not r.ok):
            log.warning("Salesforce refused Lead %s: %s %s", failed.lead_id, failed.code, failed.message)
        return results

    def write_scores(self, lead_id: str, fields: dict[str, str]) -> None:
        write_one(self, "Salesforce Lead", lead_id, fields)

    def ensure_fields(self) -> SetupReport:
        """Create leadscore's custom Lead fields through the Metadata API. Existing ones stay, but one
        without help text for reps (created before leadscore set it) gets leadscore's; an admin's own
        help text is kept."""
        existing = self._lead_fields()
        report = SetupReport(created=[], existing=[])
        mdapi = self.sf.mdapi
        for name, spec in FIELD_DEFINITIONS.items():
            if name in existing and existing[name].get("inlineHelpText"):
                report.existing.append(name)
                continue
            if name in existing:
                self._add_help(name)
                report.updated.append(name)
                continue
            spec = dict(spec)
            field_type = mdapi.FieldType(spec.pop("type"))
            if "values" in spec:
                values = [
                    mdapi.CustomValue(fullName=value, label=option_label(value), default=False)
                    for value in spec.pop("values")
                ]
                definition = mdapi.ValueSetValuesDefinition(sorted=False, value=values)
                spec["valueSet"] = mdapi.ValueSet(restricted=True, valueSetDefinition=definition)
            field = mdapi.CustomField(fullName=f"Lead.{name}", type=field_type, **spec)
            try:
                mdapi.CustomField.create([field])
            except Exception as exc:  # simple-salesforce raises a bare Exception for a refused field
                raise _setup_refused(name, FIELD_DEFINITIONS[name]["label"], exc) from None
            report.created.append(name)
        self._read_fields = None  # read the new fields from now on
        return report

    def _add_help(self, name: str) -> None:
        """Leadscore's help text for reps on an existing field, the rest of it as it is: the Metadata
        API updates a field whole, so it is read first."""
        mdapi = self.sf.mdapi
        try:
            field = mdapi.CustomField.read([f"Lead.{name}"])
            field.inlineHelpText = FIELD_DEFINITIONS[name]["inlineHelpText"]
            mdapi.CustomField.update([field])
        except Exception as exc:  # simple-salesforce raises a bare Exception for a refused field
            raise _setup_refused(name, FIELD_DEFINITIONS[name]["label"], exc, "change") from None

    def list_scored(self, lead_ids: list[str]) -> list[dict[str, str]]:
        """The rep's Lead list view columns for these leads, in the given order."""
        fields = "Id, FirstName, LastName, Company, Title, " + ", ".join(OUTPUT_FIELDS.values())
        rows = {
            r["Id"]: r for r in self._query(f"SELECT {fields} FROM Lead WHERE Id IN ({_soql_ids(lead_ids)})")
        }
        return [
            {
                "id": i,
                "firstname": rows[i].get("FirstName"),
                "lastname": rows[i].get("LastName"),
                "company": rows[i].get("Company"),
                "jobtitle": rows[i].get("Title"),
                **{f"leadscore_{key}": _shown(rows[i].get(name)) for key, name in OUTPUT_FIELDS.items()},
            }
            for i in lead_ids
            if i in rows
        ]


def _typed(fields: dict[str, str]) -> dict:
    """Our text values in the types the Lead fields hold."""
    typed: dict = {WRITTEN_FIELDS[key]: value or None for key, value in fields.items()}  # "" clears a field
    if typed.get(OUTPUT_FIELDS["score"]) is not None:
        typed[OUTPUT_FIELDS["score"]] = int(typed[OUTPUT_FIELDS["score"]])
    if OUTPUT_FIELDS["holdout"] in typed:
        typed[OUTPUT_FIELDS["holdout"]] = typed[OUTPUT_FIELDS["holdout"]] == "true"
    return typed


def _shown(value) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return None if value is None else str(value)


FIRST_VERSION_WITHOUT_SOAP_LOGIN = 65.0  # Salesforce: "SOAP API login() not available in API 65.0 onwards"


def _auth_mode(settings: Settings) -> str:
    """How leadscore signs in to Salesforce: the first of these the settings allow."""
    if settings.salesforce_access_token and settings.salesforce_instance_url:
        return "token"
    if settings.salesforce_consumer_key and settings.salesforce_instance_url:
        return "client_credentials"
    if settings.salesforce_username:
        return "password"
    raise SettingsError("no usable Salesforce credentials")  # require_salesforce_api said which


class SessionToken(NamedTuple):
    instance_url: str
    access_token: str


LOGIN_LIMITED = ("REQUEST_LIMIT_EXCEEDED", "LOGIN_RATE_EXCEEDED")
LOGIN_LIMITED_WAIT_S = 600


def _login_refused(exc: SalesforceAuthenticationFailed) -> CRMError | RateLimited:
    """A username-password (SOAP) login's failure, which simple-salesforce reports as a 401 whatever the
    org answered: an org down or in maintenance (a 5xx page, SERVER_UNAVAILABLE) is waited for, as its
    other calls are; too many logins wait too; a refused credential is for an admin to fix."""
    code = str(exc.code).removeprefix("sf:")
    said = " ".join(exc.auth_message.split())[:200]
    if (code.isdigit() and int(code) >= 500) or code in ("None", "SERVER_UNAVAILABLE", "UNKNOWN_EXCEPTION"):
        return CRMUnavailable(f"Salesforce login failed: {code} {said}")
    if code in LOGIN_LIMITED:
        return RateLimited(f"Salesforce login refused: {code} {said}", retry_after_s=LOGIN_LIMITED_WAIT_S)
    return CRMError(
        f"Salesforce refused the login ({code}: {said}): check SALESFORCE_USERNAME, SALESFORCE_PASSWORD and "
        "SALESFORCE_SECURITY_TOKEN, and SALESFORCE_DOMAIN (test for a sandbox)"
    )


def _new_session(settings: Settings, session: requests.Session) -> SessionToken:
    """A session as the settings allow: the fixed token as it is, or a new one."""
    mode = _auth_mode(settings)
    if mode == "token":
        instance_url = str(settings.salesforce_instance_url).rstrip("/")
        return SessionToken(instance_url, settings.salesforce_access_token)
    if mode == "client_credentials":
        token = _client_credentials_token(settings, session)
        return SessionToken(token["instance_url"], token["access_token"])
    if float(settings.salesforce_api_version) >= FIRST_VERSION_WITHOUT_SOAP_LOGIN:
        raise CRMError(
            f"SALESFORCE_API_VERSION is {settings.salesforce_api_version}, but username-password login "
            f"uses Salesforce's SOAP login(), which API {FIRST_VERSION_WITHOUT_SOAP_LOGIN:.1f} and later do "
            "not offer (it is retired in Summer '27): set SALESFORCE_CONSUMER_KEY and "
            "SALESFORCE_CONSUMER_SECRET of an External Client App instead, or an API version of 64.0 or lower"
        )
    by_password = Salesforce(
        username=settings.salesforce_username,
        password=settings.salesforce_password,
        security_token=settings.salesforce_security_token,
        domain=settings.salesforce_domain,
        version=settings.salesforce_api_version,
        session=session,
    )
    return SessionToken(f"https://{by_password.sf_instance}", by_password.session_id)


class SharedSession:
    """An org's current session, kept in Redis for every process of every worker that logs in with
    the same credentials. Kept a day at most: Salesforce ends sessions sooner, and an ended one is
    replaced at the first call it fails. Sharing only saves logins: with Redis unreachable (a
    worker starting before it), each process logs in itself."""

    KEEP_S = 24 * 3600

    def __init__(self, redis: Redis, settings: Settings, org_id: str):
        login = (_auth_mode(settings), settings.salesforce_instance_url, settings.salesforce_domain,
                 settings.salesforce_consumer_key, settings.salesforce_username)  # fmt: skip
        digest = hashlib.sha256("\n".join(str(part or "") for part in login).encode()).hexdigest()[:16]
        self.redis = redis
        self.key = f"leadscore:salesforce:session:{org_id[:15]}:{digest}"

    def get(self) -> SessionToken | None:
        try:
            kept = self.redis.get(self.key)
        except RedisError:
            return None
        return SessionToken(**json.loads(kept)) if kept else None

    def put(self, token: SessionToken) -> None:
        with suppress(RedisError):
            self.redis.set(self.key, json.dumps(token._asdict()), ex=self.KEEP_S)


def _client_credentials_token(settings: Settings, session: requests.Session) -> dict:
    """The OAuth 2.0 client-credentials flow against the org's My Domain."""
    url = f"{str(settings.salesforce_instance_url).rstrip('/')}/services/oauth2/token"
    response = session.post(
        url,
        data={
            "grant_type": "client_credentials",
            "client_id": settings.salesforce_consumer_key,
            "client_secret": settings.salesforce_consumer_secret,
        },
        timeout=settings.salesforce_timeout_s,
    )
    if response.status_code >= 500:  # down or in maintenance: the login can succeed later
        raise CRMUnavailable(f"Salesforce login failed: {response.status_code} {response.text[:200]}")
    if not response.ok:
        raise SettingsError(
            f"Salesforce refused the client-credentials login ({response.status_code} "
            f"{response.text[:200]}): check SALESFORCE_CONSUMER_KEY/SECRET and that the connected app "
            "allows the flow"
        )
    return response.json()
