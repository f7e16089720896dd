"""The CRM-neutral lead record that the scorer reads; each adapter maps its fields into it."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT_CHARS = 4000  # bounds prompt size and cost, whatever the CRM holds


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

    source: str | None = Field(None, description="lead source, e.g. HubSpot's hs_analytics_source")
    source_detail: str | None = None
    status: str | None = Field(None, description="lead status, e.g. hs_lead_status")
    stage: str | None = Field(None, description="lifecycle stage")

    conversions: int = 0
    visits: int = 0
    page_views: int = 0
    recent_conversion: str | None = None
    recent_conversion_at: str | None = None
    last_activity_at: str | None = None
    last_reply_at: str | None = None

    texts: tuple[str, ...] = Field((), description="latest notes and emails, newest first, bounded")

    current_output: dict[str, str] = Field(
        default_factory=dict, description="leadscore's fields as the CRM holds them now"
    )

    @property
    def display_name(self) -> str:
        return " ".join(p for p in (self.first_name, self.last_name) if p) or f"#{self.lead_id}"

    def scoring_inputs(self) -> dict:
        """Everything the score depends on — the input to the fingerprint and the LLM prompt."""
        return self.model_dump(exclude={"current_output", "first_name", "last_name"})


def bounded_texts(texts: list[str], limit: int = MAX_TEXT_CHARS) -> tuple[str, ...]:
    """Keep texts in order until `limit` characters, cutting the last one to fit."""
    kept: list[str] = []
    room = limit
    for text in texts:
        text = " ".join(text.split())
        if not text or room <= 0:
            continue
        kept.append(text[:room])
        room -= len(kept[-1])
    return tuple(kept)
