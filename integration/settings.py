"""Configuration from the environment (and an optional `.env`), validated once at start.

Every process — web, worker, CLI — reads the same `Settings`, so one set of
environment variables runs the same lines under honcho, Heroku or systemd.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AnyHttpUrl, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(RuntimeError):
    """The environment does not describe a runnable leadscore; the message says what to fix."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for the RQ queue")
    queue_name: str = "leadscore"
    max_body_bytes: int = Field(1_000_000, gt=0, description="largest webhook body accepted")
    public_base_url: AnyHttpUrl | None = Field(
        None,
        description="the scheme://host[:port] HubSpot posts to, when a proxy rewrites it; "
        "signatures are computed over the public URL",
    )
    proxy_fix_hops: int = Field(0, ge=0, description="trusted X-Forwarded-* proxies in front")

    hubspot_access_token: str = ""
    hubspot_app_secret: str = ""
    hubspot_app_id: str = ""
    hubspot_api_base: AnyHttpUrl = AnyHttpUrl("https://api.hubapi.com")
    hubspot_timeout_s: float = Field(10.0, gt=0)

    llm_base_url: AnyHttpUrl | None = None
    llm_api_key: str = ""
    llm_model: str = "gpt-4o-mini"
    llm_timeout_s: float = Field(8.0, gt=0)

    scoring_config_path: Path | None = Field(
        None, description="TOML scoring config; the shipped B2B SaaS default when unset"
    )
    log_level: str = "INFO"

    @field_validator("hubspot_app_id")
    @classmethod
    def _app_id_is_numeric(cls, value: str) -> str:
        if value and not value.isdigit():
            raise ValueError(f"HUBSPOT_APP_ID must be the numeric app id, got {value!r}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"REDIS_URL must start with redis://, rediss:// or unix://, got {value!r}")
        return value

    @property
    def llm_enabled(self) -> bool:
        return bool(self.llm_api_key)

    def require_hubspot_webhook(self) -> None:
        if not self.hubspot_app_secret:
            raise SettingsError(
                "HUBSPOT_APP_SECRET is not set: copy the client secret from your HubSpot app's "
                "Auth tab so webhook signatures can be verified"
            )

    def require_hubspot_api(self) -> None:
        if not self.hubspot_access_token:
            raise SettingsError(
                "HUBSPOT_ACCESS_TOKEN is not set: use a private app token or an OAuth access "
                "token with the crm.objects.contacts.read/write and crm.schemas.contacts.write scopes"
            )


def load_settings(**overrides) -> Settings:
    """Build settings, turning pydantic's report into one message per bad variable."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
        )
        raise SettingsError(f"invalid leadscore settings: {problems}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
