"""Configuration from the environment (and an optional `.env`), validated once at start.

Every process — web, worker, CLI — reads the same `Settings`, so one set of
environment variables runs the same lines under honcho, Heroku or systemd.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AnyHttpUrl, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# What leadscore sends itself, or what would make the reply no reply (a stream).
PARAMS_LEADSCORE_SETS = ("model", "messages", "stream")
EXAMPLE_PARAMS = '{"max_tokens": null, "max_completion_tokens": 2000}'
EXAMPLE_HEADERS = '{"x-portkey-provider": "openai"}'
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110's token
# Compared or sent byte for byte, so what a paste or a mounted file leaves around one is taken off (none
# starts or ends with a space), and quotes an env file or a shell kept are refused. A password may end
# in a space, so it is left as typed.
SECRETS_AND_IDS = (
    "hubspot_access_token", "hubspot_app_secret", "hubspot_app_id", "salesforce_org_ids",
    "salesforce_webhook_token", "salesforce_events_secret", "salesforce_integration_user_id",
    "salesforce_access_token", "salesforce_consumer_key", "salesforce_consumer_secret", "salesforce_username",
    "salesforce_security_token", "llm_api_key", "metrics_token",
)  # fmt: skip


class SettingsError(RuntimeError):
    """The environment does not describe a runnable leadscore; the message says what to fix."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for the RQ queue")
    redis_ssl_cert_reqs: Literal["required", "none"] = Field(
        "required",
        description="rediss:// only: none for a provider whose certificate is self-signed (Heroku)",
    )
    queue_name: str = "leadscore"
    max_body_bytes: int = Field(1_000_000, gt=0, description="largest webhook body accepted")
    public_base_url: AnyHttpUrl | None = Field(
        None,
        description="the scheme://host[:port] HubSpot posts to, when a proxy rewrites it; "
        "signatures are computed over the public URL",
    )
    proxy_fix_hops: int = Field(0, ge=0, description="trusted X-Forwarded-* proxies in front (Heroku: 1)")
    dyno: str = Field("", description="the Heroku dyno this runs on: Heroku sets DYNO")
    port: int = Field(
        5000,
        ge=1,
        le=65535,
        description="the port `web` binds (the Procfile's gunicorn reads $PORT itself); "
        "`leadscore demo` on a real portal binds it, `leadscore replay` posts to it",
    )

    hubspot_access_token: str = ""
    hubspot_app_secret: str = ""
    hubspot_app_id: str = ""
    hubspot_api_base: AnyHttpUrl = AnyHttpUrl("https://api.hubapi.com")
    hubspot_timeout_s: float = Field(10.0, gt=0, le=300)
    hubspot_won_pipelines: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="comma-separated deal pipeline ids whose closed-won deals are outcomes; unset: all",
    )
    hubspot_outcome_stages: Annotated[dict[str, str | None], NoDecode] = Field(
        default_factory=dict,
        description="lifecycle stages (internal values) that are outcomes, beside or instead of the defaults",
    )

    salesforce_org_ids: str = Field("", description="comma-separated organization ids allowed to post")
    salesforce_webhook_token: str = Field("", description="secret in the Outbound Message URL")
    salesforce_events_secret: str = Field("", description="HMAC key of /webhooks/salesforce/events")
    salesforce_integration_user_id: str = Field("", description="the user leadscore writes as")
    salesforce_client_name: str = Field(
        "leadscore", min_length=1, pattern=r"^[\w.-]+$", description="client= in Sforce-Call-Options"
    )
    salesforce_instance_url: AnyHttpUrl | None = None
    salesforce_access_token: str = ""
    salesforce_consumer_key: str = ""
    salesforce_consumer_secret: str = ""
    salesforce_username: str = ""
    salesforce_password: str = ""
    salesforce_security_token: str = ""
    salesforce_domain: str = Field("login", description="login, test or a My Domain, for username login")
    salesforce_api_version: str = Field("60.0", pattern=r"^\d{2,3}\.0$")
    salesforce_timeout_s: float = Field(10.0, gt=0, le=300)

    llm_base_url: AnyHttpUrl | None = None
    llm_api_key: str = ""
    llm_model: str = "gpt-4o-mini"
    llm_timeout_s: float = Field(8.0, gt=0, le=300)
    llm_extra_params: Annotated[dict[str, Any], NoDecode] = Field(
        default_factory=dict,
        description="a JSON object merged into every Chat Completions request; a null removes that key",
    )
    llm_extra_headers: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict,
        repr=False,  # a gateway's key may be one of them
        description="a JSON object of headers sent with every LLM call (a gateway's key, a provider's tag)",
    )

    batch_linger_s: float = Field(0.5, ge=0, le=30, description="how long a lone lead waits for company")
    batch_size: int = Field(
        100, ge=1, le=200, description="leads per batch (HubSpot takes 100, Salesforce 200)"
    )
    llm_concurrency: int = Field(16, ge=1, le=200, description="LLM calls in flight per batch")
    llm_batch_deadline_s: float = Field(
        60.0, gt=0, le=300, description="a batch's leads the LLM has not answered by then fall back"
    )
    llm_cache_ttl_s: int = Field(7 * 24 * 3600, ge=0, description="how long an LLM answer is reused")
    fallback_rescore_s: int = Field(
        300, ge=0, le=86_400, description="rescore fallback leads after this; 0 = never"
    )
    hubspot_calls_per_10s: int = Field(100, ge=1, le=1000, description="shared by all workers, per portal")
    salesforce_api_stop_fraction: float = Field(
        0.9, gt=0, le=1, description="stop calling when this share of the org's daily API budget is used"
    )
    metrics_token: str = Field("", description="when set, GET /metrics needs `Authorization: Bearer` it")
    bench_bare_endpoint: bool = Field(False, description="serve POST /_bench/bare (benchmarks only)")
    worker_maintenance_s: int = Field(
        15, ge=1, le=3600, description="how often a worker sweeps for lost work"
    )

    scoring_config_path: Path | None = Field(
        None, description="TOML scoring config; the shipped B2B SaaS default when unset"
    )
    database_url: str = Field(
        "sqlite:///leadscore.sqlite3",
        description="SQLAlchemy URL of the score, outcome and feedback store (PostgreSQL in production)",
    )
    scoring_model_path: Path | None = Field(
        None, description="a `leadscore train` artifact directory; rules + LLM blend when unset"
    )
    holdout_share: float = Field(
        0.0, ge=0, lt=1, description="share of leads (stable hash of the id) that get no visible tier"
    )
    log_level: str = "INFO"

    @model_validator(mode="before")
    @classmethod
    def _behind_herokus_router(cls, data):
        """Heroku's router ends TLS and says so in X-Forwarded-Proto, and HubSpot signs the https://
        URL: on a dyno, that one proxy is trusted unless PROXY_FIX_HOPS says otherwise."""
        if isinstance(data, dict) and data.get("dyno") and data.get("proxy_fix_hops") in (None, ""):
            return {**data, "proxy_fix_hops": 1}
        return data

    @model_validator(mode="after")
    def _a_store_that_outlives_a_dyno(self) -> Settings:
        if self.dyno and self.database_url.startswith("sqlite"):
            raise ValueError(
                "DATABASE_URL is unset or SQLite, but this runs on a Heroku dyno, whose files are lost at "
                "each restart and seen by no other dyno: attach Heroku Postgres, which sets DATABASE_URL"
            )
        return self

    @field_validator("scoring_config_path", "scoring_model_path", mode="before")
    @classmethod
    def _unset_when_empty(cls, value):
        """`SCORING_MODEL_PATH=` (an emptied line of a platform's config) means unset, not `.`."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("llm_base_url")
    @classmethod
    def _llm_base_url_without_a_query(cls, url: AnyHttpUrl | None) -> AnyHttpUrl | None:
        """The client puts the request's path after the whole URL, query too: classic Azure OpenAI's
        `…?api-version=…` would be asked at `…?api-version=…chat/completions`."""
        if url is not None and url.query:
            raise ValueError(
                "LLM_BASE_URL must have no query string (such as classic Azure OpenAI's ?api-version=…), "
                "which the client cannot keep: for Azure OpenAI use its v1 endpoint, "
                "https://RESOURCE.openai.azure.com/openai/v1/, with the deployment name as LLM_MODEL; got "
                f"{masked(str(url).split('?')[0])}?…"
            )
        return url

    @field_validator("llm_extra_params", mode="before")
    @classmethod
    def _extra_params_an_object(cls, value):
        params = _json_object("LLM_EXTRA_PARAMS", value, EXAMPLE_PARAMS)
        if taken := [name for name in PARAMS_LEADSCORE_SETS if name in params]:
            raise ValueError(
                f"LLM_EXTRA_PARAMS may not set {', '.join(taken)}: leadscore sends the model (LLM_MODEL) and "
                "the messages, and reads one whole reply, not a stream"
            )
        return params

    @field_validator("hubspot_won_pipelines", mode="before")
    @classmethod
    def _pipelines_comma_separated(cls, value):
        if not isinstance(value, str):
            return value
        pipelines = [p.strip() for p in value.split(",") if p.strip()]
        if any(p[0] in "\"'" or p[-1] in "\"'" for p in pipelines):
            raise _kept_quotes("HUBSPOT_WON_PIPELINES")
        return pipelines

    @field_validator("hubspot_outcome_stages", mode="before")
    @classmethod
    def _outcome_stages_by_kind(cls, value):
        """A portal's own lifecycle stages (a custom one's internal value is a number) and its renamed
        ones ("evangelist" made "Churned": `null` takes it out) decide which contacts converted."""
        stages = _json_object("HUBSPOT_OUTCOME_STAGES", value, EXAMPLE_STAGES)
        if wrong := [stage for stage, kind in stages.items() if kind not in (*OUTCOME_KINDS, None)]:
            raise ValueError(
                f"HUBSPOT_OUTCOME_STAGES gives {', '.join(map(repr, wrong))} a kind other than "
                f"{' or '.join(map(repr, OUTCOME_KINDS))} (or null, to count it no more)"
            )
        return stages

    @field_validator("llm_extra_headers", mode="before")
    @classmethod
    def _extra_headers_an_object_of_strings(cls, value):
        """Names and values are checked, never echoed: a header may carry a gateway's key."""
        headers = _json_object("LLM_EXTRA_HEADERS", value, EXAMPLE_HEADERS, echo=False)
        for name, header in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"LLM_EXTRA_HEADERS: {name!r} is not a header name (letters, digits and -)")
            if not isinstance(header, str) or "\r" in header or "\n" in header or not header.isascii():
                raise ValueError(
                    f"LLM_EXTRA_HEADERS: the value of {name} must be a string on one line, in ASCII"
                )
        return headers

    @field_validator(*SECRETS_AND_IDS, mode="before")
    @classmethod
    def _as_pasted_without_its_edges(cls, value, info):
        if not isinstance(value, str):
            return value
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            raise _kept_quotes(info.field_name.upper())
        return value

    @field_validator("salesforce_org_ids")
    @classmethod
    def _org_ids_as_salesforce_gives_them(cls, value: str) -> str:
        from integration.salesforce import is_org_id

        if wrong := [i for i in (i.strip() for i in value.split(",")) if i and not is_org_id(i)]:
            raise ValueError(
                f"SALESFORCE_ORG_IDS has {', '.join(map(repr, wrong))}, not an organization id as Setup > "
                "Company Information shows it (15 or 18 characters, from 00D, its case kept)"
            )
        return value

    @field_validator("public_base_url")
    @classmethod
    def _public_base_url_without_the_webhook_path(cls, url: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if url is not None and "/webhooks/" in f"{url.path or ''}/":
            raise ValueError(
                f"PUBLIC_BASE_URL is the scheme://host[:port] (and any prefix a proxy adds) that the webhook "
                f"paths follow, not a webhook's whole URL: got {url}"
            )
        return url

    @field_validator("salesforce_instance_url")
    @classmethod
    def _instance_url_the_orgs_own(cls, url: AnyHttpUrl | None) -> AnyHttpUrl | None:
        """A URL copied from the browser is Lightning's (`…lightning.force.com/lightning/page/home`), which
        the REST API is not served from."""
        if url is not None and (
            (url.path or "/") != "/" or (url.host or "").endswith(".lightning.force.com")
        ):
            raise ValueError(
                "SALESFORCE_INSTANCE_URL is the org's My Domain URL with no path, such as "
                f"https://acme.my.salesforce.com (Setup > My Domain), got {url}"
            )
        return url

    @field_validator("hubspot_app_id")
    @classmethod
    def _app_id_is_numeric(cls, value: str) -> str:
        if value and not value.isdigit():
            raise ValueError(f"HUBSPOT_APP_ID must be the numeric app id, got {value!r}")
        return value

    @field_validator("salesforce_domain")
    @classmethod
    def _domain_before_salesforce_com(cls, value: str) -> str:
        """simple-salesforce logs in at https://<domain>.salesforce.com: a URL or host given whole would
        be looked up as a host that does not exist, which reads as the org being down. Emptied: unset."""
        if not value.strip():
            return "login"
        if not re.fullmatch(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*", value) or value.lower().endswith(".com"):
            raise ValueError(
                "SALESFORCE_DOMAIN is what comes before .salesforce.com: login, test, or a My Domain such "
                f"as acme.my or acme--uat.sandbox.my, got {value!r}"
            )
        return value

    @field_validator("log_level")
    @classmethod
    def _log_level_known(cls, value: str) -> str:
        level = {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(value.upper(), value.upper())  # Python's aliases
        if level not in LOG_LEVELS:
            raise ValueError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
        return level

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"REDIS_URL must start with redis://, rediss:// or unix://, got {masked(value)!r}"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url_with_its_driver(cls, value: str) -> str:
        """Platforms hand out `postgres://…` (a scheme SQLAlchemy dropped) and plain `postgresql://…`
        (which SQLAlchemy reads as psycopg2); both mean the psycopg 3 driver that `.[postgres]` installs."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        value = value.strip()  # a newline from a mounted file would name another SQLite file
        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError(
                f"DATABASE_URL must be an SQLAlchemy URL such as sqlite:///leadscore.sqlite3 or "
                f"postgresql+psycopg://user:password@host/db, got {masked(value)!r}"
            ) from None
        if url.drivername in ("postgres", "postgresql"):
            return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        return value

    @property
    def llm_enabled(self) -> bool:
        return bool(self.llm_api_key)

    @property
    def allowed_org_ids(self) -> frozenset[str]:
        """Org ids by their case-sensitive 15-character form, which both id lengths share."""
        return frozenset(i.strip()[:15] for i in self.salesforce_org_ids.split(",") if i.strip())

    @property
    def hubspot_configured(self) -> bool:
        return bool(self.hubspot_access_token)

    @property
    def salesforce_configured(self) -> bool:
        return self.salesforce_instance_url is not None or bool(self.salesforce_username)

    def require_hubspot_webhook(self) -> None:
        if not self.hubspot_app_secret:
            raise SettingsError(
                "HUBSPOT_APP_SECRET is not set: copy the client secret from your HubSpot app's "
                "Auth tab so webhook signatures can be verified"
            )

    def require_hubspot_api(self) -> None:
        if not self.hubspot_access_token:
            raise SettingsError(
                "HUBSPOT_ACCESS_TOKEN is not set: use the access token of leadscore's HubSpot app "
                "(`leadscore hubspot-project` writes it) or of a legacy private app with its scopes"
            )

    def require_salesforce_outbound(self) -> None:
        if not (self.salesforce_webhook_token and self.allowed_org_ids):
            raise SettingsError(
                "SALESFORCE_WEBHOOK_TOKEN and SALESFORCE_ORG_IDS must both be set to accept Outbound "
                "Messages: they carry no signature, so the URL token and the org id authenticate them"
            )

    def require_salesforce_events(self) -> None:
        if not (self.salesforce_events_secret and self.allowed_org_ids):
            raise SettingsError(
                "SALESFORCE_EVENTS_SECRET and SALESFORCE_ORG_IDS must be set to accept signed "
                "Salesforce change events"
            )

    def require_salesforce_api(self) -> None:
        if self.salesforce_username and self.salesforce_password:
            return
        if self.salesforce_instance_url is None:
            raise SettingsError(
                "SALESFORCE_INSTANCE_URL is not set (e.g. https://acme.my.salesforce.com), nor "
                "SALESFORCE_USERNAME/PASSWORD/SECURITY_TOKEN"
            )
        if not (
            self.salesforce_access_token or (self.salesforce_consumer_key and self.salesforce_consumer_secret)
        ):
            raise SettingsError(
                "Salesforce credentials missing: set SALESFORCE_ACCESS_TOKEN, or SALESFORCE_CONSUMER_KEY "
                "and SALESFORCE_CONSUMER_SECRET (OAuth client credentials), or SALESFORCE_USERNAME, "
                "SALESFORCE_PASSWORD and SALESFORCE_SECURITY_TOKEN"
            )

    def require_a_crm(self) -> None:
        if not (self.hubspot_configured or self.salesforce_configured):
            raise SettingsError(
                "no CRM configured: set HUBSPOT_ACCESS_TOKEN, or SALESFORCE_INSTANCE_URL with Salesforce "
                "credentials"
            )


OUTCOME_KINDS = ("opportunity", "customer")
EXAMPLE_STAGES = '{"1234567": "customer", "evangelist": null}'


def _json_object(setting: str, value, example: str, echo: bool = True) -> dict:
    """A setting that holds a JSON object, from the environment's text or as given."""
    if isinstance(value, str):
        if not value.strip():
            return {}  # an emptied line of a platform's config: unset
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(
                f"{setting} must be a JSON object such as {example}, but it is not JSON ({exc})"
                + (f": {value[:80]!r}" if echo else "")
            ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{setting} must be a JSON object such as {example}, got a {type(value).__name__}")
    return value


def _kept_quotes(setting: str) -> ValueError:
    return ValueError(f"{setting} is in quotes, which an env file or a shell kept: remove them")


def masked(url: str) -> str:
    """`url` with its password (the user info after ':', up to the last '@') shown as ***, even
    when the rest of it is malformed."""
    head, at, host = url.rpartition("@")
    scheme, sep, userinfo = head.partition("://") if "://" in head else ("", "", head)
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}{sep}{user}:***@{host}" if at and colon else url


def load_settings(**overrides) -> Settings:
    """Build settings, turning pydantic's report into one message per bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(  # a check of several variables has no one name: its message names them
            f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" if err["loc"] else err["msg"]
            for err in exc.errors()
        )
        raise SettingsError(f"invalid leadscore settings: {problems}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
