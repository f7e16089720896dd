"""Salesforce adapter: Outbound Messages and signed change events in, Lead fields out."""

OUTPUT_FIELDS = {
    "score": "Leadscore_Score__c",
    "tier": "Leadscore_Tier__c",
    "reason": "Leadscore_Reason__c",
    "scored_at": "Leadscore_Scored_At__c",
    "details": "Leadscore_Details__c",
}
# Salesforce stamps these on every change, ours included; alone they are no reason to rescore.
SYSTEM_FIELDS = frozenset({"LastModifiedDate", "LastModifiedById", "SystemModstamp", "LastReferencedDate"})
