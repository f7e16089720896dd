"""The scoring config a sales-ops person edits (TOML), validated with pydantic."""

from __future__ import annotations

import hashlib
import re
import tomllib
from functools import cached_property
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from integration.text import WORD_CHAR, folded

Score = Field(ge=0.0, le=1.0)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeywordRule(_Strict):
    """A labelled score that applies when any keyword appears as a whole word."""

    label: str = Field(min_length=1)
    score: float = Score
    keywords: tuple[str, ...] = Field(min_length=1)

    def model_post_init(self, context, /) -> None:
        self.pattern  # noqa: B018 - compiled as the config loads: in a worker, once, not in each forked job

    @cached_property
    def pattern(self) -> re.Pattern[str]:
        """A keyword as a whole word of `folded` text: "ＣＥＯ", "Head of" with a no-break space and a
        decomposed "Geschäftsführer" match; beside Chinese or Japanese letters, which no space parts,
        "VP" in "营销VP" is a whole word, and "部長" in "営業部長"."""
        words = "|".join(re.escape(folded(k)) for k in self.keywords)
        return re.compile(rf"(?<!{WORD_CHAR})(?<!-)(?:{words})(?!{WORD_CHAR})(?!-)")

    def matches(self, text: str) -> bool:
        return bool(self.pattern.search(keyword_text(text)))


def keyword_text(text: str) -> str:
    """Text as keywords are looked for in it: `folded`, and underscores part words, as in the
    enumeration values a CRM stores ("COMPUTER_SOFTWARE")."""
    return folded(text).replace("_", " ")


class Labelled(_Strict):
    score: float = Score
    label: str = Field(min_length=1)
    cap: int | None = Field(None, ge=0, le=100, description="the final score never exceeds this")


class SizeBand(_Strict):
    min: int = Field(ge=0)
    score: float = Score


class Weights(_Strict):
    seniority: float = Field(ge=0)
    role_fit: float = Field(ge=0)
    reachability: float = Field(ge=0)
    source_stage: float = Field(ge=0)

    @model_validator(mode="after")
    def _not_all_zero(self):
        if sum(self.model_dump().values()) <= 0:
            raise ValueError("at least one rules weight must be above 0")
        return self

    def normalised(self) -> dict[str, float]:
        raw = self.model_dump()
        total = sum(raw.values())
        return {name: weight / total for name, weight in raw.items()}


class Blend(_Strict):
    propensity_weight: float = Field(ge=0.0, lt=1.0)


TIER_NAMES = ("A", "B", "C", "D")  # best first; D is what no cut-off reaches


class Tiers(_Strict):
    A: int = Field(ge=0, le=100)
    B: int = Field(ge=0, le=100)
    C: int = Field(ge=0, le=100)

    @model_validator(mode="after")
    def _descending(self):
        if not self.A > self.B > self.C:
            raise ValueError(f"tiers must satisfy A > B > C, got A={self.A} B={self.B} C={self.C}")
        return self

    def tier_for(self, score: int) -> str:
        for tier in TIER_NAMES[:-1]:
            if score >= getattr(self, tier):
                return tier
        return TIER_NAMES[-1]

    def top_of(self, tier: str) -> int:
        """The highest score in `tier`."""
        above = TIER_NAMES.index(tier) - 1
        return 100 if above < 0 else getattr(self, TIER_NAMES[above]) - 1


class Seniority(_Strict):
    unknown: float = Score
    levels: tuple[KeywordRule, ...]


class RoleFit(_Strict):
    function_weight: float = Field(ge=0)
    size_weight: float = Field(ge=0)
    industry_weight: float = Field(ge=0)
    unknown_function: float = Score
    unknown_size: float = Score
    unknown_industry: float = Score
    functions: tuple[KeywordRule, ...]
    company_sizes: tuple[SizeBand, ...] = Field(min_length=1)
    industries: tuple[KeywordRule, ...]


class Reachability(_Strict):
    email: float = Score
    phone: float = Score
    engaged: float = Score
    engaged_min_visits: int = Field(ge=0)
    engaged_min_conversions: int = Field(ge=0)


class SourceStage(_Strict):
    source_weight: float = Field(ge=0)
    status_weight: float = Field(ge=0)
    stage_weight: float = Field(ge=0)
    unknown_source: float = Score
    unknown_status: float = Score
    unknown_stage: float = Score
    sources: dict[str, Labelled]
    statuses: dict[str, Labelled]
    stages: dict[str, Labelled]
    intents: tuple[KeywordRule, ...] = ()

    @field_validator("sources", "statuses", "stages")
    @classmethod
    def _keyed_by_value_key(cls, table: dict[str, Labelled]) -> dict[str, Labelled]:
        """A lead's value matches whatever its case, spaces, hyphens and underscores ("Unqualified" is
        "UNQUALIFIED", "In Progress" is "IN_PROGRESS"): picklists differ by org and exports give labels
        where the API gives values. Two values of a table that read the same must have the same rule."""
        keyed: dict[str, Labelled] = {}
        for value, rule in table.items():
            key = value_key(value)
            if keyed.get(key, rule) != rule:
                raise ValueError(
                    f"{value!r} reads the same as another value (case, spaces, hyphens and underscores are "
                    "ignored) but has another rule: keep one of them"
                )
            keyed[key] = rule
        return keyed

    def source(self, value: str | None) -> Labelled | None:
        return self.sources.get(value_key(value))

    def status(self, value: str | None) -> Labelled | None:
        return self.statuses.get(value_key(value))

    def stage(self, value: str | None) -> Labelled | None:
        return self.stages.get(value_key(value))


def value_key(value: str | None) -> str:
    """How a source, status or stage is looked up in the scoring config: without case, spaces,
    hyphens or underscores, so a CRM's internal value (`DIRECT_TRAFFIC`, `marketingqualifiedlead`)
    and its label in an export or a newer picklist ("Direct Traffic", "Marketing Qualified Lead")
    are one value."""
    return _JOINERS.sub("", folded(value or ""))


_JOINERS = re.compile(r"[\s_-]+")


def unmatched_options(config: ScoringConfig, options: dict[str, list[str]]) -> dict[str, list[str]]:
    """The CRM's picklist options, by table ("source", "status" or "stage"), that no rule of the
    config names: a lead with one scores as unknown, and a closed or junk status is not capped."""
    tables = {"source": config.source_stage.source, "status": config.source_stage.status,
              "stage": config.source_stage.stage}  # fmt: skip
    unmatched = {table: [v for v in values if tables[table](v) is None] for table, values in options.items()}
    return {table: values for table, values in unmatched.items() if values}


class ScoringConfig(_Strict):
    version: str
    weights: Weights
    blend: Blend
    tiers: Tiers
    seniority: Seniority
    role_fit: RoleFit
    reachability: Reachability
    source_stage: SourceStage
    digest: str = Field(
        "",
        description="part of every input fingerprint: load_config sets a hash of the file; the config the "
        "workers score with (jobs.scoring_config) a hash of that, the LLM model and the trained model",
    )
    file_digest: str = Field(
        "",
        description="a hash of the file alone, kept with every score: which rules made it, whatever its "
        "version says",
    )


class ConfigError(ValueError):
    """The scoring config cannot be used; the message names the file and the bad key."""


def load_config(path: Path | None = None) -> ScoringConfig:
    """Load and validate a scoring config; the shipped default when `path` is None."""
    if path is None:
        raw = resources.files("workers").joinpath("scoring_config.toml").read_bytes()
        where = "the default scoring config"
    else:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read scoring config {path}: {exc.strerror}") from None
        where = str(path)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
        file_digest = hashlib.sha256(raw).hexdigest()[:16]
        return ScoringConfig(**data, digest=file_digest, file_digest=file_digest)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} is not valid TOML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{where} is invalid: {problems}") from None
