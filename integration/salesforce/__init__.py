"""Salesforce adapter: Outbound Messages and signed change events in, Lead fields out."""

import re

OUTPUT_FIELDS = {
    "score": "Leadscore_Score__c",
    "tier": "Leadscore_Tier__c",
    "reason": "Leadscore_Reason__c",
    "scored_at": "Leadscore_Scored_At__c",
    "details": "Leadscore_Details__c",
    "holdout": "Leadscore_Holdout__c",  # written only while HOLDOUT_SHARE > 0
}
FEEDBACK_FIELD = "Leadscore_Feedback__c"  # set by reps: too_high, too_low, right
# What a write may carry: the feedback only to clear it, when the score it was about changes.
WRITTEN_FIELDS = {**OUTPUT_FIELDS, "feedback": FEEDBACK_FIELD}
_RECORD_ID = re.compile(r"[a-zA-Z0-9]{15}(?:[a-zA-Z0-9]{3})?")
_ORG_ID = re.compile(r"00D[a-zA-Z0-9]{12}(?:[a-zA-Z0-9]{3})?")


def is_org_id(value: str) -> bool:
    return bool(_ORG_ID.fullmatch(value))


def is_record_id(value: str) -> bool:
    return bool(_RECORD_ID.fullmatch(value))  # `$` alone would let a trailing newline through


# Salesforce stamps these on every change, ours included; alone they are no reason to rescore.
SYSTEM_FIELDS = frozenset({"LastModifiedDate", "LastModifiedById", "SystemModstamp", "LastReferencedDate"})
