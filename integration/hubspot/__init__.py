"""HubSpot adapter: webhook verification and normalisation, and the CRM v3 API client."""

OUTPUT_PROPERTIES = {
    "score": "leadscore_score",
    "tier": "leadscore_tier",
    "reason": "leadscore_reason",
    "scored_at": "leadscore_scored_at",
    "details": "leadscore_details",
}
