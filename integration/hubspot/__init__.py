"""HubSpot adapter: webhook verification and normalisation, and the CRM v3 API client."""

BATCH_LIMIT = 100  # records a CRM v3 batch read or update takes
OUTPUT_PROPERTIES = {
    "score": "leadscore_score",
    "tier": "leadscore_tier",
    "reason": "leadscore_reason",
    "scored_at": "leadscore_scored_at",
    "details": "leadscore_details",
    "holdout": "leadscore_holdout",  # written only while HOLDOUT_SHARE > 0
}
# What reps see of a score: someone else's change of one (a rep typing over it, a workflow, an import)
# is read, so the worker puts leadscore's back. A rep who disagrees sets the feedback property instead.
SHOWN_PROPERTIES = (OUTPUT_PROPERTIES["score"], OUTPUT_PROPERTIES["tier"])
# A contact with any of these has had sales activity (a reply, a note, a call), so may have notes or
# emails worth reading; a change of one rescores the contact with that text.
ACTIVITY_PROPERTIES = (
    "notes_last_updated",
    "hs_last_sales_activity_timestamp",
    "hs_sales_email_last_replied",
)
FEEDBACK_PROPERTY = "leadscore_feedback"  # set by reps: too_high, too_low, right
# What a write may carry: the feedback only to clear it, when the score it was about changes.
WRITTEN_PROPERTIES = {**OUTPUT_PROPERTIES, "feedback": FEEDBACK_PROPERTY}
# lifecyclestage values that count as an outcome, and which (HUBSPOT_OUTCOME_STAGES adds a portal's own)
OUTCOME_STAGES = {"opportunity": "opportunity", "customer": "customer", "evangelist": "customer"}


def outcome_stages(configured: dict[str, str | None]) -> dict[str, str]:
    """The default outcome stages with a portal's own (HUBSPOT_OUTCOME_STAGES): a `None` takes one out."""
    return {stage: kind for stage, kind in {**OUTCOME_STAGES, **configured}.items() if kind is not None}


def stage_date_property(stage: str) -> str:
    """The property HubSpot dates a contact's entering `stage` in (the earliest of an outcome's is when
    it converted): the default stages' own, and for a portal's custom stage (whose internal value is a
    number) its "Date entered" property."""
    return f"hs_lifecyclestage_{stage}_date" if stage in OUTCOME_STAGES else f"hs_v2_date_entered_{stage}"


# A deal reaching closed won is an outcome for its contacts. Its stage ids differ per pipeline, so
# every stage change is queued (under `events.deal_key`), and the worker reads whether the deal is won.
DEAL_OUTCOME_PROPERTIES = frozenset({"dealstage", "hs_is_closed_won"})
# The enumeration properties the scoring config's tables look values up from.
SCORED_OPTIONS = {"hs_analytics_source": "source", "hs_lead_status": "status", "lifecyclestage": "stage"}
