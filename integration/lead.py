"""The CRM-neutral lead record that the scorer reads; each adapter maps its fields into it."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from integration.logs import redact
from integration.text import whole

MAX_TEXT_CHARS = 4000  # bounds prompt size and cost, whatever the CRM holds
FEEDBACK_VALUES = ("too_high", "too_low", "right")  # what reps may say of a score, in both CRMs
# What each tier asks of a rep, in the tier field's help in both CRMs.
TIER_MEANINGS = "A = call first, B = call this week, C = follow up, D = nurture"
# What each of leadscore's fields says of itself, in both CRMs: (to admins, to reps). Salesforce shows
# the first in Setup and the second at the field's "i"; HubSpot shows its one description to both.
FIELD_HELP: dict[str, tuple[str, str]] = {
    "score": ("Conversion propensity, 0-100", "How likely this lead is to convert, from 0 to 100"),
    "tier": (TIER_MEANINGS, TIER_MEANINGS),
    "reason": ("Why, in one line", "Why the lead has this score, in one line"),
    "scored_at": ("When the score was written", "When this lead's score was last written"),
    "details": (
        "JSON provenance: sub-scores, weights, model, evidence, fingerprint",
        "How the score was made, as JSON, for whoever looks after the scoring",
    ),
    "holdout": (
        "In the randomised holdout: no score shown, so lift can be measured",
        "Checked: the score is left blank on purpose, to measure what scores change; work the lead as "
        "you would without one",
    ),
    "feedback": (
        "Reps: is this score too high, too low or right?",
        "Is this lead's score too high, too low or right? Say so here",
    ),
}


def field_help(key: str, to: str) -> str:
    """A field's help (`to` "admins" or "reps"), signed so it reads as leadscore's among a CRM's own."""
    for_admins, for_reps = FIELD_HELP[key]
    return f"{for_reps if to == 'reps' else for_admins} (leadscore)"


def option_label(value: str) -> str:
    """What reps read for one of leadscore's picklist values: `too_high` is "Too high"."""
    return value.replace("_", " ").capitalize()


# Read with the lead but not scored: names, our own output, and what reps and outcomes say about it.
NOT_SCORING_INPUTS = frozenset({
    "current_output", "first_name", "last_name", "feedback", "outcome", "outcome_at", "read_only",
    "merged_ids", "engagement_known",  # the CRM's, not the lead's: the same for every lead of a CRM
})  # fmt: skip
ADDED_LATER = {"do_not_call": False, "rating": None, "custom": {}}  # field -> its empty value


def lead_key(crm: str, account_id: str, lead_id: str) -> str:
    """One lead across CRMs and accounts: what the holdout hashes and job results name."""
    return f"{crm}:{account_id}:{lead_id}"


class Lead(BaseModel):
    model_config = ConfigDict(frozen=True)

    crm: str
    account_id: str
    lead_id: str

    first_name: str | None = None
    last_name: str | None = None
    has_email: bool = False
    email_bad: bool = False
    email_opted_out: bool = False
    has_phone: bool = False

    title: str | None = None
    company: str | None = None
    company_size: str | None = Field(None, description="employee count or band as the CRM holds it")
    industry: str | None = None

    do_not_call: bool = False

    source: str | None = Field(None, description="lead source, e.g. HubSpot's hs_analytics_source")
    source_detail: str | None = None
    status: str | None = Field(None, description="lead status, e.g. hs_lead_status")
    stage: str | None = Field(None, description="lifecycle stage")
    rating: str | None = Field(None, description="the owner's judgement, e.g. Salesforce's Rating")

    conversions: int = 0
    visits: int = 0
    page_views: int = 0
    recent_conversion: str | None = None
    recent_conversion_at: str | None = None
    last_activity_at: str | None = None
    last_reply_at: str | None = None
    engagement_known: bool = Field(
        True, description="the CRM records visits, conversions and replies (a Salesforce Lead does not)"
    )

    texts: tuple[str, ...] = Field((), description="latest notes and emails, newest first, bounded")

    custom: dict[str, str] = Field(
        default_factory=dict, description="further CRM properties a trained model reads, by feature name"
    )

    current_output: dict[str, str] = Field(
        default_factory=dict, description="leadscore's fields as the CRM holds them now"
    )
    feedback: str | None = Field(None, description="the rep's leadscore_feedback: too_high, too_low, right")
    outcome: str | None = Field(None, description="opportunity, customer, converted or won, if it got there")
    outcome_at: datetime | None = Field(None, description="when it got there, where the CRM keeps the date")
    read_only: bool = Field(False, description="the CRM takes no more writes (a converted Salesforce Lead)")
    merged_ids: tuple[str, ...] = Field(
        (), description="the records merged into this one (HubSpot's hs_merged_object_ids): the same person"
    )

    @field_validator("*")
    @classmethod
    def _whole_characters(cls, value):
        """Every text `whole`: half an emoji read from the CRM fails no LLM request, store or log line."""
        if isinstance(value, str):
            return whole(value)
        if isinstance(value, tuple):
            return tuple(whole(item) if isinstance(item, str) else item for item in value)
        if isinstance(value, dict):
            return {whole(key): whole(item) if isinstance(item, str) else item for key, item in value.items()}
        return value

    @property
    def lead_key(self) -> str:
        return lead_key(self.crm, self.account_id, self.lead_id)

    def scoring_inputs(self) -> dict:
        """Everything the score depends on — the input to the fingerprint and the LLM prompt.

        Fields added after launch are left out while empty, so that adding them did not change
        every existing lead's fingerprint (and send each through the LLM again)."""
        inputs = self.model_dump(exclude=NOT_SCORING_INPUTS)
        for name, empty in ADDED_LATER.items():
            if inputs[name] == empty:
                del inputs[name]
        return inputs


_MOMENT = TypeAdapter(datetime)


def moment_of(value: object) -> datetime | None:
    """A CRM timestamp (ISO 8601, a date, or epoch milliseconds) as an aware UTC datetime; None
    when it is blank or unreadable."""
    try:
        moment = _MOMENT.validate_python(value)
    except ValidationError:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def bounded_texts(texts: list[str], limit: int = MAX_TEXT_CHARS) -> tuple[str, ...]:
    """Keep texts in order until `limit` characters, cutting the last one to fit. Email addresses and
    phone numbers are masked first: scoring needs none, and the texts go to the LLM provider."""
    kept: list[str] = []
    room = limit
    for text in texts:
        if room <= 0:
            break
        text = redact(" ".join(text.split()))
        if not text:
            continue
        kept.append(text[:room])
        room -= len(kept[-1])
    return tuple(kept)
